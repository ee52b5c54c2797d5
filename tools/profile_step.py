"""Operator profile and timing of one decoder step, the concat decoder (ar_decoder.onnx) and the engine's step
(ar_step.onnx, the cache written in place), on CPU or CUDA: `batch` sequences with `cached` tokens in the cache, 1
and 4 new tokens (a batch's chunk is as wide as its longest row's). A bundle with both graphs (what `maria bench`
exports):

    python -m maria_onnx.tools.profile_step BUNDLE OUT.json [--device cuda] [--batch 8] [--cached 1024]

ONNX Runtime's own profiler gives the time per operator over 30 runs after 5 warm-up runs; on CUDA that is the
host's time to launch each kernel (the kernels run asynchronously), and the profile's worth is in which nodes run
where: `memcpy_nodes` counts copies between host and device inside the step, and `nodes_by_provider` the nodes on
each execution provider. The wall time per step (median of 50 runs, inputs and outputs already on the device) is
taken without the profiler, on CUDA with and without a CUDA graph of the step. On CUDA the report also gives the
step's floor: the bytes one step must read (weights, less embedding tables, of which it reads a row; the KV cache)
over the GPU's memory bandwidth, measured here by a device-to-device copy.
"""

import argparse
import collections
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from maria_onnx.runtime.manifest import Manifest, load_manifest
from maria_onnx.runtime.sessions import cuda_missing, cuda_providers

from . import run_main, write_json

WARMUP, RUNS, TIMED = 5, 30, 50
DTYPES = {"fp32": np.float32, "fp16": np.float16}


def kernel_times(session, run_once) -> dict:
    for _ in range(WARMUP + RUNS):
        run_once()
    trace = session.end_profiling()
    events = json.loads(Path(trace).read_text())
    os.remove(trace)
    by_op: collections.Counter = collections.Counter()
    nodes: collections.Counter = collections.Counter()
    providers: collections.Counter = collections.Counter()
    total = 0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
            providers[event["args"].get("provider", "?")] += 1
            total += event["dur"]
    ms, runs = 1000 * (WARMUP + RUNS), WARMUP + RUNS
    return {
        "ms_per_step_in_kernels": round(total / ms, 3),
        "share": {op: round(t / total, 3) for op, t in by_op.most_common(8)},
        "ms_by_op": {op: round(t / ms, 3) for op, t in by_op.most_common()},  # every op, costliest first
        "memcpy_nodes": sum(n for op, n in nodes.items() if op.startswith("Memcpy")) // runs,
        "nodes_by_provider": {p: n // runs for p, n in providers.items()},
    }


def wall_ms(run_once) -> dict:
    for _ in range(WARMUP):
        run_once()
    times = []
    for _ in range(TIMED):
        start = time.perf_counter()
        run_once()  # ONNX Runtime waits for the device at the end of a run
        times.append(1000 * (time.perf_counter() - start))
    return quartiles_ms(times)


def quartiles_ms(times: list[float]) -> dict:
    """Median and quartiles of times in milliseconds."""
    quartiles = statistics.quantiles(times, n=4)
    return {
        "median_ms": round(statistics.median(times), 4),
        "q1_ms": round(quartiles[0], 4),
        "q3_ms": round(quartiles[2], 4),
    }


class Step:
    """One graph's session with every input and output bound once (on the device where there is one)."""

    def __init__(self, path: Path, device: str, dtype, profile_prefix: str | None = None, cuda_graph=False):
        options = ort.SessionOptions()  # as runtime/sessions.py makes them
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix:
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        providers: list = ["CPUExecutionProvider"]
        if device == "cuda":
            (name, settings), *rest = cuda_providers(0)
            providers = [(name, {**settings, **({"enable_cuda_graph": "1"} if cuda_graph else {})}), *rest]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.device, self.dtype, self.binding = device, dtype, self.session.io_binding()
        self.values: list = []  # what the binding points at, kept alive with it

    def bind(self, name: str, array: np.ndarray, output: str | None = None) -> None:
        """Binds array (copied to the device) as input `name`, and the same memory as output `output`."""
        value = ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)
        self.values.append(value)
        self.binding.bind_ortvalue_input(name, value)
        if output:
            self.binding.bind_ortvalue_output(output, value)

    def bind_output(self, name: str, shape: list) -> None:
        value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0)
        self.values.append(value)
        self.binding.bind_ortvalue_output(name, value)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)


def concat_step(bundle: Path, device: str, dtype, batch: int, cached: int, new: int, **options) -> Step:
    """ar_decoder.onnx: the past bound as inputs; present (the past grown by the chunk) to fresh device memory."""
    s = Step(bundle / "ar_decoder.onnx", device, dtype, **options)
    rng = np.random.default_rng(0)
    s.bind("input_ids", np.full((batch, new), 7, dtype=np.int64))
    s.bind("attention_mask", np.ones((batch, cached + new), np.int64))
    s.bind("position_ids", np.tile(np.arange(cached, cached + new), (batch, 1)))
    for value in s.session.get_inputs()[3:]:
        shape = [batch if d == "batch_size" else cached if isinstance(d, str) else d for d in value.shape]
        s.bind(value.name, rng.random(shape, dtype=np.float32).astype(dtype))
    kv_heads, head_dim = s.session.get_inputs()[3].shape[1], s.session.get_inputs()[3].shape[3]
    for value in s.session.get_outputs():
        s.bind_output(
            value.name,
            [batch, kv_heads, cached + new, head_dim]
            if value.name.startswith("present")
            else [batch, new, value.shape[-1]],
        )
    return s


def engine_step(bundle: Path, device: str, dtype, batch: int, cached: int, new: int, **options) -> Step:
    """ar_step.onnx: each cache buffer bound as both the cache.* input and the cache_out.* output."""
    s = Step(bundle / "ar_step.onnx", device, dtype, **options)
    rng = np.random.default_rng(0)
    s.bind("input_ids", np.full((batch, new), 7, dtype=np.int64))
    s.bind("position_ids", np.tile(np.arange(cached, cached + new), (batch, 1)))
    capacity = cached + 64  # the engine's buffer holds what the step writes, and a block more
    for value in s.session.get_inputs()[2:]:
        shape = [batch if d == "batch_size" else capacity if d == "capacity" else d for d in value.shape]
        s.bind(
            value.name,
            rng.random(shape, dtype=np.float32).astype(dtype),
            output=value.name.replace("cache.", "cache_out."),
        )
    hidden = s.session.get_outputs()[0]
    s.bind_output(hidden.name, [batch, new, hidden.shape[-1]])
    return s


def weight_bytes(path: Path) -> tuple[int, int]:
    """(bytes of all initializers, bytes of those only gathered from: embedding tables)."""
    model = onnx.load(str(path), load_external_data=False)
    gathered = {node.input[0] for node in model.graph.node if node.op_type == "Gather"}
    sizes = {
        t.name: int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
    }
    return sum(sizes.values()), sum(size for name, size in sizes.items() if name in gathered)


def copy_bandwidth_gbs() -> float | None:
    """The GPU's memory bandwidth by a device-to-device copy of 1 GiB (bytes read and written), through PyTorch;
    None without it."""
    try:
        import torch
    except ImportError:
        return None
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return round(2 * 20 * (1 << 30) / (start.elapsed_time(end) / 1000) / 1e9, 1)


def floor(bundle: Path, m: Manifest, batch: int, cached: int, itemsize: int) -> dict:
    total, gathered = weight_bytes(bundle / "ar_step.onnx")
    cache = 2 * m.num_hidden_layers * batch * m.num_key_value_heads * cached * m.head_dim * itemsize
    bandwidth = copy_bandwidth_gbs()
    read = total - gathered + cache
    return {
        "weights_gb": round(total / 1e9, 3),
        "embedding_tables_gb": round(gathered / 1e9, 3),
        "kv_cache_read_gb": round(cache / 1e9, 3),
        "bytes_read_per_step_gb": round(read / 1e9, 3),
        "copy_bandwidth_gbs": bandwidth,
        "floor_ms": round(read / (bandwidth * 1e9) * 1000, 4) if bandwidth else None,
    }


def check(bundle: Path, out: Path, device: str, batch: int, cached: int) -> Manifest:
    """The bundle's manifest, or ValueError naming what stops the profile (a bundle without the step graph, an
    empty shape, CUDA that cannot start, an output without a folder) before any session is made."""
    manifest = load_manifest(bundle)
    if "ar_step" not in manifest.graphs:
        raise ValueError(f"{bundle} has no ar_step.onnx (the engine's step); re-export it with `maria export`")
    if batch < 1 or cached < 0:
        raise ValueError(f"--batch must be at least 1 and --cached at least 0; got {batch} and {cached}")
    if device == "cuda" and cuda_missing():
        raise ValueError(f"--device cuda: {cuda_missing()}")
    if not out.parent.is_dir():
        raise ValueError(f"{out}: no folder {out.parent}; give a path in an existing folder")
    return manifest


def main(bundle: Path, out: Path, device: str = "cpu", batch: int = 8, cached: int = 1024) -> dict:
    m = check(bundle, out, device, batch, cached)
    dtype = DTYPES[m.dtype]
    prefix = str(out.with_suffix("")) + "-ort"
    report = {
        "device": device,
        "dtype": m.dtype,
        "quantization": m.quantization,  # the floor counts the weights as stored: int4 blocks and their scales
        "shape": {
            "batch": batch,
            "cached_tokens": cached,
            "layers": m.num_hidden_layers,
            "kv_heads": m.num_key_value_heads,
            "head_dim": m.head_dim,
        },
    }
    graphs = {"ar_decoder (concat)": concat_step, "ar_step (in place)": engine_step}
    if "ar_decoder" not in m.graphs:
        del graphs["ar_decoder (concat)"]
    for new in (1, 4):
        report[f"{new} new tokens"] = row = {}
        for name, make in graphs.items():
            profiled = make(bundle, device, dtype, batch, cached, new, profile_prefix=prefix)
            row[name] = {
                **kernel_times(profiled.session, profiled.run),
                "wall": wall_ms(make(bundle, device, dtype, batch, cached, new).run),
            }
            if device == "cuda" and name.startswith("ar_step"):
                row[name]["wall_cuda_graph"] = wall_ms(
                    make(bundle, device, dtype, batch, cached, new, cuda_graph=True).run
                )
    if device == "cuda":
        report["floor"] = floor(bundle, m, batch, cached, np.dtype(dtype).itemsize)
    write_json(out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cached", type=int, default=1024)
    args = parser.parse_args()
    run_main(main, args.bundle, args.out, args.device, args.batch, args.cached)
