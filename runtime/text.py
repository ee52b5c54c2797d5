"""Masked text <-> content ids and masked positions.

`[MASK]` asks for one token, `[MASK:N]` for N tokens at that place. With byte-level BPE the space before a word
belongs to that word's token, so one space before a marker is left to the fill: "The [MASK] statement" is
tokenized as "The" + <mask> + " statement" and the fill comes back as " raise".

`[MASK:?]` (1 to 8 tokens) and `[MASK:a-b]` (a to b tokens) leave the length to the model: `span_ranges` reads
the lengths each marker allows and `with_lengths` writes a text with them fixed; `span_candidates` expands a text
into one fixed-length text per combination of lengths, where there are at most MAX_CANDIDATES (beyond, the
lengths are searched gap by gap: runtime/spans.py).
"""

import itertools
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

MARKER = re.compile(r"\[MASK(?::([0-9]+))?\]")
SPAN = re.compile(r"\[MASK:(\?|([0-9]+)-([0-9]+))\]")
ANY_LENGTH = (1, 8)  # what [MASK:?] allows
MAX_CANDIDATES = 64  # combinations of span lengths decoded together; the lengths one marker allows
MAX_SEARCH = 256  # lengths all of a text's span markers allow, summed (a gap-by-gap search)
# anything that starts like a marker: up to its closing bracket within 20 characters of the line ([MASK: 2]), or
# else up to the first space or bracket ([MASK:3 words)
MARKER_LIKE = re.compile(r"\[MASK\b(?:[^\[\]\n]{0,20}\]|[^\[\]\s]{0,20}\]?)")


QUOTED_CHARACTERS = 80


def quoted(value: object, form: Callable[[Any], str] = repr) -> str:
    """A client's value as an error message quotes it: form(value) (repr, or json.dumps), cut to
    QUOTED_CHARACTERS with its full length named, so that a message stays one short line whatever was sent."""
    text = form(value)
    if len(text) <= QUOTED_CHARACTERS:
        return text
    return f"{text[: QUOTED_CHARACTERS - 3]}... ({len(text):,} characters)"


def marker_number(marker: str, digits: str, max_length: int) -> int:
    """The number of tokens a span marker's digits ask for; ValueError for a number of over 18 digits (Python's
    int() refuses one of over 4,300 with a message of its own). Fixed-length markers need no such check: MARKER_LIKE
    refuses any over 20 characters first."""
    if len(digits.lstrip("0")) > 18:
        raise ValueError(
            f"{quoted(marker)} asks for a {len(digits.lstrip('0')):,}-digit number of tokens; ask "
            f"for 1 to {max_length} (the bundle's maximum length)"
        )
    return int(digits)


@dataclass(frozen=True)
class MaskedText:
    ids: np.ndarray  # [n] content ids, the mask id at masked positions
    masked: np.ndarray  # [n] bool


def encode_masked_text(text: str, tokenizer: Tokenizer, mask_id: int, max_length: int) -> MaskedText:
    """Splits on markers, tokenizes the pieces without special tokens and inserts mask ids."""
    if not isinstance(text, str):
        raise ValueError(f"a text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"the text is not valid Unicode (a lone surrogate at character {error.start}); pass UTF-8 text"
        ) from None
    if not text.strip():
        raise ValueError("the text is empty; give text with [MASK] (one token) or [MASK:N] (N tokens) markers")
    for like in MARKER_LIKE.finditer(text):
        if not MARKER.fullmatch(like.group(0)) and not SPAN.fullmatch(like.group(0)):
            raise ValueError(f"'{like.group(0)}' is not a marker; write [MASK] for one token or [MASK:N] for N")
    if SPAN.search(text):
        raise ValueError("the text has [MASK:?] or [MASK:a-b] markers; expand it with span_candidates first")
    ids: list[int] = []
    masked: list[bool] = []
    position = 0
    for match in MARKER.finditer(text):
        count = int(match.group(1)) if match.group(1) is not None else 1  # MARKER_LIKE bounds its digits
        if not 1 <= count <= max_length:
            raise ValueError(
                f"'{match.group(0)}' asks for {count} tokens; ask for 1 to {max_length} (the bundle's maximum length)"
            )
        piece = text[position : match.start()]
        piece = piece[:-1] if piece.endswith(" ") else piece  # that space belongs to the fill
        ids += content_ids(piece, tokenizer, max_length)
        masked += [False] * (len(ids) - len(masked))
        if len(ids) + count > max_length:  # stops here, before a text of many markers becomes millions of ids
            raise ValueError(
                f"the text is over the bundle's maximum of {max_length} tokens: {len(ids) + count} "
                f"to the end of its marker at character {match.start()}; shorten it or split it"
            )
        ids += [mask_id] * count
        masked += [True] * count
        position = match.end()
    ids += content_ids(text[position:], tokenizer, max_length)
    masked += [False] * (len(ids) - len(masked))
    if len(ids) > max_length:
        raise ValueError(
            f"the text is {len(ids)} tokens long, over the bundle's maximum of {max_length}; shorten it or split it"
        )
    return MaskedText(np.asarray(ids, dtype=np.int64), np.asarray(masked, dtype=bool))


def content_ids(piece: str, tokenizer: Tokenizer, max_length: int) -> list[int]:
    """The ids of text between markers. A piece of over 32 characters per token allowed is refused where its
    start alone makes twice the maximum, before the tokenizer takes all of it (docs/benchmarks.md, "Smaller
    measurements")."""
    if not piece:
        return []
    head = 32 * max_length
    if len(piece) > head:
        count = len(tokenizer.encode(piece[:head], add_special_tokens=False).ids)
        if count > 2 * max_length:
            raise ValueError(
                f"the text is far over the bundle's maximum of {max_length} tokens (its first "
                f"{head:,} characters alone make {count:,}); shorten it or split it"
            )
    return tokenizer.encode(piece, add_special_tokens=False).ids


def span_ranges(text: str, max_length: int) -> list[range]:
    """The lengths each span marker ([MASK:?], [MASK:a-b]) of the text allows, in order; [] for none. Raises
    ValueError for a bad range, a marker allowing over MAX_CANDIDATES lengths, or over MAX_SEARCH in all."""
    ranges = []
    for match in SPAN.finditer(text):
        low, high = (
            ANY_LENGTH
            if match.group(1) == "?"
            else [marker_number(match.group(0), digits, max_length) for digits in match.group(2, 3)]
        )
        if not 1 <= low <= high <= max_length:
            raise ValueError(
                f"'{match.group(0)}' asks for a span of {low} to {high} tokens; use 1 <= a <= b <= {max_length}"
            )
        if high - low + 1 > MAX_CANDIDATES:
            raise ValueError(
                f"'{match.group(0)}' allows {high - low + 1} lengths, over {MAX_CANDIDATES}; narrow it "
                f"to at most {MAX_CANDIDATES} ([MASK:{low}-{low + MAX_CANDIDATES - 1}]) or fix the "
                "length with [MASK:N]"
            )
        ranges.append(range(low, high + 1))
    if sum(len(r) for r in ranges) > MAX_SEARCH:
        raise ValueError(
            f"the span markers allow {sum(len(r) for r in ranges)} lengths in all, over {MAX_SEARCH}; "
            "fix some lengths with [MASK:N], narrow them with [MASK:a-b] or split the text"
        )
    return ranges


def with_lengths(text: str, lengths: Iterable[int]) -> str:
    """The text with its span markers, in order, replaced by [MASK:length] for each of lengths."""
    pieces = iter(f"[MASK:{n}]" for n in lengths)
    return SPAN.sub(lambda _: next(pieces), text)


def span_candidates(text: str, max_length: int, most: int = MAX_CANDIDATES) -> list[tuple[tuple[int, ...], str]] | None:
    """(lengths, text with [MASK:length] at each span marker) for every combination of the allowed lengths,
    [((), text)] when the text has no span marker, or None where several span markers allow over `most`
    combinations (their lengths are then searched gap by gap; one marker's lengths are all decoded together
    whatever `most`: a search would decode them all too). Raises ValueError as span_ranges does."""
    return candidates_of(text, span_ranges(text, max_length), most)


def candidates_of(
    text: str, ranges: list[range], most: float = MAX_CANDIDATES
) -> list[tuple[tuple[int, ...], str]] | None:
    """span_candidates for the text's span ranges (span_ranges), read once."""
    if len(ranges) > 1 and math.prod(len(r) for r in ranges) > most:
        return None
    return [(lengths, with_lengths(text, lengths)) for lengths in itertools.product(*ranges)]


def segments(ids: np.ndarray, masked: np.ndarray, tokenizer: Any) -> list[tuple[str, bool]]:
    """The filled text as (piece, is_fill) runs, for marking the fills on a terminal."""
    runs, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or masked[end] != masked[start]:
            runs.append((tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False), bool(masked[start])))
            start = end
    return runs


def literal(tokenizer: Any) -> Tokenizer:
    """A copy of a `tokenizers.Tokenizer` (or a transformers tokenizer's) that encodes text as text: the spelling of
    a special token typed in it ("[SEP]", "<|endoftext|>") becomes the ids of those characters, never the special
    token, so no input text can place a separator or an end of text where the writer wrote characters. The
    markers are split off before encoding, so they alone give special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    copy = Tokenizer.from_str(backend.to_str())
    copy.encode_special_tokens = True
    return copy


def plain_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """text -> content ids (no special tokens, special tokens' spellings as text), for a `tokenizers.Tokenizer`
    or a transformers tokenizer."""
    copy = literal(tokenizer)
    return lambda text: copy.encode(text, add_special_tokens=False).ids
