"""`maria generate`: samples by simulated annealing, printed a group at a time."""

import json
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress

from maria_onnx.runtime.anneal import AnnealRequest, Schedule, anneal, encode_ends
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.device import check_device
from maria_onnx.runtime.infiller import Infiller

from .fill import CHUNK_BATCHES
from .outputs import NEWLINES, results_to_stdout


def generate_samples(
    length: int,
    prefix: str,
    suffix: str,
    num_samples: int,
    schedule: Schedule,
    sampling: Sampling,
    model: Path | None,
    batch_size: int = 8,
    as_json: bool = False,
    device: str = "auto",
    threads: int | None = None,
    speculate: int = 0,
) -> None:
    """Generates num_samples texts of `length` tokens between prefix and suffix, CHUNK_BATCHES batches of samples
    annealed together and printed before the next group starts; progress on stderr where it is a terminal."""
    check_device(device)
    infiller = Infiller(model, device=device, threads=threads, speculate=speculate)
    if not infiller.manifest.has_baseline_heads:
        raise ValueError(
            "generation needs the AR's whole-text score, and this bundle has no ar_lm_head.onnx; "
            "re-export it with `maria export`"
        )
    ends = encode_ends(infiller, prefix, suffix)
    console = Console(stderr=True)
    group = CHUNK_BATCHES * batch_size  # samples annealed together, printed before the next group starts
    with Progress(transient=True, console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("annealing", total=schedule.steps + 1)
        for first in range(0, num_samples, group):
            samples = min(group, num_samples - first)
            which = f"samples {first + 1}-{first + samples} of {num_samples}, " if samples < num_samples else ""

            def stepped(step: int, energies: np.ndarray, which: str = which) -> None:
                description = f"{which}step {step}: mean energy {energies.mean():.1f}"
                progress.update(task, completed=step + 1, description=description)

            results = anneal(
                infiller,
                AnnealRequest(*ends, length, samples, schedule, sampling),
                on_step=stepped,
                batch_size=batch_size,
                first_sample=first,
            )
            with results_to_stdout():
                for result in results:
                    typer.echo(
                        json.dumps(result.to_dict(), ensure_ascii=False) if as_json else result.text.translate(NEWLINES)
                    )
