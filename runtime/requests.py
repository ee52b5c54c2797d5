"""Fill requests and their settings: what a request asks for, how many decode rows it needs, and the limits.

FillRequest: texts (each Prepared: one candidate per combination of span lengths, or the ranges of a
             gap-by-gap search), sampling, num_samples, rerank
runtime/rounds.py decodes them: one batch per sampling setting, round after round where lengths are searched
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass

from .choose import Sampling
from .text import MAX_CANDIDATES, quoted


@dataclass(frozen=True)
class Prepared:
    """A text ready to fill: (span lengths, encoding) per candidate, one candidate with () for fixed markers; or,
    where its span markers allow more combinations than are decoded together, no candidates and the ranges of
    lengths to search gap by gap (runtime/spans.py)."""

    text: str
    candidates: list
    ranges: tuple = ()

    @property
    def spans(self) -> bool:
        return bool(self.ranges) or bool(self.candidates[0][0])

    @property
    def rows(self) -> int:
        """Decode rows it takes at once: its candidates, or the most lengths one of its span markers allows."""
        return max(len(r) for r in self.ranges) if self.ranges else len(self.candidates)


@dataclass(frozen=True)
class FillRequest:
    texts: list  # Prepared per text (Infiller.prepare)
    sampling: Sampling = Sampling()
    num_samples: int = 1
    rerank: bool = False
    indices: list | None = None  # per text, the index its generators derive from (default 0, 1, ...)
    first_sample: int = 0  # its samples are numbered from here (so are their generators): a text's samples
    # can be filled a piece at a time with the same results
    span_score: str = "text"  # how a span marker's length is chosen: SPAN_SCORES in runtime/likelihood.py

    @property
    def size(self) -> int:
        """Decode rows at once: texts x samples x candidates."""
        return self.num_samples * sum(p.rows for p in self.texts)

    def index(self, text: int) -> int:
        return text if self.indices is None else self.indices[text]


SETTINGS = {"temperature": float, "top_k": int, "top_p": float, "seed": int, "num_samples": int, "rerank": bool}
KIND_NAMES = {float: "a number", int: "a 64-bit integer", bool: "true or false", str: "a string"}


class TooLarge(ValueError):
    """A request that asks for more decode rows than a server takes at once."""


def check_size(limit: int, texts: int, num_samples: int, request: FillRequest | None = None) -> None:
    """Raises TooLarge where a request needs more than `limit` decode rows: texts x samples (checked before the
    texts are prepared), and with the span candidates of the prepared request."""
    if texts * num_samples > limit:
        fits = limit // num_samples  # texts per request at this many samples
        fix = (
            f"ask for at most {limit} samples"
            if texts == 1
            else f"split the request (at most {fits} text{'s' * (fits != 1)} of {num_samples} samples each)"
            if fits
            else f"ask for at most {limit} samples of one text per request"
        )
        raise TooLarge(
            f"{texts} text{'s' * (texts != 1)} x {num_samples} samples is over the limit of {limit} per request; {fix}"
        )
    if request is not None and request.size > limit:
        widest = max(p.rows for p in request.texts) * request.num_samples  # rows of its largest text
        fix = (
            "split the request"
            if widest <= limit
            else "narrow the span markers ([MASK:a-b]), fix some lengths ([MASK:N]) or ask for fewer samples"
        )
        raise TooLarge(
            f"the request needs {request.size} decode rows (texts x samples x span candidates), over "
            f"the limit of {limit}; {fix}"
        )


def bounded_request(
    prepare: Callable[[list, bool, int], list[Prepared]],
    texts: list,
    sampling: Sampling,
    num_samples: int,
    rerank: bool,
    limit: int,
    span_score: str = "text",
) -> FillRequest:
    """The request for texts in at most `limit` decode rows at once: every combination of span lengths decoded
    side by side where they all fit, else the lengths of each text with several span markers searched gap by gap
    (a round's rows at a time). prepare(texts, rerank, most) -> Prepared per text (Infiller.prepare); raises
    TooLarge where even the search does not fit."""
    check_size(limit, len(texts), num_samples)  # before any text is prepared
    request = FillRequest(prepare(texts, rerank, MAX_CANDIDATES), sampling, num_samples, rerank, span_score=span_score)
    if request.size > limit:
        request = FillRequest(prepare(texts, rerank, 1), sampling, num_samples, rerank, span_score=span_score)
    check_size(limit, len(texts), num_samples, request)
    return request


class SettingTypeError(ValueError):
    """A request setting that is unknown or of the wrong type (a server answers 400; a refused value, 422)."""


def _fits(value: object, kind: type) -> bool:
    """A value of this kind: an integer is integral and fits in 64 bits, as the protocol's INT64 tensors hold."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is str or isinstance(value, str):
        return kind is str and isinstance(value, str)
    if kind is float:  # an integer too large for a float64 is not a number it can hold (float() would overflow)
        return isinstance(value, float) or isinstance(value, int) and abs(value) <= sys.float_info.max
    return (isinstance(value, int) or isinstance(value, float) and value.is_integer()) and -(2**63) <= value < 2**63


def typed_settings(given: dict, kinds: dict) -> dict:
    """given's values as their kinds (kinds: name -> float, int, bool or str); SettingTypeError for a name not in
    kinds or a value not of its kind."""
    unknown = set(given) - set(kinds)
    if unknown:
        raise SettingTypeError(f"unknown parameters {quoted(sorted(unknown))}; parameters are {', '.join(kinds)}")
    values = {}
    for name, value in given.items():
        kind = kinds[name]
        if not _fits(value, kind):
            within = " within ±1.8e308" if kind is float and isinstance(value, int) else ""  # over a float64
            raise SettingTypeError(f"parameter '{name}' must be {KIND_NAMES[kind]}{within}, got {quoted(value)}")
        values[name] = kind(value)
    return values


def read_settings(given: dict) -> tuple[Sampling, int, bool]:
    """Sampling, num_samples and rerank from a request's settings as JSON gives them. An integer setting takes an
    integral number (2.0), never 2.5, NaN or a string; rerank takes only true or false. SettingTypeError for an
    unknown setting or a wrong type, ValueError for a refused value (a negative seed, top_p over 1)."""
    values = typed_settings(given, SETTINGS)
    num_samples, rerank = values.pop("num_samples", 1), values.pop("rerank", False)
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    return Sampling(**values), num_samples, rerank
