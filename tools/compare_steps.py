"""Two bundles' decode steps (ar_step.onnx) side by side: the same shapes, runs interleaved (A, B, A, B, ...) after a
warm-up, so a noisy machine slows both alike; medians with quartiles and the ratio B / A. For a change to the
step graph, or fp32 against quantized weights (`maria export --quantize int4`): export both bundles, then

    python -m maria_onnx.tools.compare_steps BUNDLE_A BUNDLE_B OUT.json [--device cuda] [--runs 200]

Shapes: batch 1 and 8, 128 and 1,024 cached tokens (fewer where a model takes fewer), 1 and 4 new tokens, bound as
tools/profile_step.py binds them (inputs and outputs in place on the device).
"""

import argparse
import collections
import time
from pathlib import Path

import onnx

from . import run_main, write_json
from .profile_step import DTYPES, WARMUP, check, engine_step, quartiles_ms

SHAPES = [(1, 128, 1), (1, 1024, 1), (8, 1024, 1), (8, 1024, 4)]  # (batch, cached, new)


def nodes(bundle: Path) -> dict:
    graph = onnx.load(str(bundle / "ar_step.onnx"), load_external_data=False).graph
    return dict(collections.Counter(node.op_type for node in graph.node).most_common())


def main(first: Path, second: Path, out: Path, device: str = "cpu", runs: int = 200) -> dict:
    manifests = [check(bundle, out, device, 1, 0) for bundle in (first, second)]
    if manifests[1].dtype != manifests[0].dtype:
        raise ValueError(
            f"{first} is {manifests[0].dtype} and {second} {manifests[1].dtype}; compare bundles of one dtype"
        )
    if runs < 4:
        raise ValueError(f"--runs must be at least 4, got {runs}")
    dtype = DTYPES[manifests[0].dtype]
    longest = min(m.max_sequence_length for m in manifests)
    report: dict = {
        "device": device,
        "dtype": manifests[0].dtype,
        "runs": runs,
        "bundles": {"A": str(first), "B": str(second)},
        "quantization": {"A": manifests[0].quantization, "B": manifests[1].quantization},
        "nodes": {"A": nodes(first), "B": nodes(second)},
        "shapes": [],
    }
    for batch, cached, new in SHAPES:
        cached = min(cached, longest - new)  # a smaller model: as many as it takes
        steps = {
            name: engine_step(bundle, device, dtype, batch, cached, new)
            for name, bundle in (("A", first), ("B", second))
        }
        for step in steps.values():
            for _ in range(WARMUP):
                step.run()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(runs):
            for name, step in steps.items():
                began = time.perf_counter()
                step.run()
                times[name].append(1000 * (time.perf_counter() - began))
        row: dict = {
            "batch": batch,
            "cached_tokens": cached,
            "new_tokens": new,
            **{name: quartiles_ms(t) for name, t in times.items()},
        }
        row["B_over_A"] = round(row["B"]["median_ms"] / row["A"]["median_ms"], 3)
        report["shapes"].append(row)
        print(
            f"batch {batch}, {cached} cached, {new} new: A {row['A']['median_ms']:.3f} ms, "
            f"B {row['B']['median_ms']:.3f} ms, B/A {row['B_over_A']:.3f}",
            flush=True,
        )
    write_json(out, report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    run_main(main, args.first, args.second, args.out, args.device, args.runs)
