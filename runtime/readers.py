"""Input readers: texts from files, from a stream read as it comes (stdin, a pipe), as plain lines or JSONL, and
the strict JSON parser the server reads request bodies with. Apart from the marker grammar (runtime/text.py).
"""

import codecs
import collections
import json
import re
import select
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np


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


MAX_DIGITS = 1000  # digits of a JSON integer: far past any number a setting takes
MAX_NESTING = 128  # arrays and objects within each other in one JSON value (serde_json's limit)
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


def _not_json(constant: str) -> float:
    raise RefusedJson(f"holds {constant}, which is not JSON (RFC 8259 has no NaN or infinity); send a number")


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_DIGITS:  # int() refuses over 4,300 with Python's own advice
        raise RefusedJson(f"holds an integer of {len(digits.lstrip('-')):,} digits; send at most {MAX_DIGITS}")
    return int(digits)


def loads_json(text: str | bytes | bytearray) -> Any:
    """json.loads (of text, or of bytes in UTF-8, -16 or -32 as json.loads reads them), strict: RefusedJson for an
    object repeating a key (json.loads would keep the last value), nesting deeper than MAX_NESTING, NaN or Infinity
    (Python's extensions, which other parsers refuse), and an integer of over MAX_DIGITS digits."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    too_deep = RefusedJson(f"nests arrays or objects more than {MAX_NESTING} deep; send flatter JSON")
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_not_json, parse_int=_integer)
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
    MAX_LINE = 16 << 20  # bytes of one line: far past the longest text a bundle takes, and a bound on memory

    def __init__(self, stream: BinaryIO, name: str, jsonl: bool, field: str = "text") -> None:
        self.stream, self.name, self.jsonl, self.field = stream, name, jsonl, field
        self.read: collections.deque = collections.deque()  # Lines (or a ValueError) read and not yet taken
        self.rest: list[bytes] = []  # the start of a line whose newline has not come
        self.offset = 0  # bytes of the stream before `rest`
        self.number = 0
        self.ended = False

    def __iter__(self) -> Iterator[Line]:
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
        # what the stream has (blocks only while it has nothing); typing's BinaryIO lacks read1, which the streams
        # read here have (io.BufferedReader: files, stdin; io.BytesIO)
        piece = self.stream.read1(self.PIECE)  # type: ignore[attr-defined]
        if piece and b"\n" not in piece:
            self.rest.append(piece)
            # a stream with no newline is refused before it fills the memory
            if sum(map(len, self.rest)) > self.MAX_LINE:
                self.read.append(
                    ValueError(
                        f"{self.name}:{self.number + 1} runs over {self.MAX_LINE >> 20} MiB without a newline; "
                        "give one text per line"
                    )
                )
                self.ended, self.rest = True, []
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


def polled(stream: BinaryIO) -> bool:
    """The stream has bytes to read now; True where it cannot be asked."""
    try:
        return bool(select.select([stream], [], [], 0)[0])
    except (OSError, ValueError, TypeError):  # no file descriptor (BytesIO), or not pollable (Windows pipes)
        return True


def texts_of(lines: list[Line]) -> list[str]:
    """The texts, or a ValueError naming the first line that has none."""
    for line in lines:
        if line.error:
            raise ValueError(line.error)
    return [line.text for line in lines if line.text is not None]
