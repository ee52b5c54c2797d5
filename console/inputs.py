"""What `maria infill` reads: its texts from the arguments, a file or stdin, checked line by line, in pieces."""

import itertools
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

import typer

from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.readers import Line, StreamLines, line_of
from maria_onnx.runtime.requests import Prepared
from maria_onnx.runtime.results import Infilled

from .outputs import CONTROLS

Checked = tuple[Line, Prepared]  # an input line and its text ready to fill

JSONL_SUFFIXES = (".jsonl", ".ndjson")


class InputLines:
    """`maria infill`'s texts as runtime.readers.Line: the arguments, or --input's lines (plain text, or JSONL with a
    "text" field; '-' is stdin) read as they come (runtime.readers.StreamLines), so memory holds a piece of the
    input, not all of it. The format is --format, else guessed from the file's suffix; plain text that is
    evidently JSONL is refused. whole: it can be read twice (the arguments, a regular file), so every line is
    checked before any is filled; stdin, a pipe or a FIFO is read once, filled as it comes."""

    def __init__(self, texts: list[str], input_file: str | None, input_format: str | None):
        if input_format not in (None, "text", "jsonl"):
            raise ValueError(f"--format must be text or jsonl, got '{input_format}'")
        if texts and input_file:
            raise ValueError("give texts as arguments or with --input, not both")
        if not input_file and not texts:
            raise ValueError("no text given; pass a text with [MASK] markers, or --input FILE ('-' for stdin)")
        if not input_file and input_format:
            raise ValueError("--format describes --input; texts given as arguments are plain text")
        self.texts, self.input_file = texts, input_file
        self.reader: StreamLines | None = None
        self.count = 0  # lines given by the last iteration
        self.name = "stdin" if input_file == "-" else (input_file or "the arguments")
        self.guessed = input_format is None
        self.jsonl = (
            input_format or ("jsonl" if (input_file or "").lower().endswith(JSONL_SUFFIXES) else "text")
        ) == "jsonl"
        self.stream: BinaryIO | None = None
        self.whole = not input_file
        if input_file:
            try:
                self.stream = sys.stdin.buffer if input_file == "-" else open(input_file, "rb")
                self.whole = input_file != "-" and stat.S_ISREG(os.fstat(self.stream.fileno()).st_mode)
            except OSError as error:
                raise ValueError(f"cannot read --input {self.name}: {error.strerror}") from None

    def __iter__(self) -> Iterator[Line]:
        if not self.input_file:
            yield from (Line(number, text) for number, text in enumerate(self.texts, 1))
            return
        assert self.stream is not None, "an --input is open from the start"
        if self.whole:
            self.stream.seek(0)
        self.reader, self.count = StreamLines(self.stream, self.name, self.jsonl), 0
        for line in self.reader:
            self.count += 1
            first_of_plain_text = self.count == 1 and self.guessed and not self.jsonl
            as_jsonl = line_of(line.number, line.text or "", self.name, jsonl=True) if first_of_plain_text else None
            if as_jsonl is not None and not as_jsonl.error:
                raise ValueError(
                    f'{self.name}:{line.number} is a JSON object with a "text" field, so the input '
                    "looks like JSONL; pass --format jsonl (or --format text to fill it as plain text)"
                )
            yield line

    def ready(self) -> bool:
        """The next line can be had without waiting for the input's writer."""
        return self.reader is None or self.reader.ready()

    def __enter__(self) -> "InputLines":
        return self

    def __exit__(self, *exc: object) -> None:
        """Closes the --input file (stdin stays open)."""
        if self.stream is not None and self.input_file != "-":
            self.stream.close()


def chunks(
    checked: Iterable[Checked], num_samples: int, size: int, ready: Callable[[], bool] = lambda: True
) -> Iterator[tuple[list[Checked], int, int]]:
    """The work of `maria infill` in pieces of at most `size` texts x samples, in output order: (lines, first
    sample, samples). Whole texts where a text's samples fit in a piece, else one text's samples `size` at a time
    (their generators are numbered by sample, so the results are the same). `checked` is taken as it comes: a
    piece goes to the model early where ready() says the next text would mean waiting for the input's writer."""
    per = min(num_samples, size)  # samples of a text in one piece
    texts = max(1, size // per)
    checked = iter(checked)
    while piece := list(itertools.islice(checked, 1)):
        while len(piece) < texts and ready() and (more := next(checked, None)) is not None:
            piece.append(more)
        for first in range(0, num_samples, per):
            yield piece, first, min(per, num_samples - first)


def kept_fields(line: Line, from_file: bool) -> dict:
    """What `--json` keeps of an input line beside its results: with --input, its number and a JSONL object's
    other fields (an id, say), so results can be joined back to their input whatever was skipped."""
    if not from_file:
        return {}
    return {"line": line.number, **{key: value for key, value in (line.record or {}).items() if key != "text"}}


def clashing_field(line: Line) -> str:
    """A field of a JSONL line's object that `--json` would write over with a result's own, or ''."""
    taken = {"line", "bundle", *Infilled.FIELDS}
    return next((key for key in line.record or {} if key != "text" and key in taken), "")


def checked_lines(
    lines: Iterable[Line],
    infiller: Infiller,
    skip_invalid: bool,
    where: Callable[[Line], str],
    rerank: bool = False,
    as_json: bool = False,
    report: bool = True,
) -> Iterator[tuple[Line, Prepared]]:
    """(line, its text prepared by Infiller.prepare) for each line whose text encodes, as the lines come; a bad
    line stops the run (naming it) unless skip_invalid, which reports it on stderr (where `report`) and leaves it
    out. With as_json, a JSONL line whose object has a field the results use is bad too (its value would be
    lost)."""
    for line in lines:
        error = line.error
        clash = clashing_field(line) if as_json and not error else ""
        if clash:
            error = (
                f"{where(line)} has the field '{clash}', which --json writes with the result; rename it in the input"
            )
        if not error and line.text is not None:
            try:
                yield line, infiller.prepare(line.text, rerank)
                continue
            except ValueError as problem:
                error = f"{where(line)}: {problem}"
        if not skip_invalid:
            raise ValueError(f"{error} (--skip-invalid fills the other lines)")
        if report:
            typer.secho(f"skipped: {error.translate(CONTROLS)}", fg=typer.colors.YELLOW, err=True)
