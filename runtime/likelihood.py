"""The AR's own likelihood of whole texts, and plain AR sampling, from the bundle's baseline heads.

    ar_token_logprobs: one teacher-forced AR pass over [START] x_0 .. x_{n-2}  -> log p_AR(x_i | x_<i) for every i
    ar_sample:         the AR alone, left to right with its KV cache           -> a continuation of each prefix

Both need a backend with `ar_logits` (OnnxBackend on a bundle with ar_lm_head.onnx, or the PyTorch reference).
"""

import numpy as np

from .backend import HeadsBackend, SpecialIds
from .choose import Sampling, choose_tokens, token_logprobs
from .decode import teacher_forced_ar


def ar_token_logprobs(
    backend: HeadsBackend, ids: list[np.ndarray], special: SpecialIds, batch_size: int = 16
) -> list[np.ndarray]:
    """Per sequence, log p_AR(x_i | [START] x_<i) of each of its tokens: [n] float64."""
    out = []
    for begin in range(0, len(ids), batch_size):
        batch = [np.asarray(x, dtype=np.int64) for x in ids[begin : begin + batch_size]]
        hidden, attention_mask = teacher_forced_ar(backend, batch, special)
        real = attention_mask.astype(bool)
        picked = token_logprobs(backend.ar_logits(hidden[real]), np.concatenate(batch))  # [tokens]
        out += np.split(picked, np.cumsum([len(x) for x in batch])[:-1])
    return out


def ar_loglikelihood(
    backend: HeadsBackend, ids: list[np.ndarray], special: SpecialIds, batch_size: int = 16
) -> list[float]:
    """Total log p_AR of each whole sequence (every token scored, the first given [START])."""
    return [float(p.sum()) for p in ar_token_logprobs(backend, ids, special, batch_size)]


def insertion_scores(
    backend: HeadsBackend, ids: list[np.ndarray], masked: list[np.ndarray], special: SpecialIds
) -> list[float]:
    """Per filled sequence, log p_AR of its given tokens plus, for each run of filled positions, the mean log p_AR
    of its tokens: the text around a fill judges it whatever its length, the fill only by how likely its tokens
    are on average. Chooses an insertion's length better than the whole text's log p_AR, which every extra token
    lowers (MODEL.md, "Insertion with suffix")."""
    scores = []
    for logprobs, flags in zip(ar_token_logprobs(backend, ids, special), masked):
        flags = np.asarray(flags, dtype=bool)
        edges = np.flatnonzero(np.diff(flags)) + 1  # where a run of fills or of given tokens begins
        runs = zip(np.split(logprobs, edges), np.split(flags, edges))
        scores.append(float(logprobs[~flags].sum() + sum(run.mean() for run, filled in runs if filled[0])))
    return scores


SPAN_SCORES = {  # how a candidate of span lengths is scored: (backend, ids, masked, special) -> scores
    "text": lambda backend, ids, masked, special: ar_loglikelihood(backend, ids, special),
    "insertion": insertion_scores,
}


def ar_sample(
    backend: HeadsBackend,
    prefixes: list[np.ndarray],
    length: int,
    special: SpecialIds,
    sampling: Sampling,
    rngs: list[np.random.Generator],
) -> list[np.ndarray]:
    """The AR alone continues each prefix (content ids, may be empty) by `length` tokens, with its KV cache."""
    batch = len(prefixes)
    prompts = [np.concatenate([[special.start], p]).astype(np.int64) for p in prefixes]
    width = max(len(p) for p in prompts)
    input_ids = np.full((batch, width), special.pad, dtype=np.int64)
    attention_mask = np.zeros((batch, width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, : len(prompt)] = prompt
        attention_mask[row, : len(prompt)] = 1
    position_ids = np.broadcast_to(np.arange(width, dtype=np.int64), input_ids.shape).copy()
    hidden, past = backend.ar_step(input_ids, attention_mask, position_ids, backend.empty_past(batch))
    last = np.array([len(p) - 1 for p in prompts])
    hidden, cursor, chosen = hidden[np.arange(batch), last], last + 1, []
    for _ in range(length):
        tokens, _ = choose_tokens(backend.ar_logits(hidden), special.all, sampling, rngs)  # [batch]
        chosen.append(tokens)
        attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        hidden, past = backend.ar_step(tokens[:, None], attention_mask, cursor[:, None], past)
        hidden, cursor = hidden[:, 0], cursor + 1
    return (
        [np.concatenate([p, column]) for p, column in zip(prefixes, np.stack(chosen, axis=1))]
        if length
        else [np.asarray(p, dtype=np.int64) for p in prefixes]
    )
