"""Unconditional generation: generative perplexity under the AR against wall-clock time (the paper's Figure 5).

    python -m maria_onnx.tools.bench_generate --out docs/bench-generate-cpu --length 32 --samples 16 --steps 0,4,16,64

Systems, each generating `samples` texts of `length` tokens from nothing, in one batch, the same seeds:
    AR sampling        the AR alone, left to right (its LM head), temperature 1
    MARIA, K steps     one-shot MARIA sampling (K = 0), then K steps of simulated annealing (runtime/anneal.py)
Generative perplexity: exp of the mean over samples of -log p_AR(text) / length. Each system runs `repeats`
times, interleaved; times are medians.
"""

import argparse
import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from maria_onnx.runtime.anneal import AnnealRequest, Schedule, anneal
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.likelihood import ar_loglikelihood, ar_sample

from . import run_main, save_figure, write_json


def generative_perplexity(infiller, ids: list) -> float:
    """exp of the mean per-token negative log-likelihood under the AR, averaged over texts."""
    lengths = np.array([len(x) for x in ids])
    loglik = np.array(ar_loglikelihood(infiller.backend, [np.asarray(x) for x in ids], infiller.special))
    return float(np.exp(np.mean(-loglik / lengths)))


def run_ar(infiller, length: int, samples: int, seed: int) -> list:
    rngs = [np.random.default_rng([seed, sample]) for sample in range(samples)]
    return ar_sample(
        infiller.backend, [np.zeros(0, np.int64)] * samples, length, infiller.special, Sampling(temperature=1.0), rngs
    )


def run_maria(infiller, length: int, samples: int, steps: int, seed: int, schedule: dict) -> list:
    empty = np.zeros(0, np.int64)
    request = AnnealRequest(empty, empty, length, samples, Schedule(steps=steps, **schedule), Sampling(1.0, seed=seed))
    results = anneal(infiller, request)
    return [np.array(r.ids) for r in results]


def measure(
    infiller, length: int, samples: int, steps: list[int], repeats: int, seed: int, schedule: dict
) -> list[dict]:
    systems: dict[str, Callable[[], list]] = {"AR sampling": lambda: run_ar(infiller, length, samples, seed)}
    for k in steps:
        systems[f"MARIA, K={k}"] = functools.partial(run_maria, infiller, length, samples, k, seed, schedule)
    systems["AR sampling"]()  # warm-up: sessions and allocations, not counted
    systems[f"MARIA, K={steps[0]}"]()
    times: dict[str, list[float]] = {name: [] for name in systems}
    outputs: dict[str, list] = {}
    for _ in range(repeats):
        for name, fill in systems.items():
            began = time.perf_counter()
            outputs[name] = fill()
            times[name].append(time.perf_counter() - began)
    rows = []
    for name in systems:
        rows.append(
            {
                "system": name,
                "seconds_median": statistics.median(times[name]),
                "seconds_min": min(times[name]),
                "seconds_max": max(times[name]),
                "generative_perplexity": generative_perplexity(infiller, outputs[name]),
                "example": infiller.tokenizer.decode(np.asarray(outputs[name][0]).tolist()),
            }
        )
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    maria = [r for r in rows if r["system"].startswith("MARIA")]
    axis.plot(
        [r["seconds_median"] for r in maria],
        [r["generative_perplexity"] for r in maria],
        "-o",
        label="MARIA + annealing",
    )
    for r in maria:
        axis.annotate(
            r["system"].split(", ")[1],
            (r["seconds_median"], r["generative_perplexity"]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    ar = next(r for r in rows if r["system"] == "AR sampling")
    axis.plot([ar["seconds_median"]], [ar["generative_perplexity"]], "s", color="C3", label="AR sampling")
    axis.set(xscale="log", xlabel="wall-clock seconds (median)", ylabel="generative perplexity (AR)", title=title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a bundle; default: the shipped model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", default="0,4,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", default="{}", help="JSON of runtime.anneal.Schedule fields other than steps")
    args = parser.parse_args()
    try:
        steps, schedule = [int(k) for k in args.steps.split(",")], json.loads(args.schedule)
    except ValueError:
        raise ValueError(
            f"--steps takes comma-separated integers and --schedule a JSON object; got "
            f"{args.steps!r} and {args.schedule!r}"
        ) from None
    known = {field.name for field in dataclasses.fields(Schedule)} - {"steps"}
    if not isinstance(schedule, dict) or set(schedule) - known:
        raise ValueError(f"--schedule takes a JSON object of {', '.join(sorted(known))}; got {args.schedule!r}")
    infiller = Infiller(args.model, device="cpu")
    rows = measure(infiller, args.length, args.samples, steps, args.repeats, args.seed, schedule)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "length": args.length,
        "samples": args.samples,
        "repeats": args.repeats,
        "seed": args.seed,
        "steps": steps,
        "schedule": {k: v for k, v in {**dataclasses.asdict(Schedule()), **schedule}.items() if k != "steps"},
        "rows": rows,
    }
    write_json(args.out / "bench-generate.json", report)
    plot(rows, args.out / "bench-generate.png", f"{args.samples} texts of {args.length} tokens")
    for r in rows:
        print(
            f"{r['system']:>14}  {r['seconds_median']:8.2f} s  generative perplexity {r['generative_perplexity']:.1f}"
        )


if __name__ == "__main__":
    run_main(main)
