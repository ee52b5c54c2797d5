"""`maria infill`: texts (arguments, a file, stdin) -> fills printed as they are done, a piece at a time."""

import collections
import functools
import sys
from pathlib import Path

import typer

from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.device import check_device
from maria_onnx.runtime.infiller import FillRequest, Infiller

from .inputs import InputLines, checked_lines, chunks, kept_fields
from .outputs import Ranked, fail, printed, results_to_stdout, shown, warnings_shown

# Batches of texts x samples filled before their results are printed: the first line comes early and memory stays
# bounded, in the same total time (docs/benchmarks.md, "Smaller measurements").
CHUNK_BATCHES = 16


def fill_texts(
    texts: list[str],
    input_file: str | None,
    input_format: str | None,
    model: Path | None,
    sampling: Sampling,
    batch_size: int = 8,
    num_samples: int = 1,
    rerank: bool = False,
    skip_invalid: bool = False,
    as_json: bool = False,
    device: str = "auto",
    threads: int | None = None,
    decoder: str = "auto",
    speculate: int = 0,
) -> None:
    """Fills every text (the arguments, or --input's lines as they come) and prints each result: a piece of
    CHUNK_BATCHES batches at a time, before the next piece is filled."""
    check_device(device)
    with InputLines(texts or [], input_file, input_format) as lines:
        nothing = f"note: {lines.name} holds no text (no line but blank ones); nothing to fill"
        if lines.whole and next(iter(lines), None) is None:
            typer.echo(nothing, err=True)
            return
        with warnings_shown():
            infiller = Infiller(model, device=device, decoder=decoder, threads=threads, speculate=speculate)
        where = (lambda line: f"{lines.name}:{line.number}") if input_file else (lambda line: f"text {line.number}")
        check = functools.partial(
            checked_lines, infiller=infiller, skip_invalid=skip_invalid, where=where, rerank=rerank, as_json=as_json
        )
        if lines.whole:  # read twice: a bad line stops the run before anything is filled
            collections.deque(check(lines), maxlen=0)
        if num_samples > 1 and sampling.greedy:
            typer.echo(
                f"note: --temperature 0 is greedy: the {num_samples} samples of each text are identical", err=True
            )
        styled = sys.stdout.isatty() and not as_json
        bundle = {"dtype": infiller.manifest.dtype, "quantization": infiller.manifest.quantization}
        size = CHUNK_BATCHES * batch_size
        ranked = Ranked() if rerank and num_samples > size else None  # a text's samples come in several pieces
        written = 0
        try:
            for chunk, first, samples in chunks(check(lines, report=not lines.whole), num_samples, size, lines.ready):
                request = FillRequest(
                    [prepared for _, prepared in chunk],
                    sampling,
                    samples,
                    rerank,
                    indices=[line.number - 1 for line, _ in chunk],
                    first_sample=first,
                )
                results = infiller.infill_requests([request], batch_size=batch_size)[0]
                with results_to_stdout():  # each chunk's results are printed before the next is filled
                    for number, result in enumerate(results):
                        line = chunk[number // samples][0]
                        note = f"note: {where(line)}: {result.note}" if result.note and not as_json else ""
                        output = shown(result, as_json, styled, kept_fields(line, bool(input_file)), bundle)
                        if ranked is None:
                            printed(note, output)
                        else:
                            assert result.score is not None, "--rerank scores every sample"
                            ranked.add(result.score, first + number, note, output)
                    if ranked is None:
                        written += len(results)
                    elif first + samples == num_samples:
                        written += ranked.print_all()
        except KeyboardInterrupt:
            fail("interrupted before every result was written; the output is incomplete", code=130)
        except ValueError as error:  # a bad line of a stream, met after the lines before it were filled
            done = f"; the output holds only what was filled before it ({written} result{'s' * (written != 1)})"
            raise ValueError(f"{error}{done * bool(written)}") from None
        if not lines.whole and not lines.count:
            typer.echo(nothing, err=True)
