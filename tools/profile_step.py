"""Operator profile of one decoder step, the concat decoder (ar_decoder.onnx) and the engine's step (ar_step.onnx,
the cache written in place): batch 8, 1,024 tokens in the cache, one new token; ONNX Runtime's own profiler over
35 runs. A bundle with both graphs (what `maria bench` exports):

    python -m tools.profile_step BUNDLE OUT.json
"""
import collections
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

bundle, out = sys.argv[1], sys.argv[2]
m = json.load(open(f"{bundle}/maria.json"))
L, kv, hd = m["num_hidden_layers"], m["num_key_value_heads"], m["head_dim"]
b, P, T, runs = 8, 1024, 1, 30
def profile(path, disabled, run_once):
    o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.enable_profiling = True; o.profile_file_prefix = str(Path(out).with_suffix("")) + "-ort"
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    state = {}
    for _ in range(5 + runs): run_once(s, state)
    trace = s.end_profiling()
    ev = json.load(open(trace))
    os.remove(trace)
    node = [e for e in ev if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    agg = collections.Counter(); total = 0
    for e in node: agg[e["args"]["op_name"]] += e["dur"]; total += e["dur"]
    per_run = {k: v / (5 + runs) / 1000 for k, v in agg.most_common()}
    return {"ms_per_step_in_kernels": total / (5 + runs) / 1000,
            "share": {k: round(v / total, 3) for k, v in agg.most_common(8)}, "ms_by_op": {k: round(v, 3) for k, v in list(per_run.items())[:8]}}
def old_once(s, st):
    if not st:
        st["f"] = dict(input_ids=np.full((b, T), 7), attention_mask=np.ones((b, P + T), np.int64),
                       position_ids=np.tile(np.arange(P, P + T), (b, 1)),
                       **{f"past_key_values.{l}.{k}": np.random.rand(b, kv, P, hd).astype(np.float32) for l in range(L) for k in ("key", "value")})
    s.run(None, st["f"])
def new_once(s, st):
    if not st:
        C = P + 64
        st["c"] = [np.random.rand(b, kv, C, hd).astype(np.float32) for i in range(2 * L)]
        bd = s.io_binding()
        for i, a in enumerate(st["c"]):
            n = f"cache.{i // 2}.{'key' if i % 2 == 0 else 'value'}"
            bd.bind_input(n, "cpu", 0, np.float32, a.shape, a.ctypes.data); bd.bind_output(n.replace("cache.", "cache_out."), "cpu", 0, np.float32, a.shape, a.ctypes.data)
        st["b"] = bd
    bd = st["b"]; bd.bind_cpu_input("input_ids", np.full((b, T), 7)); bd.bind_cpu_input("position_ids", np.tile(np.arange(P, P + T), (b, 1)))
    bd.bind_output("last_hidden_state", "cpu"); s.run_with_iobinding(bd)
report = {"shape": {"batch": b, "cached_tokens": P, "new_tokens": T, "layers": L, "kv_heads": kv, "head_dim": hd},
          "ar_decoder (concat)": profile(f"{bundle}/ar_decoder.onnx", [], old_once),
          "ar_step (in place, capacity 1088)": profile(f"{bundle}/ar_step.onnx", ["MatMulScaleFusion"], new_once)}
json.dump(report, open(out, "w"), indent=2); print(json.dumps(report, indent=2))
