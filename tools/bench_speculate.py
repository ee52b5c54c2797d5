"""Would speculative infilling pay? MARIA's single MLM pass already gives a distribution at every masked position
(the bundle's mlm_decoder.onnx head over the MLM's hidden states): its best token is a free draft of that fill. This
measures, on held-out text, how often MARIA's greedy choice (given its own earlier fills) equals that draft, and
the AR steps a text would take if each step fed the drafts of the next k masked positions and kept them up to
the first disagreement (MARIA's own token written there), against one step per masked token today; and what a
step costs as its chunk widens.

    python -m maria_onnx.tools.bench_speculate --windows tests/data/default_model_eval_windows.npy --out speculate.json

Greedy fills are exactly today's whatever the drafts (a step keeps only what MARIA itself chooses), so the steps
are counted on today's greedy fills: no speculative engine is needed to measure them. With --exact N, the engine's
speculative path itself is checked on N held-out texts (the test split's windows, then other documents' windows,
masked at each rate in turn): every greedy fill with --speculate k against one mask a step, the texts sharing
--slots engine slots (1: one text at a time), with the engine's steps and the drafts it fed and kept.
"""

import json
import pydoc
import time

import numpy as np

from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.decode import encode_masked
from maria_onnx.runtime.engine import Engine
from maria_onnx.runtime.evaluate import draw_masks
from maria_onnx.runtime.infiller import Infiller

from . import held_out_parser, run_main, write_json

RATES = (0.15, 0.5, 0.9)
DRAFTS = (2, 4, 8)
STDLIB = ("argparse", "asyncio", "collections", "csv", "dataclasses", "decimal", "email", "functools", "http",
          "itertools", "json", "logging", "pathlib", "re", "sqlite3", "string", "subprocess", "threading",
          "typing", "unittest", "urllib", "xml", "zipfile", "datetime")  # fmt: skip


def steps(agree: np.ndarray, k: int) -> int:
    """AR steps to fill a text whose masked positions agree with their drafts where `agree` holds (in order), each
    step checking the next k drafts and keeping them up to the first disagreement, which MARIA's own token fixes."""
    count, i, total = 0, 0, len(agree)
    while i < total:
        window = agree[i : i + k]
        kept = int(np.argmin(window)) if not window.all() else len(window)
        i += kept if kept == len(window) else kept + 1
        count += 1
    return count


def drafts(infiller: Infiller, ids: list, masked: list) -> list[np.ndarray]:
    """Per text, the MLM's best token at each masked position (special ids never), from the one MLM pass."""
    backend, special = infiller.backend, infiller.special
    hidden = encode_masked(backend, ids, masked, special)
    out = []
    for row, m in enumerate(masked):
        logits = backend.mlm_logits(hidden[row, np.flatnonzero(m) + 1]).astype(np.float64)
        logits[:, special.all] = -np.inf
        out.append(logits.argmax(-1))
    return out


def measure(infiller: Infiller, windows: list[np.ndarray], rate: float, seed: int) -> dict:
    """Agreement of MARIA's greedy fills with the MLM's drafts, and steps per text, at one mask rate."""
    masked = draw_masks(windows, rate, seed)
    keep = [i for i, m in enumerate(masked) if m.any()]
    ids, masked = [windows[i] for i in keep], [masked[i] for i in keep]
    fills = infiller.fill_ids(ids, masked, Sampling(), batch_size=8)
    agree = [f.ids[m] == d for f, m, d in zip(fills, masked, drafts(infiller, ids, masked))]
    masks = sum(len(a) for a in agree)
    return {
        "texts": len(ids),
        "masked_tokens": masks,
        "agreement": float(np.concatenate(agree).mean()),
        "steps_today": masks,
        **{f"steps_k{k}": sum(steps(a, k) for a in agree) for k in DRAFTS},
        **{f"fewer_steps_k{k}": masks / sum(steps(a, k) for a in agree) for k in DRAFTS},
    }


def step_cost(infiller: Infiller, widths=(1, 2, 4, 8, 16), batch: int = 1, cached: int = 128, repeats: int = 20):
    """Median seconds of one step of the step graph feeding `width` tokens per row after `cached` tokens."""
    backend = infiller.backend
    cache = backend.new_cache(batch, cached + max(widths) + 1)
    rng = np.random.default_rng(0)
    prefix = rng.integers(10, infiller.manifest.vocab_size, (batch, cached))
    backend.cache_step(prefix, np.broadcast_to(np.arange(cached), (batch, cached)).copy(), cache)
    out = {}
    for width in widths:
        ids = rng.integers(10, infiller.manifest.vocab_size, (batch, width))
        positions = np.broadcast_to(cached + np.arange(width), (batch, width)).copy()
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            backend.cache_step(ids, positions, cache)
            times.append(time.perf_counter() - began)
        out[width] = float(np.median(times))
    return out


def document_windows(infiller: Infiller, names, length: int = 128, each: int = 8) -> list[np.ndarray]:
    """Windows of `length` tokens of other documents, at most `each` a document: the docstrings of Python
    standard-library modules and their public members (seen by no stage of the shipped model's training)."""
    windows = []
    for name in names:
        text = pydoc.render_doc(name, renderer=pydoc.plaintext)  # type: ignore[attr-defined]
        ids = np.array(infiller.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        windows += [ids[s : s + length] for s in range(0, len(ids) - length + 1, length)][:each]
    return windows


def engine_fills(infiller: Infiller, texts: list, masked: list, speculate: int, slots: int) -> tuple[list, Engine]:
    """Greedy fills through the decode engine Infiller fills with (`slots` slots, texts joining as others finish),
    and that engine, which counts its steps, the drafts it fed and those MARIA kept."""
    engine = infiller.speculating(speculate).new_decoder(slots)
    assert isinstance(engine, Engine), "the exactness check runs the decode engine"
    sequences = [engine.submit(x, m, Sampling(), np.random.default_rng(0)) for x, m in zip(texts, masked)]
    engine.run()
    return [s.fill().ids for s in sequences], engine


def exactness(model, windows: list[np.ndarray], count: int, speculate, seed: int, slots: int) -> dict:
    """Greedy fills of `count` texts (windows, then other documents' windows), masked at RATES in turn, with each
    speculate setting against none: texts whose fills differ (none, if the path is exact), steps and drafts."""
    infiller = Infiller(model, device="cpu")
    texts = (windows + document_windows(infiller, STDLIB, each=count))[:count]
    if len(texts) < count:
        raise ValueError(f"--exact {count}: only {len(texts)} held-out windows; ask for at most that many")
    masked = [draw_masks([x], RATES[i % len(RATES)], seed + i)[0] for i, x in enumerate(texts)]
    keep = [i for i, m in enumerate(masked) if m.any()]
    texts, masked = [texts[i] for i in keep], [masked[i] for i in keep]
    want, plain = engine_fills(infiller, texts, masked, 0, slots)
    report: dict = {
        "texts": len(texts),
        "slots": slots,
        "masked_tokens": int(sum(m.sum() for m in masked)),
        "steps_without": plain.steps,
        "speculate": {},
    }
    for k in speculate:
        got, engine = engine_fills(infiller, texts, masked, k, slots)
        differ = [i for i, (g, w) in enumerate(zip(got, want)) if not np.array_equal(g, w)]
        report["speculate"][str(k)] = {
            "texts_differing": len(differ),
            "first_differing": differ[:10],
            "steps": engine.steps,
            "drafts_fed": engine.drafted,
            "drafts_kept": engine.kept,
        }
    return report


def main(argv=None) -> None:
    parser = held_out_parser(__doc__)
    parser.add_argument("--count", type=int, default=128, help="windows of each set")
    parser.add_argument("--exact", type=int, default=0, help="check greedy exactness on this many texts instead")
    parser.add_argument("--slots", type=int, default=8, help="--exact: engine slots the texts share")
    args = parser.parse_args(argv)
    if args.exact:
        windows = [w.astype(np.int64) for w in np.load(args.windows)]
        report = {"exactness": exactness(args.model, windows, args.exact, (2, 3, 4, 8), args.seed, args.slots)}
        write_json(args.out, report)
        print(json.dumps(report, indent=2))
        return
    infiller = Infiller(args.model, device="cpu")
    sets = {
        "test split": [w.astype(np.int64) for w in np.load(args.windows)[: args.count]],
        "standard-library docstrings": document_windows(infiller, STDLIB)[: args.count],
    }
    report = {
        "sets": {
            name: {str(rate): measure(infiller, windows, rate, args.seed) for rate in RATES}
            for name, windows in sets.items()
        },
        "step_seconds_by_width": {f"batch {b}": step_cost(infiller, batch=b) for b in (1, 8)},
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    run_main(main)
