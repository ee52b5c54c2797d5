"""ONNX Runtime's thread pools sized three ways, side by side in one process: `python -m maria_onnx.tools.bench_threads
[--model BUNDLE] --threads ort,auto,8 --repeats 20`. `ort` is ONNX Runtime's own choice (one thread per physical
core of the machine, pinned), `auto` the runtime's default (runtime/cpus.py), a number that many threads per
session. Each setting fills the same texts (greedy, so the fills must agree) at batch 1 and 8, repetitions
interleaved after a warm-up; it prints the medians and, per repetition, each setting's time over the first's.
Run it inside the limits to compare (taskset, a cgroup's cpuset or CPU quota)."""

import argparse
import json
import os
import statistics
import time

import numpy as np

from maria_onnx.runtime import sessions
from maria_onnx.runtime.cpus import cpu_quota, session_threads, usable_cpus
from maria_onnx.runtime.infiller import Infiller

TEXT = " ".join(["The [MASK] statement is used to [MASK] an exception."] * 9)  # 117 tokens, 18 masked


def infiller(model, setting: str) -> Infiller:
    if setting != "ort":
        return Infiller(model, device="cpu", threads=None if setting == "auto" else int(setting))
    chosen, sessions.session_threads = sessions.session_threads, lambda threads=None: None
    try:
        return Infiller(model, device="cpu")
    finally:
        sessions.session_threads = chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="A bundle; default: the shipped model.")
    parser.add_argument("--threads", default="ort,auto", help="Comma-separated: ort, auto, or a number.")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    settings = args.threads.split(",")
    infillers = {setting: infiller(args.model, setting) for setting in settings}
    print(
        json.dumps(
            {"cpus": os.cpu_count(), "usable": usable_cpus(), "quota": cpu_quota(), "auto_threads": session_threads()}
        )
    )
    for batch in map(int, args.batch_sizes.split(",")):
        texts = [TEXT] * batch
        fills = {setting: [r.text for r in each.infill(texts)] for setting, each in infillers.items()}  # warm-up
        assert all(fill == fills[settings[0]] for fill in fills.values()), "the settings filled differently"
        times: dict = {setting: [] for setting in settings}
        for _ in range(args.repeats):
            for setting, each in infillers.items():
                began = time.perf_counter()
                each.infill(texts)
                times[setting].append(time.perf_counter() - began)
        first = np.array(times[settings[0]])
        for setting, seconds in times.items():
            q25, q50, q75 = np.percentile(np.array(seconds) / first, [25, 50, 75])
            print(
                json.dumps(
                    {
                        "batch": batch,
                        "threads": setting,
                        "median_ms": round(statistics.median(seconds) * 1e3, 1),
                        f"over_{settings[0]}": round(q50, 3),
                        "quartiles": [round(q25, 3), round(q75, 3)],
                    }
                )
            )


if __name__ == "__main__":
    main()
