"""Choosing a token from the fusion head's logits: greedy, or sampling with temperature / top-k / top-p; and, for
speculative infilling, keeping or replacing a draft so that the token chosen follows the same distribution."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import SettingError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.seed < 0:
            raise SettingError(f"{{seed}} must be a non-negative integer, got {self.seed}", "seed")

    @property
    def batch_key(self) -> tuple[float, int, float]:
        """What rows must share to be chosen together: everything but the seed (each row has its own generator)."""
        return self.temperature, self.top_k, self.top_p

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def token_logprobs(logits: np.ndarray, tokens: np.ndarray | Sequence[int]) -> np.ndarray:
    """log p(tokens[r]) under softmax(logits[r]) for each row of logits [rows, V] -> [rows] float64: the token's
    logit less the row's log-sum-exp, the exponentials in the logits' own precision (fast) and summed in float64."""
    top = logits.max(axis=-1, keepdims=True)
    total = np.exp(logits - top).sum(axis=-1, dtype=np.float64)
    picked = logits[np.arange(len(logits)), np.asarray(tokens, dtype=np.int64)].astype(np.float64)
    return picked - top[:, 0] - np.log(total)


def distribution(scores: np.ndarray, sampling: Sampling) -> np.ndarray:
    """scores [V] float64 with banned ids at -inf -> the probabilities a sample is drawn from [V]: temperature, then
    top-k, then top-p. The best score is taken off before the temperature divides, so a temperature near 0 leaves 0
    for the best ids and -inf for the rest (greedy's choice), never inf - inf."""
    with np.errstate(over="ignore"):  # a difference over a tiny temperature is -inf, as meant
        scores = (scores - scores.max()) / sampling.temperature
    if sampling.top_k:
        kth = np.partition(scores, -min(sampling.top_k, scores.size))[-min(sampling.top_k, scores.size)]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if sampling.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        keep = np.cumsum(probs[order]) - probs[order] < sampling.top_p  # smallest set reaching top_p
        probs[order[~keep]] = 0.0
        probs /= probs.sum()
    return probs


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One id from probabilities [V] (not necessarily normalised), with one uniform from rng."""
    return int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right").clip(max=probs.size - 1))


def keep_draft(p: np.ndarray, q: np.ndarray, draft: int, rng: np.random.Generator) -> int:
    """Speculative sampling's rule: the draft, drawn from q, is kept with probability min(1, p/q); otherwise a draw
    from max(0, p - q), normalised. The id returned follows p exactly, whatever q is."""
    if rng.random() * q[draft] < p[draft]:
        return draft
    residual = np.maximum(p - q, 0.0)
    return draw(residual if residual.sum() > 0 else p, rng)  # (p == q to rounding: nothing left over)


def _scores(logits: np.ndarray, banned_ids: Sequence[int], refused: list | None) -> np.ndarray:
    """logits [rows, V] with the banned ids, and row r's refused ids, at -inf."""
    scores = logits.copy()
    scores[:, list(banned_ids)] = -np.inf
    for row, ids in enumerate(refused or []):
        if ids is not None:
            scores[row, ids] = -np.inf
    return scores


@dataclass
class Drafts:
    """Draft ids [rows] (-1: no draft) and, when sampling, the distributions they were drawn from [rows, V]."""

    ids: np.ndarray
    probs: np.ndarray | None = None

    @classmethod
    def of(cls, drafts: list[tuple[int, np.ndarray | None] | None]) -> "Drafts":
        """Rows of (id, distribution or None when greedy), or None where a row has no draft."""
        ids = np.array([-1 if d is None else d[0] for d in drafts], dtype=np.int64)
        sampled = [d[1] for d in drafts if d is not None and d[1] is not None]
        if not sampled:
            return cls(ids)
        none = np.zeros_like(sampled[0])  # (a row without a draft is drawn from p alone)
        return cls(ids, np.stack([none if d is None or d[1] is None else d[1] for d in drafts]))


def _sample(scores: np.ndarray, row: int, sampling: Sampling, rng: np.random.Generator, drafts: Drafts | None) -> int:
    """Row `row`'s id: a draw from its distribution, or its draft kept or replaced by keep_draft's rule."""
    p = distribution(scores[row].astype(np.float64), sampling)
    if drafts is None or drafts.ids[row] < 0:
        return draw(p, rng)
    assert drafts.probs is not None, "sampled drafts carry the distributions they were drawn from"
    return keep_draft(p, drafts.probs[row], int(drafts.ids[row]), rng)


def choose_tokens(
    logits: np.ndarray,
    banned_ids: Sequence[int],
    sampling: Sampling,
    rngs: list[np.random.Generator],
    refused: list | None = None,
    drafts: Drafts | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """logits [rows, V] -> (token ids [rows], their log-probabilities under the head's full distribution [rows]).
    Row r samples with rngs[r], never a banned id nor one of the ids refused[r] (where that is not None). Where
    drafts gives row r a draft (an id >= 0), it is kept or replaced by keep_draft's rule (greedy: kept where it is
    the best id), so the id chosen follows the same distribution as without it."""
    if sampling.greedy:
        return best_tokens(logits, banned_ids, refused)
    scores = _scores(logits, banned_ids, refused)
    tokens = np.array([_sample(scores, row, sampling, rngs[row], drafts) for row in range(len(rngs))], dtype=np.int64)
    return tokens, token_logprobs(logits, tokens)


def best_tokens(
    logits: np.ndarray, banned_ids: Sequence[int], refused: list | None = None, allowed: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The greedy choice of each row of logits [rows, V]: its best id that is neither banned nor one of refused[r],
    and that id's log-probability under the row's softmax (allowed: under the softmax over the ids the row may
    take). What runtime/graphs/greedy.onnx computes where the logits are (export/greedy.py)."""
    scores = _scores(logits, banned_ids, refused)
    tokens = scores.argmax(axis=-1).astype(np.int64)
    return tokens, token_logprobs(scores if allowed else logits, tokens)


def refused_matrix(banned_ids: Sequence[int], refused: list | None, rows: int) -> np.ndarray:
    """The banned ids and each row's refused ids as greedy.onnx's `refused` [rows, K] int64: a row repeats the
    first banned id where it has fewer than K."""
    extra = [np.zeros(0, dtype=np.int64) if r is None else np.asarray(r, dtype=np.int64) for r in refused or []]
    extra += [np.zeros(0, dtype=np.int64)] * (rows - len(extra))
    width = len(banned_ids) + max((len(r) for r in extra), default=0)
    matrix = np.full((rows, width), banned_ids[0], dtype=np.int64)
    matrix[:, : len(banned_ids)] = banned_ids
    for row, ids in enumerate(extra):
        matrix[row, len(banned_ids) : len(banned_ids) + len(ids)] = ids
    return matrix


def draft_tokens(
    logits: np.ndarray,
    banned_ids: Sequence[int],
    sampling: Sampling,
    rng: np.random.Generator,
    refused: list | None = None,
) -> Drafts:
    """A draft model's logits [rows, V] -> a sampled draft per row, drawn in order with rng from its distribution
    under the same temperature, top-k and top-p, without the banned ids and row r's refused[r] (the distributions
    are kept with the drafts, for keep_draft's rule). Greedy drafts need no distribution: they are the best ids."""
    assert not sampling.greedy, "greedy drafts are the best ids"
    probs = np.stack([distribution(row.astype(np.float64), sampling) for row in _scores(logits, banned_ids, refused)])
    return Drafts(np.array([draw(p, rng) for p in probs], dtype=np.int64), probs)
