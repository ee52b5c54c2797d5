"""What the `maria` commands print: results (plain, styled or JSON), notes and warnings on stderr, errors as one
line with an exit status."""

import contextlib
import json
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import NoReturn

import typer

from maria_onnx.runtime.results import Infilled

NEWLINES = str.maketrans({"\n": "\\n", "\r": "\\r"})


# Control characters of the input (ESC, CR, NUL...) shown escaped in a message, never sent to the terminal as they are
CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr (control characters escaped) and the exit status `code`."""
    typer.secho(f"error: {message.translate(CONTROLS)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def results_to_stdout() -> Iterator[None]:
    """Printing results: a write that fails (a full disk, a closed terminal) is named as stdout's, with the output
    said to be incomplete; a reader that left (`| head`) stays a quiet stop (one_line_errors)."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as error:
        raise OSError(error.errno, f"{error.strerror}; the output is incomplete", "stdout") from None


@contextlib.contextmanager
def warnings_shown() -> Iterator[None]:
    """Warnings raised inside (a device falling back to the CPU, say) printed as one yellow line each on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        typer.secho(f"warning: {warning.message}", fg=typer.colors.YELLOW, err=True)


class Ranked:
    """--rerank for a text whose samples are filled a piece at a time: each sample's output waits in a temporary
    file, its score in memory, and all are printed in score order (ties in sample order, as one sort of them all
    would give) once the last is filled."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()
        # (-score, sample, offset, note's bytes, output's bytes)
        self.samples: list[tuple[float, int, int, int, int]] = []

    def add(self, score: float, sample: int, note: str, output: str) -> None:
        note_bytes, output_bytes = note.encode(), output.encode()
        self.samples.append((-score, sample, self.file.tell(), len(note_bytes), len(output_bytes)))
        self.file.write(note_bytes + output_bytes)

    def print_all(self) -> int:
        """Prints the text's samples in score order and forgets them; returns how many."""
        for _, _, offset, note, output in sorted(self.samples):
            self.file.seek(offset)
            printed(self.file.read(note).decode(), self.file.read(output).decode())
        count = len(self.samples)
        self.file.seek(0)
        self.file.truncate()
        self.samples.clear()
        return count


def shown(result: Infilled, as_json: bool, styled: bool, kept: dict, bundle: dict | None = None) -> str:
    """A result's line: JSON exact, after the `kept` fields of its input line and before what filled it (`bundle`:
    its dtype and quantization); plain text with a newline inside a fill shown escaped (\\n)."""
    if as_json:
        return json.dumps({**kept, **result.to_dict(), **({"bundle": bundle} if bundle else {})}, ensure_ascii=False)
    if styled:
        return "".join(
            typer.style(piece.translate(NEWLINES), fg=typer.colors.GREEN, bold=True)
            if fill
            else piece.translate(NEWLINES)
            for piece, fill in result.segments
        )
    return result.text.translate(NEWLINES)


def printed(note: str, output: str) -> None:
    """A result's note (if any) on stderr, its line on stdout."""
    if note:
        typer.echo(note, err=True)
    typer.echo(output)
