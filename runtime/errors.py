"""Errors in what a caller asked for, worded by each front end for its own user."""

from collections.abc import Callable


class SettingError(ValueError):
    """A setting the runtime refuses. Its message names each setting as {name}, the setting's keyword (and JSON
    field) name; str() spells them so, and a front end spells them its own way with worded() (the CLI: as its
    flags, --num-samples)."""

    def __init__(self, template: str, *fields: str):
        self.template, self.fields = template, fields
        super().__init__(self.worded(lambda field: field))

    def worded(self, spell: Callable[[str], str]) -> str:
        """The message with each setting's name spelled by spell(name)."""
        text = self.template
        for field in self.fields:
            text = text.replace("{" + field + "}", spell(field))
        return text
