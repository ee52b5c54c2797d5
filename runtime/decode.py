"""The MARIA inference loop, written once and driven by any backend (ONNX Runtime, or the PyTorch reference).

    encode_masked: one MLM pass over [CLS] x~ [SEP]                     -> mlm_hidden [batch, n + 2, d_mlm]
    prefill / decode_step: the AR's KV-cached step over the next chunk  -> ar_hidden  [batch, chunk, d_ar]
        each sequence's chunk runs from its cursor to its next masked position; chunks are right-padded to
        the longest in the step, the padding masked out in attention_mask, positions given explicitly
    fuse: fusion head on (h_mlm[i], h_ar[i]) at each sequence's masked position -> logits [batch, V]
    choose_tokens: the fill, written into the sequence and fed to the AR with the next chunk

A batch takes as many AR steps as its sequence with the most masked tokens. The loop is written against the
`Backend` protocol (runtime/backend.py). Randomness comes from the caller: one numpy Generator per sequence,
so a sequence's samples do not depend on the batch it runs in.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from .backend import Backend, MlmPass, SpecialIds
from .choose import Sampling, choose_tokens, token_logprobs
from .utf8 import Utf8Rule


@dataclass
class Fill:
    """One filled sequence: content ids, the masked positions, and log p of each fill (in position order)."""

    ids: np.ndarray
    positions: np.ndarray
    logprobs: np.ndarray

    @classmethod
    def unchanged(cls, ids: npt.ArrayLike) -> "Fill":
        """A sequence with nothing masked: its ids as they are."""
        return cls(ids=np.asarray(ids, dtype=np.int64), positions=np.zeros(0, dtype=np.int64), logprobs=np.zeros(0))


# The MLM's attention holds rows x width^2 scores at once: a call takes at most this many (a longer text runs alone),
# which bounds its memory in no more time (docs/benchmarks.md, "Smaller measurements").
MLM_CALL_SCORES = 1 << 20


def length_groups(lengths: list[int], waste: float = 0.5, scores: int = MLM_CALL_SCORES) -> list[list[int]]:
    """Indices in groups of similar length, longest first: padding a group to its longest adds at most `waste`
    times its real tokens, and a group of several holds at most `scores` rows x longest^2."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else None
        if (
            group
            and lengths[group[0]] * (len(group) + 1) <= (1 + waste) * (sum(lengths[i] for i in group) + lengths[index])
            and (len(group) + 1) * lengths[group[0]] ** 2 <= scores
        ):
            group.append(index)
        else:
            groups.append([index])
    return groups


def encode_masked(
    backend: MlmPass, ids: Sequence[np.ndarray], masked: Sequence[np.ndarray], special: SpecialIds
) -> np.ndarray:
    """The MLM pass; returns mlm_hidden [batch, max_n + 2, d_mlm] with h_mlm[b, i + 1] for x_i (what lies past
    a sequence's end is not defined). Sequences of very different lengths run in separate calls (length_groups):
    padded to the longest, a short text costs as much as a long one; long texts run a few at a time, which bounds
    the memory attention takes."""
    mlm_hidden = None
    for group in length_groups([len(x) + 2 for x in ids]):
        width = len(ids[group[0]]) + 2
        input_ids = np.full((len(group), width), special.pad, dtype=np.int64)
        attention_mask = np.zeros((len(group), width), dtype=np.int64)
        for at, row in enumerate(group):
            x, m = ids[row], masked[row]
            input_ids[at, : len(x) + 2] = [special.cls, *np.where(m, special.mask, x), special.sep]
            attention_mask[at, : len(x) + 2] = 1
        hidden = backend.mlm_hidden(input_ids, attention_mask)
        if mlm_hidden is None:  # the first group holds the longest sequence
            mlm_hidden = np.zeros((len(ids), width, hidden.shape[-1]), dtype=hidden.dtype)
        mlm_hidden[group, :width] = hidden
    assert mlm_hidden is not None, "the MLM pass of no sequences"
    return mlm_hidden


@dataclass
class DecodeState:
    """Per-batch state of the AR pass: the tokens fed so far are ar_tokens[b][:cursor[b]]."""

    ar_tokens: list[np.ndarray]  # [START] x_0 .. x_{n-1}, fills written in as they are chosen
    targets: list[np.ndarray]  # masked positions per sequence, ascending
    cursor: np.ndarray  # [batch] AR tokens fed
    attention_mask: np.ndarray  # [batch, past] 1 where a real token was fed
    past: object


def next_chunk(state: DecodeState, step: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each sequence's tokens from its cursor up to (the token before) its step-th masked position."""
    ends = np.array([t[step] + 1 if step < len(t) else c for t, c in zip(state.targets, state.cursor)])
    lengths = ends - state.cursor
    width = int(lengths.max())
    input_ids = np.full((len(ends), width), pad_id, dtype=np.int64)
    for row, (begin, end) in enumerate(zip(state.cursor, ends)):
        input_ids[row, : end - begin] = state.ar_tokens[row][begin:end]
    position_ids = state.cursor[:, None] + np.arange(width)[None, :]
    chunk_mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    return input_ids, position_ids.astype(np.int64), chunk_mask, lengths


def decode_step(backend: Backend, state: DecodeState, step: int, special: SpecialIds) -> tuple[np.ndarray, np.ndarray]:
    """Feeds every sequence's next chunk; returns the rows still filling and their ar_hidden [rows, d_ar]."""
    input_ids, position_ids, chunk_mask, lengths = next_chunk(state, step, special.pad)
    state.attention_mask = np.concatenate([state.attention_mask, chunk_mask], axis=1)
    hidden, state.past = backend.ar_step(input_ids, state.attention_mask, position_ids, state.past)
    state.cursor = state.cursor + lengths
    rows = np.array([row for row, t in enumerate(state.targets) if step < len(t)])
    return rows, hidden[rows, lengths[rows] - 1]


T = TypeVar("T")
OnToken = Callable[[int, int, int, float], None]  # (sequence, position, token, log-probability)


def infill_batch(
    backend: Backend,
    ids: Sequence[np.ndarray],
    masked: Sequence[np.ndarray],
    special: SpecialIds,
    sampling: Sampling,
    rngs: list[np.random.Generator],
    on_token: OnToken | None = None,
    utf8: Utf8Rule | None = None,
) -> list[Fill]:
    """Fills the masked positions of each sequence (every one has at least one), all in one batch;
    rngs[b] draws sequence b's samples; on_token(b, position, token, logprob) hears each fill as it is chosen;
    utf8 keeps the fills valid UTF-8 (None: free)."""
    mlm_hidden = encode_masked(backend, ids, masked, special)
    targets = [np.flatnonzero(m) for m in masked]
    assert all(len(t) for t in targets), (
        f"every sequence needs a masked position, got counts {[len(t) for t in targets]}"
    )
    state = DecodeState(
        ar_tokens=[np.concatenate([[special.start], x]).astype(np.int64) for x in ids],
        targets=targets,
        cursor=np.zeros(len(ids), dtype=np.int64),
        attention_mask=np.zeros((len(ids), 0), dtype=np.int64),
        past=backend.empty_past(len(ids)),
    )
    logprobs = [np.zeros(len(t)) for t in targets]
    for step in range(max(len(t) for t in targets)):
        rows, ar_hidden = decode_step(backend, state, step, special)
        positions = np.array([targets[row][step] for row in rows])
        logits = backend.fuse(mlm_hidden[rows, positions + 1], ar_hidden)
        refused = None if utf8 is None else [utf8.refused(state.ar_tokens[row][1:], targets[row], step) for row in rows]
        tokens, token_logprobs = choose_tokens(logits, special.all, sampling, [rngs[row] for row in rows], refused)
        for row, position, token, logprob in zip(rows, positions, tokens, token_logprobs):
            state.ar_tokens[row][position + 1] = token
            logprobs[row][step] = logprob
            if on_token is not None:
                on_token(int(row), int(position), int(token), float(logprob))
    return [
        Fill(ids=tokens[1:].copy(), positions=t, logprobs=lp)
        for tokens, t, lp in zip(state.ar_tokens, targets, logprobs)
    ]


def teacher_forced_ar(
    backend: Backend, ids: Sequence[np.ndarray], special: SpecialIds
) -> tuple[np.ndarray, np.ndarray]:
    """One AR pass over [START] x_0 .. x_{n-2} per sequence, right-padded: ar_hidden [batch, max_n, d_ar] with
    h_ar[b, i] predicting x_i, and the attention mask [batch, max_n] of the real positions."""
    width = max(len(x) for x in ids)
    input_ids = np.full((len(ids), width), special.pad, dtype=np.int64)
    attention_mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = [special.start, *x[:-1]]  # position i holds the token before x_i
        attention_mask[row, : len(x)] = 1
    position_ids = np.broadcast_to(np.arange(width, dtype=np.int64), input_ids.shape).copy()
    ar_hidden, _ = backend.ar_step(input_ids, attention_mask, position_ids, backend.empty_past(len(ids)))
    return ar_hidden, attention_mask


def teacher_forced_logits(
    backend: Backend, ids: Sequence[np.ndarray], masked: Sequence[np.ndarray], special: SpecialIds
) -> list[np.ndarray]:
    """One MLM pass and one AR pass over the true tokens: fusion-head logits at each sequence's masked positions,
    [masked count, V] per sequence."""
    mlm_hidden = encode_masked(backend, ids, masked, special)
    ar_hidden, _ = teacher_forced_ar(backend, ids, special)
    rows = np.concatenate([np.full(int(m.sum()), row) for row, m in enumerate(masked)])
    positions = np.concatenate([np.flatnonzero(m) for m in masked])
    logits = backend.fuse(mlm_hidden[rows, positions + 1], ar_hidden[rows, positions])
    return np.split(logits, np.cumsum([int(m.sum()) for m in masked])[:-1])


def score_batch(
    backend: Backend, ids: Sequence[np.ndarray], masked: Sequence[np.ndarray], special: SpecialIds
) -> list[np.ndarray]:
    """Teacher forced, one pass: -log p(x_i) of the true tokens at each sequence's masked positions."""
    logits = teacher_forced_logits(backend, ids, masked, special)
    return [-token_logprobs(row, x[np.flatnonzero(m)]) for row, x, m in zip(logits, ids, masked)]


def in_batches(
    run_batch: Callable[[list[int], list[np.ndarray], list[np.ndarray]], Sequence[T]],
    ids: Sequence[npt.ArrayLike],
    masked: Sequence[npt.ArrayLike],
    batch_size: int,
    unmasked: Callable[[np.ndarray], T],
) -> list[T]:
    """Runs run_batch(rows, ids, masked) over the sequences that have a masked position, batch_size at a time
    (rows: their indices in the input); the others get unmasked(ids). Results come back in input order."""
    id_rows = [np.asarray(x, dtype=np.int64) for x in ids]
    mask_rows = [np.asarray(m, dtype=bool) for m in masked]
    results = [unmasked(x) for x in id_rows]
    todo = [row for row, m in enumerate(mask_rows) if m.any()]
    for begin in range(0, len(todo), batch_size):
        rows = todo[begin : begin + batch_size]
        for row, result in zip(rows, run_batch(rows, [id_rows[r] for r in rows], [mask_rows[r] for r in rows])):
            results[row] = result
    return results


def sequence_rngs(seed: int, count: int) -> list[np.random.Generator]:
    """One generator per sequence, derived from (seed, index of the sequence, sample 0)."""
    return [np.random.default_rng([seed, index, 0]) for index in range(count)]


def infill(
    backend: Backend,
    ids: Sequence[npt.ArrayLike],
    masked: Sequence[npt.ArrayLike],
    special: SpecialIds,
    sampling: Sampling,
    batch_size: int = 8,
    rngs: list[np.random.Generator] | None = None,
    on_token: OnToken | None = None,
    utf8: Utf8Rule | None = None,
) -> list[Fill]:
    """Fills every sequence in batches of batch_size; sequences without a masked position come back unchanged.
    rngs[i] draws sequence i's samples (default: sequence_rngs(sampling.seed)), so a sequence's samples are
    the same whatever batch it runs in. on_token(i, position, token, logprob) hears each fill of sequence i.
    utf8: fills keep the text valid UTF-8 (runtime/utf8.py); None leaves them free."""
    rngs = sequence_rngs(sampling.seed, len(ids)) if rngs is None else rngs
    assert len(rngs) == len(ids), f"{len(rngs)} generators for {len(ids)} sequences"

    def run_batch(rows: list[int], x: list[np.ndarray], m: list[np.ndarray]) -> list[Fill]:
        hear = None if on_token is None else lambda b, *fill: on_token(rows[b], *fill)
        return infill_batch(backend, x, m, special, sampling, [rngs[r] for r in rows], hear, utf8)

    return in_batches(run_batch, ids, masked, batch_size, Fill.unchanged)


def score(
    backend: Backend,
    ids: Sequence[npt.ArrayLike],
    masked: Sequence[npt.ArrayLike],
    special: SpecialIds,
    batch_size: int = 8,
) -> list[np.ndarray]:
    """Per sequence, -log p of the true tokens at its masked positions (empty where nothing is masked)."""
    return in_batches(
        lambda rows, x, m: score_batch(backend, x, m, special), ids, masked, batch_size, lambda x: np.zeros(0)
    )
