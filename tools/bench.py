"""`maria bench`: infilling throughput against input length, every system on the same weights and masked inputs,
in one process, repetitions interleaved after a warm-up (the paper's Figure 3, at a 0.5 masking rate).

Systems:
    onnx-cpu / onnx-cuda   the runtime's decode engine (ar_step.onnx: the KV cache written in place)
    onnx-*-concat          the runtime's concat decoder (Optimum's ar_decoder.onnx: the cache copied each step),
                           where the bundle has it
    onnx-cpu-int8          with --quantize int8 (or --int8): the decode engine on an int8 (dynamically quantized)
                           export of the same weights, on the CPU
    onnx-cpu-int4          with --quantize int4: the same on an int4 (weight-only, MatMulNBits) export
    onnx-*-spec            with --speculate K: each engine above again, filling up to K masked positions a step
                           (speculative infilling: drafts from the MLM head, kept while MARIA agrees)
    pytorch                the PyTorch reference: eager, with the AR's KV cache (needs the checkpoint)
    mlm-ar                 the MLM decoded autoregressively: left to right, the MLM re-run after every fill

Inputs are random ids, or with --text windows of a text's tokens: drafts are kept only where text is real.
"""

import functools
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from tokenizers import Tokenizer
from transformers import AutoConfig

from maria_onnx.backbones import max_sequence_length
from maria_onnx.backbones import torch_device as choose_torch_device
from maria_onnx.checkpoint import load_config, load_maria
from maria_onnx.export.bundle import export_bundle
from maria_onnx.export.quantize import QUANTIZATIONS
from maria_onnx.reference import reference_infill
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.device import check_device
from maria_onnx.runtime.evaluate import check_mask_rate, draw_masks
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.manifest import Manifest, load_manifest
from maria_onnx.runtime.sessions import cuda_missing

from . import save_figure, write_json
from .baselines import mlm_autoregressive
from .shapes import load_shapes, model_config, random_checkpoint


def _fill(infiller: Infiller, ids: list, masked: list) -> list:
    """One batch of every sequence at once."""
    return infiller.fill_ids(ids, masked, batch_size=len(ids))


def _systems(
    bundle: Path,
    graphs: dict,
    checkpoint: Path | None,
    device: str,
    mlm_ar: bool,
    dtype: str,
    concat: bool = True,
    quantized: dict | None = None,
    speculate: int = 0,
) -> tuple[dict[str, Callable[[list, list], list]], str]:
    """(name -> fill(ids, masked) for one batch, the torch device); graphs: the bundle's manifest's. concat: the
    concat decoder beside the engine (each holds its own copy of the AR). quantized: "int8" / "int4" -> a bundle whose
    engine runs on the CPU too. speculate: each engine again with that setting ("-spec"). No checkpoint: the ONNX
    systems only."""
    torch_device = choose_torch_device(device)
    systems: dict[str, Callable[[list, list], list]] = {}
    onnx_devices = (
        ["cpu"]
        if device == "cpu"
        else ([device] if device.startswith("cuda") else (["cpu", "cuda"] if cuda_missing() is None else ["cpu"]))
    )
    decoders = [
        d
        for d, graph in (("engine", "ar_step"), ("concat", "ar_decoder"))
        if graph in graphs and (concat or d != "concat")
    ]
    engines = {}
    for onnx_device in onnx_devices:
        for decoder in decoders:
            infiller = Infiller(bundle, device=onnx_device, decoder=decoder)
            name = f"onnx-{infiller.device}" + ("-concat" if decoder == "concat" else "")
            systems[name] = functools.partial(_fill, infiller)
            if decoder == "engine":
                engines[name] = infiller
    for how, path in (quantized or {}).items():
        engines[f"onnx-cpu-{how}"] = Infiller(path, device="cpu", decoder="engine")
        systems[f"onnx-cpu-{how}"] = functools.partial(_fill, engines[f"onnx-cpu-{how}"])
    for name, infiller in engines.items() if speculate else ():
        systems[f"{name}-spec"] = functools.partial(_fill, infiller.speculating(speculate))
    if checkpoint is None:
        return systems, torch_device
    torch_dtype = torch.float16 if dtype == "fp16" and torch_device == "cuda" else torch.float32
    backbones, head, _ = load_maria(checkpoint, device=torch_device, dtype=torch_dtype)
    systems["pytorch"] = lambda ids, masked: reference_infill(backbones, head, ids, masked, Sampling(), len(ids))
    if mlm_ar:
        systems["mlm-ar"] = lambda ids, masked: mlm_autoregressive(backbones, ids, masked)
    return systems, torch_device


def text_tokens(path: Path, bundle: Path, manifest: Manifest) -> np.ndarray:
    """The token ids of --text: a .npy of ids (any shape, read in order), or a UTF-8 text file tokenized with the
    bundle's tokenizer (manifest: the bundle's)."""
    if not path.is_file():
        raise ValueError(f"--text {path}: no such file; give a UTF-8 text file or a .npy of token ids")
    if path.suffix == ".npy":
        ids = np.load(path, allow_pickle=False).ravel()
        if ids.dtype.kind not in "iu" or (ids.size and not 0 <= ids.min() <= ids.max() < manifest.vocab_size):
            raise ValueError(f"--text {path}: holds values that are not token ids in [0, {manifest.vocab_size})")
        return ids.astype(np.int64)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"--text {path} is not UTF-8 text; give a UTF-8 text file or a .npy of token ids") from None
    tokenizer = Tokenizer.from_file(str(bundle / manifest.tokenizer))
    return np.array(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def _inputs(length: int, batch: int, vocab: int, mask_rate: float, seed: int, tokens: np.ndarray | None = None):
    """batch inputs of `length` ids: random ids, or windows of `tokens` taken apart from one another at random."""
    rng = np.random.default_rng([seed, length, batch])
    if tokens is None:
        ids = [rng.integers(6, vocab, length) for _ in range(batch)]
    else:
        starts = rng.choice(len(tokens) // length, batch, replace=False) * length
        ids = [tokens[start : start + length] for start in starts]
    return ids, draw_masks(ids, mask_rate, seed)


def measure(
    systems: dict,
    lengths,
    batch_sizes,
    vocab: int,
    mask_rate: float,
    repeats: int,
    seed: int,
    console: Console,
    mlm_ar_max_tokens: int,
    measured=lambda point: None,
    tokens: np.ndarray | None = None,
) -> list[dict]:
    """Interleaved repetitions after one warm-up call per system and shape; medians with min and max.
    The quadratic mlm-ar baseline runs only where batch x length <= mlm_ar_max_tokens. measured(point) is
    called with each (length, batch)'s rows as they are measured."""
    results = []
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("bench", total=len(lengths) * len(batch_sizes) * (repeats + 1) * len(systems))
        for length in lengths:
            for batch in batch_sizes:
                ids, masked = _inputs(length, batch, vocab, mask_rate, seed, tokens)
                times: dict[str, list[float]] = {
                    name: [] for name in systems if name != "mlm-ar" or batch * length <= mlm_ar_max_tokens
                }
                progress.advance(task, (repeats + 1) * (len(systems) - len(times)))
                for repeat in range(repeats + 1):  # repeat 0 is the warm-up
                    for name in times:
                        fill = systems[name]
                        progress.update(task, description=f"length {length}, batch {batch}: {name}")
                        began = time.perf_counter()
                        fill(ids, masked)
                        if repeat:
                            times[name].append(time.perf_counter() - began)
                        progress.advance(task)
                filled = int(sum(m.sum() for m in masked))
                for name, seconds in times.items():
                    median = statistics.median(seconds)
                    results.append(
                        {
                            "system": name,
                            "length": length,
                            "batch": batch,
                            "filled_tokens": filled,
                            "seconds_median": median,
                            "seconds_min": min(seconds),
                            "seconds_max": max(seconds),
                            "tokens_per_s": length * batch / median,
                            "filled_tokens_per_s": filled / median,
                            "ms_per_filled_token": 1000 * median / filled,
                        }
                    )
                measured(results[-len(times) :])
    return results


def _ratios(results: list[dict]) -> None:
    for row in results:
        onnx = [
            r
            for r in results
            if r["system"].startswith("onnx") and r["length"] == row["length"] and r["batch"] == row["batch"]
        ]
        best = max(onnx, key=lambda r: r["tokens_per_s"]) if onnx else None
        row["vs_onnx"] = row["tokens_per_s"] / best["tokens_per_s"] if best else None


def table(results: list[dict]) -> Table:
    out = Table(title="MARIA infilling throughput (median of the repetitions)")
    for column in ("batch", "length", "system", "tokens/s", "ms/fill", "spread", "x onnx"):
        out.add_column(column, justify="right")
    for r in sorted(results, key=lambda r: (r["batch"], r["length"])):
        spread = (r["seconds_max"] - r["seconds_min"]) / r["seconds_median"]
        out.add_row(
            str(r["batch"]),
            str(r["length"]),
            r["system"],
            f"{r['tokens_per_s']:.0f}",
            f"{r['ms_per_filled_token']:.3f}",
            f"{100 * spread:.0f}%",
            f"{r['vs_onnx']:.2f}",
        )
    return out


def plot(results: list[dict], path: Path, title: str) -> None:
    """Throughput against input length, a colour per system and a line style per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    figure, axis = plt.subplots(figsize=(7, 4.5))
    lengths = sorted({r["length"] for r in results})
    for colour, system in enumerate(dict.fromkeys(r["system"] for r in results)):
        for style, batch in zip(("-", "--", ":", "-."), sorted({r["batch"] for r in results})):
            rows = sorted(
                (r for r in results if r["system"] == system and r["batch"] == batch), key=lambda r: r["length"]
            )
            axis.plot(
                [r["length"] for r in rows],
                [r["tokens_per_s"] for r in rows],
                style,
                marker="o",
                color=f"C{colour}",
                label=f"{system}, batch {batch}",
            )
    axis.set(xscale="log", yscale="log", xlabel="input length (tokens)", ylabel="tokens / s", title=title)
    axis.set_xticks(lengths, labels=[str(n) for n in lengths])
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def random_shapes(checkpoint=None, shapes=None) -> dict | None:
    """The backbone configs to build random weights from (None: bench the trained checkpoint)."""
    if checkpoint is not None and shapes is not None:
        raise ValueError("give either --checkpoint (trained weights) or --shapes (random weights), not both")
    if checkpoint is None and shapes is None:
        shapes = "default"  # the shipped model's shapes: its speed, whatever the weights
    return None if shapes is None else load_shapes(shapes)


def prepare(
    out: Path,
    checkpoint=None,
    bundle=None,
    configs: dict | None = None,
    shapes: str | None = None,
    dtype: str = "fp32",
    console=None,
    quantize: tuple = (),
):
    """The (checkpoint, bundle, {quantization: bundle}) to bench: a trained checkpoint, or random backbones of the
    configs random_shapes read (named `shapes`); a bundle is exported from the checkpoint unless one is given, and
    for each of `quantize` a quantized bundle (the engine only) always, its export's own check judging it as
    `maria export --quantize` does."""
    if configs is not None:
        console.print(f"building random backbones with the '{shapes or 'default'}' shapes")
        checkpoint = random_checkpoint(configs, out / "model")
    if bundle is None:
        bundle = out / f"bundle-{dtype}"
        export_bundle(checkpoint, bundle, dtype=dtype, overwrite=True, console=console)
    quantized = {how: out / f"bundle-{how}" for how in quantize}
    for how, path in quantized.items():
        export_bundle(
            checkpoint,
            path,
            quantize=how,
            overwrite=True,
            console=console,
            baseline_heads=False,
            concat_decoder=False,
        )
    return Path(checkpoint), Path(bundle), quantized


def check_settings(
    mask_rate: float, repeats: int, lengths, batch_sizes, quantize: tuple = (), device: str = "auto", speculate: int = 0
) -> None:
    """Names the first setting maria bench cannot run with."""
    check_mask_rate(mask_rate, "--mask-rate")
    if speculate < 0 or speculate == 1:
        raise ValueError(f"--speculate takes 0 (no -spec rows) or at least 2, got {speculate}")
    unknown = [how for how in quantize if how not in QUANTIZATIONS]
    if unknown:
        raise ValueError(f"--quantize takes {' and '.join(QUANTIZATIONS)}, got {', '.join(unknown)}")
    if quantize and device.startswith("cuda"):
        raise ValueError("--quantize benches quantized bundles on the CPU; use it with --device cpu or auto")
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    if not lengths or min(lengths) < 2:
        raise ValueError(f"--lengths takes input lengths of at least 2 tokens, got {list(lengths)}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes takes batch sizes of at least 1, got {list(batch_sizes)}")


def longest_text(checkpoint, configs: dict | None) -> int:
    """The longest text, in tokens, that the model to bench takes: from the shapes' configs or the checkpoint's
    backbone folders, before anything is built."""
    if configs is not None:
        return max_sequence_length(model_config(configs["mlm"]), model_config(configs["ar"]))
    config = load_config(checkpoint)
    return max_sequence_length(
        *(AutoConfig.from_pretrained(path, local_files_only=True) for path in (config.mlm_path, config.ar_path))
    )


def check_lengths(lengths, longest: int) -> None:
    too_long = [n for n in lengths if n > longest]
    if too_long:
        raise ValueError(
            f"--lengths {too_long} exceed the model's maximum of {longest} tokens; give lengths up to {longest}"
        )


def bench(
    out: Path,
    checkpoint=None,
    bundle=None,
    shapes=None,
    dtype: str = "fp32",
    lengths=(64, 128, 256, 512, 1024),
    batch_sizes=(1, 8),
    mask_rate: float = 0.5,
    repeats: int = 3,
    seed: int = 0,
    device: str = "auto",
    mlm_ar: bool = True,
    mlm_ar_max_tokens: int = 512,
    console: Console | None = None,
    concat: bool = True,
    quantize: tuple = (),
    speculate: int = 0,
    text: Path | None = None,
) -> dict:
    """Runs every system on every (length, batch); writes out/bench.json and out/bench.png; returns the report. A
    bundle without its checkpoint or shapes: the ONNX systems alone."""
    check_device(device)
    console = console or Console(stderr=True)
    check_settings(mask_rate, repeats, lengths, batch_sizes, quantize, device, speculate)
    onnx_only = bundle is not None and checkpoint is None and shapes is None
    if onnx_only and quantize:
        raise ValueError("--quantize exports from --checkpoint (or --shapes); give the checkpoint --model came from")
    configs = None if onnx_only else random_shapes(checkpoint, shapes)  # a bad --shapes is named before --out
    if bundle is None:  # and lengths the model cannot take, before an export of minutes
        check_lengths(lengths, longest_text(checkpoint, configs))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; --out names the folder for bench.json and bench.png")
    out.mkdir(parents=True, exist_ok=True)
    if onnx_only:
        checkpoint, quantized = None, {}
        console.print("note: no --checkpoint: the ONNX systems alone (PyTorch's need the weights --model came from)")
    else:
        checkpoint, bundle, quantized = prepare(out, checkpoint, bundle, configs, shapes, dtype, console, quantize)
    manifest = load_manifest(bundle)
    check_lengths(lengths, manifest.max_sequence_length)
    tokens = None if text is None else text_tokens(Path(text), Path(bundle), manifest)
    if tokens is not None and len(tokens) < max(lengths) * max(batch_sizes):
        raise ValueError(
            f"--text {text} holds {len(tokens)} tokens; the longest length x the largest batch size needs "
            f"{max(lengths) * max(batch_sizes)}"
        )
    systems, torch_device = _systems(
        Path(bundle), manifest.graphs, checkpoint, device, mlm_ar, dtype, concat, quantized, speculate
    )
    report = {
        "bundle": str(bundle),
        "quantized_bundles": {how: str(path) for how, path in quantized.items()},
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "text": None if text is None else str(text),
        "speculate": speculate,
        "shapes": shapes,
        "dtype": manifest.dtype,
        "mask_rate": mask_rate,
        "repeats": repeats,
        "seed": seed,
        "torch_device": torch_device,
        "mlm_ar_max_tokens": mlm_ar_max_tokens,
        "machine": machine(),
        "complete": False,
        "results": [],
    }

    def measured(point: list[dict]) -> None:  # a bench stopped part way keeps, and has shown, what it measured
        _ratios(point)
        if not report["results"]:
            (out / "bench.png").unlink(missing_ok=True)  # the plot of the bench.json this one replaces
        report["results"].extend(point)
        for r in point:
            console.print(
                f"length {r['length']}, batch {r['batch']}: {r['system']} {r['tokens_per_s']:.0f} "
                f"tokens/s, {r['ms_per_filled_token']:.3f} ms per filled token, x onnx {r['vs_onnx']:.2f}"
            )
        write_json(out / "bench.json", report)

    results = measure(
        systems,
        lengths,
        batch_sizes,
        manifest.vocab_size,
        mask_rate,
        repeats,
        seed,
        console,
        mlm_ar_max_tokens,
        measured,
        tokens,
    )
    report["complete"] = True
    write_json(out / "bench.json", report)
    plot(results, out / "bench.png", f"MARIA infilling, mask rate {mask_rate}")
    console.print(table(results))
    console.print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return report
