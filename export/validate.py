"""Checks an exported bundle against PyTorch before export reports success.

Every graph runs in ONNX Runtime (CPU) on shapes unlike the ones used for tracing (other batch sizes and lengths,
padding, past lengths from zero up) and is compared with the eager modules; then the whole teacher-forced path
is compared end to end. fp32 is held to tight bounds, fp16 to looser ones and top-1 agreement.

Quantized weights (int8, int4) change every output by design, so they are judged at the level quantization
changes: each output's relative error (the norm of the difference over the norm of PyTorch's fp32 output) within
QUANTIZED, and greedy agreement only where the fp32 choice has a clear margin: its best logit ahead of the second
by over CLEAR times the logits' typical error, where quantization cannot flip it. Teacher forced on given text,
and along the decode engine's own greedy fills (PyTorch's choice at each fill, given the engine's earlier ones).
A bundle whose quantized graphs are broken has relative errors near 1 and flipped clear choices.
"""

import gc
from dataclasses import asdict, dataclass

import numpy as np

from maria_onnx.reference import TorchBackend, reference_infill
from maria_onnx.runtime.backend import SpecialIds
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.decode import sequence_rngs, teacher_forced_logits
from maria_onnx.runtime.engine import engine_infill

# variant -> (relative bound on graph outputs and logits, least top-1 agreement of fills end to end)
TOLERANCE = {"fp32": (1e-4, 1.0), "fp16": (3e-2, 0.95)}
# quantized variant -> (bound on each output's relative error, least agreement where fp32's choice is clear).
# Measured largest relative errors (random weights, whose outputs move most): int8 0.012 at the tests' tiny shapes,
# 0.15 at OLMo-1B's; int4 0.096 and 0.54. A broken graph is at 1 or over (zeroed: 1, unrelated: about 1.4).
QUANTIZED = {"int8": (0.25, 0.95), "int4": (0.75, 0.95)}
CLEAR = 6.0  # a clear choice: a margin of over CLEAR x the logits' RMS error (flips seen: up to 3.3x)


class ValidationError(ValueError):
    pass


@dataclass
class Check:
    graph: str
    output: str
    case: str
    max_abs_diff: float
    tolerance: float
    relative_error: float = 0.0  # |got - want| / |want|, the norms over the whole output


def _compare(checks: list, graph: str, output: str, case: str, got, want, bound: float):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{graph} {output}: shape {got.shape} vs PyTorch {want.shape} on {case}"
    tolerance = bound * max(1.0, float(np.abs(want).max()))
    relative = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    checks.append(Check(graph, output, case, float(np.abs(got - want).max()), tolerance, relative))


def _check_mlm(checks, onnx, torch_backend, rng, vocab, bound):
    for lengths in ([7], [23, 9, 16]):
        ids = np.zeros((len(lengths), max(lengths)), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, n in enumerate(lengths):
            ids[row, :n], mask[row, :n] = rng.integers(5, vocab, n), 1
        got, want = onnx.mlm_hidden(ids, mask), torch_backend.mlm_hidden(ids, mask)
        real = mask.astype(bool)
        _compare(
            checks, "mlm", "hidden_states", f"batch {len(lengths)}, lengths {lengths}", got[real], want[real], bound
        )


def _check_ar(checks, onnx, torch_backend, rng, vocab, bound):
    """Chunks of per-row lengths through the KV cache (first with an empty past) against one full pass."""
    for schedule in ([[6], [1], [1], [4]], [[5, 2, 7], [1, 1, 1], [3, 0, 1], [1, 2, 1]]):
        batch = len(schedule[0])
        past, mask, all_ids, all_pos, real = onnx.empty_past(batch), np.zeros((batch, 0), np.int64), [], [], []
        cursor, steps = np.zeros(batch, np.int64), []
        for lengths in schedule:
            width, lengths = max(lengths), np.array(lengths)
            ids = rng.integers(5, vocab, (batch, width))
            chunk_mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int64)
            position_ids = cursor[:, None] + np.arange(width)[None]
            mask = np.concatenate([mask, chunk_mask], axis=1)
            hidden, past = onnx.ar_step(ids, mask, position_ids, past)
            steps.append(hidden)
            all_ids, all_pos, real = all_ids + [ids], all_pos + [position_ids], real + [chunk_mask.astype(bool)]
            cursor = cursor + lengths
        full, _ = torch_backend.ar_step(
            np.concatenate(all_ids, 1), mask, np.concatenate(all_pos, 1), torch_backend.empty_past(batch)
        )
        got, real = np.concatenate(steps, axis=1), np.concatenate(real, axis=1)
        _compare(
            checks,
            "ar_decoder" if onnx.ar is not None else "ar_step",
            "last_hidden_state",
            f"batch {batch}, chunks {schedule} from an empty past",
            got[real],
            full[real],
            bound,
        )


def _check_step(checks, onnx, torch_backend, rng, vocab, bound):
    """Ragged chunks per row through the slot cache, the first rows of 4 slots, the cache resized midway; each
    row against one full pass over its own tokens."""
    lengths = np.array([[5, 2, 7], [1, 1, 1], [3, 1, 1], [1, 2, 9]])
    batch, cache = lengths.shape[1], onnx.new_cache(4, 8)
    tokens = rng.integers(5, vocab, (batch, int(lengths.sum(0).max())))
    cursor, got = np.zeros(batch, np.int64), [[] for _ in range(batch)]
    for chunk in lengths:
        width = int(chunk.max())
        if int(cursor.max()) + width > cache.capacity:
            cache.resize(int(cursor.max()) + width)
        ids = np.full((batch, width), 1, np.int64)
        for row in range(batch):
            ids[row, : chunk[row]] = tokens[row, cursor[row] : cursor[row] + chunk[row]]
        hidden = onnx.cache_step(ids, cursor[:, None] + np.arange(width)[None], cache)
        for row in range(batch):
            got[row].append(hidden[row, : chunk[row]])
        cursor += chunk
    for row in range(batch):
        n = int(cursor[row])
        full, _ = torch_backend.ar_step(
            tokens[row : row + 1, :n], np.ones((1, n), np.int64), np.arange(n)[None], torch_backend.empty_past(1)
        )
        _compare(
            checks,
            "ar_step",
            "last_hidden_state",
            f"row {row} of 3 in 4 slots, chunks {lengths[:, row]}",
            np.concatenate(got[row]),
            full[0],
            bound,
        )


HEADS = {  # graph: its logits on a backend, from the MLM's and the AR's hidden states
    "fusion_head": lambda backend, mlm, ar: backend.fuse(mlm, ar),
    "ar_lm_head": lambda backend, mlm, ar: backend.ar_logits(ar),
    "mlm_decoder": lambda backend, mlm, ar: backend.mlm_logits(mlm),
}


def _check_heads(checks, onnx, torch_backend, rng, bound, names):
    """Each named head's logits on random hidden states, at batch 1 and 5."""
    m = onnx.manifest
    for batch in (1, 5):
        mlm = rng.standard_normal((batch, m.mlm_hidden_size)).astype(onnx.dtype)
        ar = rng.standard_normal((batch, m.ar_hidden_size)).astype(onnx.dtype)
        for name in names:
            call = HEADS[name]
            want = call(torch_backend, mlm.astype(np.float32), ar.astype(np.float32))
            _compare(checks, name, "logits", f"batch {batch}", call(onnx, mlm, ar), want, bound)


def _end_to_end(onnx, torch_backend, special: SpecialIds, rng, vocab, bound, agreement):
    """Teacher-forced logits at masked positions, mask rate 0.5, a padded batch of 4; and the decode engine's
    greedy fills of the same texts, against PyTorch's."""
    ids = [rng.integers(5, vocab, n) for n in (12, 31, 5, 20)]
    masked = [rng.random(len(x)) < 0.5 for x in ids]
    for m in masked:
        m[0] = True
    got, want = _logits(onnx, ids, masked, special), _logits(torch_backend, ids, masked, special)
    finite = np.isfinite(want)
    error = got[finite] - want[finite]
    noise = float(np.sqrt(np.mean(error**2)))  # the logits' RMS error
    clear = _margins(want) > CLEAR * noise
    fills = [
        f.ids
        for f in engine_infill(
            onnx, ids, masked, special, Sampling(), 2, sequence_rngs(0, len(ids)), utf8=torch_backend.backbones.utf8
        )
    ]  # the reference's rule too
    wanted = [f.ids for f in reference_infill(torch_backend.backbones, torch_backend.head, ids, masked)]
    same = float(np.mean(np.concatenate([a[m] == b[m] for a, b, m in zip(fills, wanted, masked)])))
    free = [f.ids for f in engine_infill(onnx, ids, masked, special, Sampling(), 2, sequence_rngs(0, len(ids)))]
    on_path = _logits(torch_backend, free, masked, special)  # PyTorch's choice at each fill, given the engine's
    path_clear = _margins(on_path) > CLEAR * noise  # (free of the UTF-8 rule, which refuses some best choices)
    chosen = np.concatenate([f[m] for f, m in zip(free, masked)])
    return {
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        "least_top1_agreement": agreement,
        "max_abs_logit_diff": float(np.abs(error).max()),
        "tolerance": bound * max(1.0, float(np.abs(want[finite]).max())),
        "masked_tokens": int(len(want)),
        "engine_greedy_fill_agreement": same,
        "logits_relative_error": float(np.linalg.norm(error) / np.linalg.norm(want[finite])),
        "logits_rms_error": noise,
        "clear_choices": int(clear.sum()),
        "clear_top1_agreement": _share(got.argmax(-1) == want.argmax(-1), clear),
        "engine_clear_choices": int(path_clear.sum()),
        "engine_clear_agreement": _share(chosen == on_path.argmax(-1), path_clear),
    }


def _logits(backend, ids, masked, special: SpecialIds) -> np.ndarray:
    """Teacher-forced logits at the masked positions, special ids at -inf (never chosen)."""
    logits = np.concatenate(teacher_forced_logits(backend, ids, masked, special)).astype(np.float64)
    logits[:, special.all] = -np.inf
    return logits


def _margins(logits: np.ndarray) -> np.ndarray:
    """Per row, the best logit less the second best."""
    top = np.sort(logits, axis=-1)[:, -2:]
    return top[:, 1] - top[:, 0]


def _share(agree: np.ndarray, where: np.ndarray) -> float:
    """The share of agreement where `where` holds; 1.0 where it holds nowhere (nothing to judge)."""
    return float(agree[where].mean()) if where.any() else 1.0


def _judge(checks: list, end_to_end: dict, agreement: float) -> None:
    """fp32 and fp16: every output within its tolerance, top-1 and engine agreement at least `agreement`."""
    for check in checks:
        if not check.max_abs_diff <= check.tolerance:
            raise ValidationError(
                f"{check.graph}.onnx output '{check.output}' differs from PyTorch by "
                f"{check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g}) on {check.case}"
            )
    if not end_to_end["engine_greedy_fill_agreement"] >= agreement:
        raise ValidationError(
            f"greedy fills through ar_step.onnx (the decode engine, 2 slots for 4 sequences) agree "
            f"with PyTorch on {end_to_end['engine_greedy_fill_agreement']:.3f} of the masked "
            f"tokens (least {agreement})"
        )
    if not (end_to_end["top1_agreement"] >= agreement and end_to_end["max_abs_logit_diff"] <= end_to_end["tolerance"]):
        raise ValidationError(
            f"fusion_head.onnx output 'logits' end to end: top-1 agreement "
            f"{end_to_end['top1_agreement']:.3f} (least {agreement}), largest difference "
            f"{end_to_end['max_abs_logit_diff']:.3g} (tolerance {end_to_end['tolerance']:.3g})"
        )


def _judge_quantized(checks: list, end_to_end: dict, bound: float, agreement: float) -> None:
    """int8 and int4 (see the module's docstring): relative errors within `bound`, clear choices kept."""
    for check in checks:
        if not check.relative_error <= bound:
            raise ValidationError(
                f"{check.graph}.onnx output '{check.output}' differs from PyTorch's fp32 by a relative "
                f"{check.relative_error:.3g} (quantized weights: at most {bound}) on {check.case}"
            )
    if not end_to_end["logits_relative_error"] <= bound:
        raise ValidationError(
            f"fusion_head.onnx output 'logits' end to end differs from PyTorch's fp32 by a relative "
            f"{end_to_end['logits_relative_error']:.3g} (quantized weights: at most {bound})"
        )
    for where, choices, share in (
        ("teacher forced", "clear_choices", "clear_top1_agreement"),
        ("along the decode engine's greedy fills", "engine_clear_choices", "engine_clear_agreement"),
    ):
        if not end_to_end[share] >= agreement:
            raise ValidationError(
                f"greedy choices {where} agree with PyTorch's fp32 on {end_to_end[share]:.3f} of the "
                f"{end_to_end[choices]} where its choice is clear (least {agreement})"
            )


def validate(open_backend, concat: bool, backbones, head, special: SpecialIds, variant: str, seed: int = 0) -> dict:
    """Runs every check, returns the report for validation.json; raises ValidationError on the first failure.
    open_backend(decoder) gives the bundle's ONNX backend with one AR graph: "concat" (ar_decoder.onnx, which the
    bundle has where concat is true) or "engine" (ar_step.onnx). ar_decoder.onnx is checked first and its backend
    released before the step graph's is made, so one copy of the AR's weights is in ONNX Runtime at a time."""
    bound, agreement = TOLERANCE.get(variant, (1.0, 0.0))  # quantized: judged by QUANTIZED below
    rng = np.random.default_rng(seed)
    torch_backend = TorchBackend(backbones, head)
    onnx = open_backend("concat" if concat else "engine")
    vocab = onnx.manifest.vocab_size
    checks: list = []
    _check_mlm(checks, onnx, torch_backend, rng, vocab, bound)
    _check_ar(checks, onnx, torch_backend, rng, vocab, bound)
    if concat:
        del onnx
        gc.collect()
        onnx = open_backend("engine")
    _check_step(checks, onnx, torch_backend, rng, vocab, bound)
    heads = list(HEADS) if onnx.manifest.has_baseline_heads else ["fusion_head"]
    _check_heads(checks, onnx, torch_backend, rng, bound, heads)
    end_to_end = _end_to_end(onnx, torch_backend, special, rng, vocab, bound, agreement)
    report = {"variant": variant, "checks": [asdict(c) for c in checks], "end_to_end": end_to_end}
    if variant in QUANTIZED:
        _judge_quantized(checks, end_to_end, *QUANTIZED[variant])
    else:
        _judge(checks, end_to_end, agreement)
    return report
