"""Masked text <-> content ids and masked positions.

`[MASK]` asks for one token, `[MASK:N]` for N tokens at that place. With byte-level BPE the space before a word
belongs to that word's token, so one space before a marker is left to the fill: "The [MASK] statement" is
tokenized as "The" + <mask> + " statement" and the fill comes back as " raise".

`[MASK:?]` (1 to 8 tokens) and `[MASK:a-b]` (a to b tokens) leave the length to the model: `span_ranges` reads
the lengths each marker allows and `with_lengths` writes a text with them fixed; `span_candidates` expands a text
into one fixed-length text per combination of lengths, where there are at most MAX_CANDIDATES (beyond, the
lengths are searched gap by gap: runtime/spans.py).
"""

import array
import codecs
import collections
import itertools
import json
import math
import re
import select
from dataclasses import dataclass

import numpy as np

MARKER = re.compile(r"\[MASK(?::([0-9]+))?\]")
SPAN = re.compile(r"\[MASK:(\?|([0-9]+)-([0-9]+))\]")
ANY_LENGTH = (1, 8)                   # what [MASK:?] allows
MAX_CANDIDATES = 64                   # combinations of span lengths decoded together; the lengths one marker allows
MAX_SEARCH = 256                      # lengths all of a text's span markers allow, summed (a gap-by-gap search)
# anything that starts like a marker: up to its closing bracket within 20 characters of the line ([MASK: 2]), or
# else up to the first space or bracket ([MASK:3 words)
MARKER_LIKE = re.compile(r"\[MASK\b(?:[^\[\]\n]{0,20}\]|[^\[\]\s]{0,20}\]?)")


QUOTED_CHARACTERS = 80


def quoted(value, form=repr) -> str:
    """A client's value as an error message quotes it: form(value) (repr, or json.dumps), cut to
    QUOTED_CHARACTERS with its full length named, so that a message stays one short line whatever was sent."""
    text = form(value)
    if len(text) <= QUOTED_CHARACTERS:
        return text
    return f"{text[:QUOTED_CHARACTERS - 3]}... ({len(text):,} characters)"


def marker_number(marker: str, digits: str, max_length: int) -> int:
    """The number of tokens a span marker's digits ask for; ValueError for a number of over 18 digits (Python's
    int() refuses one of over 4,300 with a message of its own). Fixed-length markers need no such check: MARKER_LIKE
    refuses any over 20 characters first."""
    if len(digits.lstrip("0")) > 18:
        raise ValueError(f"{quoted(marker)} asks for a {len(digits.lstrip('0')):,}-digit number of tokens; ask "
                         f"for 1 to {max_length} (the bundle's maximum length)")
    return int(digits)


@dataclass(frozen=True)
class MaskedText:
    ids: np.ndarray          # [n] content ids, the mask id at masked positions
    masked: np.ndarray       # [n] bool


def encode_masked_text(text: str, tokenizer, mask_id: int, max_length: int) -> MaskedText:
    """Splits on markers, tokenizes the pieces without special tokens and inserts mask ids."""
    if not isinstance(text, str):
        raise ValueError(f"a text must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"the text is not valid Unicode (a lone surrogate at character {error.start}); "
                         "pass UTF-8 text") from None
    if not text.strip():
        raise ValueError("the text is empty; give text with [MASK] (one token) or [MASK:N] (N tokens) markers")
    for like in MARKER_LIKE.finditer(text):
        if not MARKER.fullmatch(like.group(0)) and not SPAN.fullmatch(like.group(0)):
            raise ValueError(f"'{like.group(0)}' is not a marker; write [MASK] for one token or [MASK:N] for N")
    if SPAN.search(text):
        raise ValueError("the text has [MASK:?] or [MASK:a-b] markers; expand it with span_candidates first")
    ids, masked, position = [], [], 0
    for match in MARKER.finditer(text):
        count = int(match.group(1)) if match.group(1) is not None else 1       # MARKER_LIKE bounds its digits
        if not 1 <= count <= max_length:
            raise ValueError(f"'{match.group(0)}' asks for {count} tokens; ask for 1 to {max_length} "
                             "(the bundle's maximum length)")
        piece = text[position:match.start()]
        piece = piece[:-1] if piece.endswith(" ") else piece       # that space belongs to the fill
        ids += content_ids(piece, tokenizer, max_length)
        masked += [False] * (len(ids) - len(masked))
        if len(ids) + count > max_length:       # stops here: 90,000 [MASK:2046] in 1 MB would be 184M ids
            raise ValueError(f"the text is over the bundle's maximum of {max_length} tokens: {len(ids) + count} "
                             f"to the end of its marker at character {match.start()}; shorten it or split it")
        ids += [mask_id] * count
        masked += [True] * count
        position = match.end()
    ids += content_ids(text[position:], tokenizer, max_length)
    masked += [False] * (len(ids) - len(masked))
    if len(ids) > max_length:
        raise ValueError(f"the text is {len(ids)} tokens long, over the bundle's maximum of {max_length}; "
                         "shorten it or split it")
    return MaskedText(np.asarray(ids, dtype=np.int64), np.asarray(masked, dtype=bool))


def content_ids(piece: str, tokenizer, max_length: int) -> list[int]:
    """The ids of text between markers. A piece of over 32 characters per token allowed is refused where its
    start alone makes twice the maximum, before the tokenizer takes all of it (a 20 MB line took 2.8 GB only to
    be refused)."""
    if not piece:
        return []
    head = 32 * max_length
    if len(piece) > head:
        count = len(tokenizer.encode(piece[:head], add_special_tokens=False).ids)
        if count > 2 * max_length:
            raise ValueError(f"the text is far over the bundle's maximum of {max_length} tokens (its first "
                             f"{head:,} characters alone make {count:,}); shorten it or split it")
    return tokenizer.encode(piece, add_special_tokens=False).ids


def span_ranges(text: str, max_length: int) -> list[range]:
    """The lengths each span marker ([MASK:?], [MASK:a-b]) of the text allows, in order; [] for none. Raises
    ValueError for a bad range, a marker allowing over MAX_CANDIDATES lengths, or over MAX_SEARCH in all."""
    ranges = []
    for match in SPAN.finditer(text):
        low, high = ANY_LENGTH if match.group(1) == "?" else [marker_number(match.group(0), digits, max_length)
                                                               for digits in match.group(2, 3)]
        if not 1 <= low <= high <= max_length:
            raise ValueError(f"'{match.group(0)}' asks for a span of {low} to {high} tokens; use 1 <= a <= b <= "
                             f"{max_length}")
        if high - low + 1 > MAX_CANDIDATES:
            raise ValueError(f"'{match.group(0)}' allows {high - low + 1} lengths, over {MAX_CANDIDATES}; narrow it "
                             f"to at most {MAX_CANDIDATES} ([MASK:{low}-{low + MAX_CANDIDATES - 1}]) or fix the "
                             "length with [MASK:N]")
        ranges.append(range(low, high + 1))
    if sum(len(r) for r in ranges) > MAX_SEARCH:
        raise ValueError(f"the span markers allow {sum(len(r) for r in ranges)} lengths in all, over {MAX_SEARCH}; "
                         "fix some lengths with [MASK:N], narrow them with [MASK:a-b] or split the text")
    return ranges


def with_lengths(text: str, lengths) -> str:
    """The text with its span markers, in order, replaced by [MASK:length] for each of lengths."""
    pieces = iter(f"[MASK:{n}]" for n in lengths)
    return SPAN.sub(lambda _: next(pieces), text)


def span_candidates(text: str, max_length: int,
                    most: int = MAX_CANDIDATES) -> list[tuple[tuple[int, ...], str]] | None:
    """(lengths, text with [MASK:length] at each span marker) for every combination of the allowed lengths,
    [((), text)] when the text has no span marker, or None where several span markers allow over `most`
    combinations (their lengths are then searched gap by gap; one marker's lengths are all decoded together
    whatever `most`: a search would decode them all too). Raises ValueError as span_ranges does."""
    return candidates_of(text, span_ranges(text, max_length), most)


def candidates_of(text: str, ranges: list[range],
                  most: int = MAX_CANDIDATES) -> list[tuple[tuple[int, ...], str]] | None:
    """span_candidates for the text's span ranges (span_ranges), read once."""
    if len(ranges) > 1 and math.prod(len(r) for r in ranges) > most:
        return None
    return [(lengths, with_lengths(text, lengths)) for lengths in itertools.product(*ranges)]


def segments(ids: np.ndarray, masked: np.ndarray, tokenizer) -> list[tuple[str, bool]]:
    """The filled text as (piece, is_fill) runs, for marking the fills on a terminal."""
    runs, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or masked[end] != masked[start]:
            runs.append((tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False), bool(masked[start])))
            start = end
    return runs


def literal(tokenizer):
    """A copy of a `tokenizers.Tokenizer` (or a transformers tokenizer's) that encodes text as text: the spelling of
    a special token typed in it ("[SEP]", "<|endoftext|>") becomes the ids of those characters, never the special
    token, so no input text can place a separator or an end of text where the writer wrote characters. The
    markers are split off before encoding, so they alone give special ids."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    copy = Tokenizer.from_str(backend.to_str())
    copy.encode_special_tokens = True
    return copy


def plain_encoder(tokenizer):
    """text -> content ids (no special tokens, special tokens' spellings as text), for a `tokenizers.Tokenizer`
    or a transformers tokenizer."""
    tokenizer = literal(tokenizer)
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


PIECE_CHARS = 1 << 20
LINE_START = re.compile(r"(?<=\n)\S")


def pieces(document: str, encode, size: int = PIECE_CHARS):
    """A long document in pieces of about `size` characters for the tokenizer, whose memory grows with the text
    it takes at once (a 100 MB file as one document took 19 GB). A cut falls where a line starts with a
    non-space character, and only where the tokenizer gives the two lines around it the same ids apart as
    together (with a tokenizer that marks a text's start, the document stays whole)."""
    start = 0
    while len(document) - start > size:
        found = LINE_START.search(document, start + size)
        if found is None:
            break
        cut = found.start()
        end = document.find("\n", cut)
        before = document[document.rfind("\n", start, cut - 1) + 1:cut]
        after = document[cut:len(document) if end < 0 else end]
        if list(encode(before + after)) != list(encode(before)) + list(encode(after)):
            break
        yield document[start:cut]
        start = cut
    yield document[start:]


def pack_windows(documents, encode, seq_len: int, separator_id: int, name: str = "the text",
                 most: int | None = None) -> np.ndarray:
    """Tokenizes documents (any iterable) with encode (text -> ids, no special tokens; a long document in
    pieces), joins them with separator_id and cuts [windows, seq_len]; with `most`, reads documents only until
    that many windows are full and returns the first `most`. `name` (where the documents come from) names them in
    the error where none fits."""
    ids = array.array("q")                  # 8 bytes a token (a list of ints takes about 36)
    for document in documents:
        for piece in pieces(document, encode, PIECE_CHARS):
            ids.extend(encode(piece))
        ids.append(separator_id)
        if most is not None and len(ids) >= most * seq_len:
            break
    count = len(ids) // seq_len if most is None else min(most, len(ids) // seq_len)
    if count == 0:
        raise ValueError(f"{name} holds {len(ids)} tokens, fewer than one window of --seq-len {seq_len}; "
                         "add text or lower --seq-len")
    return np.frombuffer(ids, dtype=np.int64, count=count * seq_len).reshape(count, seq_len)


def decode_utf8(data: bytes, name: str) -> str:
    """UTF-8 text with a byte order mark at its start dropped (editors on Windows write one; left in, it would be
    three tokens before the first text); ValueError naming the first invalid byte."""
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        raise not_utf8(name, bom + error.start) from None


def not_utf8(name: str, byte: int) -> ValueError:
    """The error for input whose byte at offset `byte` is not UTF-8."""
    return ValueError(f"{name} is not valid UTF-8 (byte {byte}); convert it to UTF-8")


MAX_NESTING = 128                     # arrays and objects within each other in one JSON value (serde_json's limit)
JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


class RefusedJson(ValueError):
    """Valid JSON that is refused: an object giving one key twice (json.loads would keep the last value and drop
    the others), or arrays and objects nested more than MAX_NESTING deep (how deep Python's parser follows depends
    on its version: 1,000 levels on 3.11, 5,000 on 3.13)."""


def _unique_keys(pairs: list) -> dict:
    found = {}
    for key, value in pairs:
        if key in found:
            raise RefusedJson(f"repeats the key '{key}' in one object; give each key once")
        found[key] = value
    return found


def nesting(text: str) -> int:
    """How deep arrays and objects lie within each other in valid JSON text: its brackets outside its strings."""
    brackets = np.frombuffer(JSON_STRING.sub("", text).encode().translate(None, NOT_BRACKETS), dtype=np.uint8)
    opening = (brackets == ord("[")) | (brackets == ord("{"))
    return int(np.cumsum(np.where(opening, 1, -1)).max(initial=0))


def loads_json(text):
    """json.loads (of text, or of bytes in UTF-8, -16 or -32 as json.loads reads them) that refuses an object
    repeating a key instead of dropping all but its last value, and nesting deeper than MAX_NESTING (RefusedJson)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    too_deep = RefusedJson(f"nests arrays or objects more than {MAX_NESTING} deep; send flatter JSON")
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise too_deep from None
    if isinstance(value, (list, dict)) and nesting(text) > MAX_NESTING:
        raise too_deep
    return value


@dataclass(frozen=True)
class Line:
    """One non-blank input line: its 1-based number and its text, or why it holds no text; a JSONL line's
    object too (record)."""
    number: int
    text: str | None
    error: str = ""
    record: dict | None = None


def line_of(number: int, line: str, name: str, jsonl: bool, field: str = "text") -> Line | None:
    """One input line (without its newline) as a Line, None where blank. Plain text: the line is the text. JSONL:
    an object whose string `field` is the text; a line that is not comes back with an error naming it
    (name:number) instead of stopping the read."""
    line = line[:-1] if line.endswith("\r") else line
    if not line.strip():
        return None
    if not jsonl:
        return Line(number, line)
    try:
        record = loads_json(line)
    except json.JSONDecodeError as error:
        return Line(number, None, f"{name}:{number} is not valid JSON ({error.msg})")
    except RefusedJson as error:
        return Line(number, None, f"{name}:{number} {error}")
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        return Line(number, None, f"{name}:{number} has no string field '{field}'")
    return Line(number, record[field], record=record)


def read_lines(content: str, name: str, jsonl: bool, field: str = "text") -> list[Line]:
    """Splits content on newlines only (a U+2028 or form feed inside a line stays in it) and skips blank lines;
    each line read by line_of."""
    lines = (line_of(number, raw, name, jsonl, field) for number, raw in enumerate(content.split("\n"), 1))
    return [line for line in lines if line is not None]


class StreamLines:
    """The Lines of a binary stream (a file, a pipe, stdin) read a piece at a time as the writer gives them, so
    memory holds a piece, not the stream: split on b"\\n" only, blank lines skipped, a UTF-8 byte order mark at
    the start dropped, each line read by line_of. Bytes that are not UTF-8 raise not_utf8's ValueError (the
    byte's offset in the stream) when their line is reached, after the lines before it. ready(): the next line
    can be had without waiting for the writer (always, where the stream cannot be polled: BytesIO, Windows)."""

    PIECE = 1 << 16

    def __init__(self, stream, name: str, jsonl: bool, field: str = "text"):
        self.stream, self.name, self.jsonl, self.field = stream, name, jsonl, field
        self.read: collections.deque = collections.deque()     # Lines (or a ValueError) read and not yet taken
        self.rest: list[bytes] = []                             # the start of a line whose newline has not come
        self.offset = 0                                         # bytes of the stream before `rest`
        self.number = 0
        self.ended = False

    def __iter__(self):
        while self.read or not self.ended:
            if not self.read:
                self._read_piece()
                continue
            line = self.read.popleft()
            if isinstance(line, ValueError):
                raise line
            yield line

    def ready(self) -> bool:
        while not self.read and not self.ended and polled(self.stream):
            self._read_piece()
        return bool(self.read) or self.ended

    def _read_piece(self) -> None:
        piece = self.stream.read1(self.PIECE)     # what the stream has (blocks only while it has nothing)
        if piece and b"\n" not in piece:
            self.rest.append(piece)
            return
        first, *raws = piece.split(b"\n")
        raws.insert(0, b"".join([*self.rest, first]))
        self.rest = [raws.pop()] if piece else []
        self.ended = not piece
        for raw in raws:
            self.number += 1
            if not self._take(raw):
                self.ended, self.rest = True, []
                return
            self.offset += len(raw) + 1

    def _take(self, raw: bytes) -> bool:
        """Reads one line into `read`; False where it is not UTF-8 (its error goes in instead)."""
        bom = len(codecs.BOM_UTF8) if self.number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
        try:
            text = raw[bom:].decode("utf-8")
        except UnicodeDecodeError as error:
            self.read.append(not_utf8(self.name, self.offset + bom + error.start))
            return False
        line = line_of(self.number, text, self.name, self.jsonl, self.field)
        if line is not None:
            self.read.append(line)
        return True


def polled(stream) -> bool:
    """The stream has bytes to read now; True where it cannot be asked."""
    try:
        return bool(select.select([stream], [], [], 0)[0])
    except (OSError, ValueError, TypeError):      # no file descriptor (BytesIO), or not pollable (Windows pipes)
        return True


def texts_of(lines: list[Line]) -> list[str]:
    """The texts, or a ValueError naming the first line that has none."""
    for line in lines:
        if line.error:
            raise ValueError(line.error)
    return [line.text for line in lines]
