"""`maria eval`: masked-token perplexity and top-1 accuracy of MARIA and the baselines, as a table."""

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from maria_onnx.runtime.device import check_device
from maria_onnx.runtime.evaluate import check_mask_rate
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.tools import write_json
from maria_onnx.tools.evaluate import evaluate


def evaluate_text(
    text_file: Path,
    model: Path | None,
    as_json: Path | None = None,
    device: str = "auto",
    threads: int | None = None,
    **options: Any,
) -> None:
    """Prints the table of tools.evaluate.evaluate over text_file's windows (and writes it to as_json); options:
    evaluate's (mask_rate, span, seq_len, windows, seed, batch_size, backbones_from)."""
    check_device(device)
    check_mask_rate(options.get("mask_rate", 0.5), "--mask-rate")
    if as_json is not None and as_json.is_dir():
        raise ValueError(f"--json {as_json} is a folder; give a file path, e.g. {as_json / 'eval.json'}")
    if as_json is not None and not as_json.parent.is_dir():
        raise ValueError(
            f"--json {as_json}: the folder {as_json.parent} does not exist; create it or give a path "
            "in an existing folder"
        )
    report = evaluate(text_file, Infiller(model, device=device, threads=threads), **options)
    table = Table(
        title=f"{report['windows']} windows of {report['seq_len']} tokens, mask rate {report['mask_rate']}"
        f"{' (spans)' if report['span'] else ''}, seed {report['seed']}"
    )
    for column in ("system", "perplexity", "top-1 accuracy", "masked tokens"):
        table.add_column(column, justify="right")
    for row in report["rows"]:
        table.add_row(
            row["system"], f"{row['perplexity']:.3f}", f"{row['top1_accuracy']:.3f}", str(row["masked_tokens"])
        )
    Console().print(table)
    if report["note"]:
        typer.echo(f"note: {report['note']}", err=True)
    if as_json:
        write_json(as_json, report)
