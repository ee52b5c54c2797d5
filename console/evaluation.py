"""`maria eval`: masked-token perplexity and top-1 accuracy of MARIA and the baselines, as a table."""

from pathlib import Path

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
    backbones_from: Path | None,
    mask_rate: float = 0.5,
    span: bool = False,
    seq_len: int = 128,
    windows: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    as_json: Path | None = None,
    device: str = "auto",
    threads: int | None = None,
) -> None:
    """Prints the table of tools.evaluate.evaluate over text_file's windows (and writes it to as_json)."""
    check_device(device)
    check_mask_rate(mask_rate, "--mask-rate")
    if as_json is not None and as_json.is_dir():
        raise ValueError(f"--json {as_json} is a folder; give a file path, e.g. {as_json / 'eval.json'}")
    if as_json is not None and not as_json.parent.is_dir():
        raise ValueError(
            f"--json {as_json}: the folder {as_json.parent} does not exist; create it or give a path "
            "in an existing folder"
        )
    report = evaluate(
        text_file,
        Infiller(model, device=device, threads=threads),
        mask_rate=mask_rate,
        span=span,
        seq_len=seq_len,
        windows=windows,
        seed=seed,
        batch_size=batch_size,
        backbones_from=backbones_from,
    )
    table = Table(
        title=f"{report['windows']} windows of {seq_len} tokens, mask rate {mask_rate}"
        f"{' (spans)' if span else ''}, seed {seed}"
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
