"""The shipped model's quality with quantized weights: its fp32 graphs quantized as `maria export --quantize` does
(export/quantize.py, the same functions, after the same offline optimization the shipped graphs had), then
MARIA and the three baselines scored on the held-out windows at MODEL.md's mask rates, beside the fp32 bundle.

    python -m maria_onnx.tools.quantized_quality --windows tests/data/default_model_eval_windows.npy \
        --quantize int8,int4 --out quantized-quality.json

The recipe's checkpoint is not shipped, so the quantized bundles here are not re-exported and not judged by the
export's own check against PyTorch; this measures what quantizing the shipped weights does to the table.
"""

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from maria_onnx.export.quantize import QUANTIZATIONS, quantize, settings
from maria_onnx.runtime.default_model import resolve_bundle
from maria_onnx.runtime.evaluate import draw_masks, evaluate_baselines, evaluate_maria
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.manifest import load_manifest, sha256

from . import held_out_parser, run_main, write_json

RATES = (0.15, 0.5, 0.9)


def quantized_copy(bundle: Path, folder: Path, how: str) -> Path:
    """A copy of the bundle with every graph's weights quantized, its manifest saying so, checksums renewed."""
    shutil.copytree(bundle, folder, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    manifest = load_manifest(folder)
    for spec in manifest.graphs.values():
        quantize(folder / spec.file, how)
    files = {name: sha256(folder / name) for name in manifest.files}
    source = {**manifest.source, "quantization": settings(how), "quantized_from": str(bundle)}
    dataclasses.replace(manifest, quantization=QUANTIZATIONS[how], files=files, source=source).save(folder)
    return folder


def table(infiller: Infiller, windows: np.ndarray, seed: int) -> dict:
    """Per mask rate, MARIA's and the baselines' perplexity and top-1 accuracy."""
    out = {}
    for rate in RATES:
        masks = draw_masks(windows, rate, seed)
        out[str(rate)] = [evaluate_maria(infiller, windows, masks), *evaluate_baselines(infiller, windows, masks)]
    return out


def main(argv=None) -> None:
    parser = held_out_parser(__doc__)
    parser.add_argument("--quantize", default="int8,int4", help="int8, int4 or both")
    args = parser.parse_args(argv)
    kinds = [how for how in args.quantize.split(",") if how]
    unknown = [how for how in kinds if how not in QUANTIZATIONS]
    if unknown or not kinds:
        raise ValueError(f"--quantize takes int8 and int4, got {args.quantize!r}")
    bundle = resolve_bundle(args.model)
    windows = np.load(args.windows).astype(np.int64)
    report: dict = {"bundle": str(bundle), "seed": args.seed, "tables": {}}
    with tempfile.TemporaryDirectory() as work:
        bundles = {"fp32": bundle, **{how: quantized_copy(bundle, Path(work) / how, how) for how in kinds}}
        for name, path in bundles.items():
            report["tables"][name] = table(Infiller(path, device="cpu"), windows, args.seed)
            report[f"{name}_graph_bytes"] = sum(
                (path / spec.file).stat().st_size for spec in load_manifest(path).graphs.values()
            )
    write_json(args.out, report)
    fp32 = report["tables"]["fp32"]
    for name, rates in report["tables"].items():
        for rate, rows in rates.items():
            maria = rows[0]["perplexity"]
            print(
                f"{name} rate {rate}: MARIA {maria:.2f} ({maria / fp32[rate][0]['perplexity'] - 1:+.2%} of fp32), "
                + ", ".join(f"{r['system']} {r['perplexity']:.2f}" for r in rows[1:])
            )
    print(json.dumps({k: v for k, v in report.items() if k.endswith("_bytes")}))


if __name__ == "__main__":
    run_main(main)
