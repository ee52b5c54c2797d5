"""The result of filling one text, and how it prints as JSON (`maria infill --json`, the servers)."""

import re
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer

from .decode import Fill
from .text import MaskedText, segments
from .utf8 import fill_pieces


@dataclass
class Infilled:
    """One filled text: the filled string, its content ids, where the fills are and how likely each was.
    score: what its span lengths were chosen by, where it was computed (span choice, --rerank): log p_AR of the
    whole filled text, or a request's other span score (runtime/likelihood.py's SPAN_SCORES). span_lengths and
    candidates: for [MASK:?] / [MASK:a-b] markers, the lengths chosen and every candidate with its score."""

    input: str
    text: str
    ids: list
    masked_positions: list
    fill_logprobs: list
    fills: list  # the text each fill adds, in whole characters (runtime/utf8.py: FillPieces)
    segments: list = field(repr=False, default_factory=list)  # (piece, is_fill) runs of text
    note: str = ""
    score: float | None = None
    span_lengths: list = field(default_factory=list)
    candidates: list = field(default_factory=list)  # {"lengths", "score", "text", "ids"} per candidate

    FIELDS = (
        "input",
        "text",
        "ids",
        "masked_positions",
        "fills",
        "fill_logprobs",
        "note",
        "score",
        "span_lengths",
        "candidates",
    )  # every key to_dict may write

    def to_dict(self) -> dict:
        """The JSON object of one result, as `maria infill --json` prints it."""
        out: dict[str, Any] = {
            "input": self.input,
            "text": self.text,
            "ids": self.ids,
            "masked_positions": self.masked_positions,
            "fills": self.fills,
            "fill_logprobs": self.fill_logprobs,
            "note": self.note,
        }
        if self.score is not None:
            out["score"] = self.score
        if self.candidates:
            out.update(span_lengths=self.span_lengths, candidates=self.candidates)
        return out


def build_result(tokenizer: Tokenizer, text: str, encoded: MaskedText, fill: Fill) -> Infilled:
    """The result of one text from its encoding and its fill."""
    if not encoded.masked.any():
        other_case = re.search(r"\[mask\b[^\]\s]{0,20}\]?", text, re.IGNORECASE)  # [mask], [Mask:2]
        note = "no [MASK] in the text; returned unchanged" + (
            f" ('{other_case.group(0)}' is text: markers are upper case, [MASK])" if other_case else ""
        )
        return Infilled(
            input=text,
            text=text,
            ids=encoded.ids.tolist(),
            masked_positions=[],
            fill_logprobs=[],
            fills=[],
            segments=[(text, False)],
            note=note,
        )
    return Infilled(
        input=text,
        text=tokenizer.decode(fill.ids.tolist(), skip_special_tokens=False),
        ids=fill.ids.tolist(),
        masked_positions=fill.positions.tolist(),
        fill_logprobs=[float(p) for p in fill.logprobs],
        fills=fill_pieces(tokenizer, fill.ids, fill.positions),
        segments=segments(fill.ids, encoded.masked, tokenizer),
    )
