"""Choosing a token from the fusion head's logits: greedy, or sampling with temperature / top-k / top-p."""

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


def _sample_row(scores: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """scores [V] with banned ids at -inf -> one token id. The best score is taken off before the temperature divides,
    so a temperature near 0 leaves 0 for the best ids and -inf for the rest (greedy's choice), never inf - inf."""
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
    return int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right").clip(max=probs.size - 1))


def choose_tokens(
    logits: np.ndarray,
    banned_ids: Sequence[int],
    sampling: Sampling,
    rngs: list[np.random.Generator],
    refused: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """logits [rows, V] -> (token ids [rows], their log-probabilities under the head's full distribution [rows]).
    Row r samples with rngs[r], never a banned id nor one of the ids refused[r] (where that is not None)."""
    scores = logits.copy()
    scores[:, list(banned_ids)] = -np.inf
    for row, ids in enumerate(refused or []):
        if ids is not None:
            scores[row, ids] = -np.inf
    if sampling.greedy:
        tokens = scores.argmax(axis=-1)
    else:
        tokens = np.array(
            [_sample_row(row.astype(np.float64), sampling, rng) for row, rng in zip(scores, rngs)], dtype=np.int64
        )
    return tokens.astype(np.int64), token_logprobs(logits, tokens)
