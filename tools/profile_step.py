"""Operator profile of one decoder step, the concat decoder (ar_decoder.onnx) and the engine's step (ar_step.onnx,
the cache written in place): batch 8, 1,024 tokens in the cache, 1 and 4 new tokens (a batch's chunk is as wide
as its longest row's); ONNX Runtime's own profiler, kernel time averaged over 30 runs after 5 warm-up runs. A
bundle with both graphs (what `maria bench` exports):

    python -m tools.profile_step BUNDLE OUT.json
"""
import collections
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

BATCH, CACHED, WARMUP, RUNS = 8, 1024, 5, 30
CAPACITY = CACHED + 64                  # the engine's buffer holds what the step writes, and a block more


def kernel_times(session, run_once) -> dict:
    for _ in range(WARMUP + RUNS):
        run_once()
    trace = session.end_profiling()
    events = json.loads(Path(trace).read_text())
    os.remove(trace)
    by_op, total = collections.Counter(), 0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"]
            total += event["dur"]
    ms = 1000 * (WARMUP + RUNS)
    return {"ms_per_step_in_kernels": round(total / ms, 3),
            "share": {op: round(t / total, 3) for op, t in by_op.most_common(8)},
            "ms_by_op": {op: round(t / ms, 3) for op, t in by_op.most_common(8)}}


def session(path: Path, prefix: str) -> ort.InferenceSession:
    options = ort.SessionOptions()                      # as runtime/sessions.py makes them
    options.enable_profiling, options.profile_file_prefix = True, prefix
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def chunk(new: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((BATCH, new), 7, dtype=np.int64), np.tile(np.arange(CACHED, CACHED + new), (BATCH, 1))


def profile_concat(bundle: Path, prefix: str, new: int) -> dict:
    s = session(bundle / "ar_decoder.onnx", prefix)
    rng = np.random.default_rng(0)
    input_ids, position_ids = chunk(new)
    feeds = {"input_ids": input_ids, "attention_mask": np.ones((BATCH, CACHED + new), np.int64),
             "position_ids": position_ids}
    for value in s.get_inputs()[3:]:
        shape = [BATCH if d == "batch_size" else CACHED if isinstance(d, str) else d for d in value.shape]
        feeds[value.name] = rng.random(shape, dtype=np.float32)
    return kernel_times(s, lambda: s.run(None, feeds))


def profile_step(bundle: Path, prefix: str, new: int) -> dict:
    s = session(bundle / "ar_step.onnx", prefix)
    rng = np.random.default_rng(0)
    binding = s.io_binding()
    binding.bind_output("last_hidden_state", "cpu")
    cache = []
    for value in s.get_inputs()[2:]:
        shape = [BATCH if d == "batch_size" else CAPACITY if d == "capacity" else d for d in value.shape]
        cache.append(rng.random(shape, dtype=np.float32))
        binding.bind_input(value.name, "cpu", 0, np.float32, shape, cache[-1].ctypes.data)
        binding.bind_output(value.name.replace("cache.", "cache_out."), "cpu", 0, np.float32, shape,
                            cache[-1].ctypes.data)
    input_ids, position_ids = chunk(new)

    def run_once():
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("position_ids", position_ids)
        binding.bind_output("last_hidden_state", "cpu")
        s.run_with_iobinding(binding)
    return kernel_times(s, run_once)


def main(bundle: Path, out: Path) -> None:
    m = json.loads((bundle / "maria.json").read_text())
    prefix = str(out.with_suffix("")) + "-ort"
    report = {"shape": {"batch": BATCH, "cached_tokens": CACHED, "step_capacity": CAPACITY,
                        "layers": m["num_hidden_layers"], "kv_heads": m["num_key_value_heads"],
                        "head_dim": m["head_dim"]}}
    for new in (1, 4):
        report[f"{new} new tokens"] = {"ar_decoder (concat)": profile_concat(bundle, prefix, new),
                                       "ar_step (in place)": profile_step(bundle, prefix, new)}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
