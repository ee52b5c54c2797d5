"""Masked-token perplexity and greedy top-1 accuracy of fills, on fixed masks: torch-free, through ONNX Runtime.

The baselines are the same decode loop and scorer with the fusion head replaced by the bundle's own heads
(ar_lm_head.onnx, mlm_decoder.onnx), so every system is judged by one piece of code:
    AR alone    logits = ar_lm_head(h_ar)                      p(x_i | x_<i): left context only
    MLM alone   logits = mlm_decoder(h_mlm)                    one MLM pass, masks predicted independently
    PoE init    logits = (ar_lm_head(h_ar) + mlm_decoder(h_mlm)) / 2   MARIA's head before training
    MARIA       logits = fusion_head(h_mlm, h_ar)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .backend import HeadsBackend
from .choose import Sampling
from .decode import infill, score
from .errors import SettingError
from .readers import StreamLines
from .text import plain_encoder
from .windows import pack_windows

Windows = Sequence[np.ndarray] | np.ndarray  # token windows: one array each, or [windows, seq_len]

if TYPE_CHECKING:
    from .decode import Fill
    from .infiller import Infiller


def check_mask_rate(mask_rate: float, name: str = "mask rate") -> None:
    if not 0 < mask_rate <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {mask_rate}")


def draw_masks(
    windows: Iterable[Sequence[int] | np.ndarray], mask_rate: float, seed: int, span: bool = False
) -> list[np.ndarray]:
    """One mask per window, fixed by the seed: each token with probability mask_rate, or (span) runs of mean
    length 4 until about mask_rate of the window is covered. Every window gets at least one masked token."""
    check_mask_rate(mask_rate)
    rng = np.random.default_rng(seed)
    masks = []
    for window in windows:
        n = len(window)
        if span:
            masked = np.zeros(n, dtype=bool)
            while masked.sum() < round(mask_rate * n):
                start, length = rng.integers(n), rng.geometric(0.25)
                masked[start : start + length] = True
        else:
            masked = rng.random(n) < mask_rate
        if not masked.any():
            masked[rng.integers(n)] = True
        masks.append(masked)
    return masks


def quality_row(system: str, nll: list[float], windows: Windows, masks: list[np.ndarray], fills: list[Fill]) -> dict:
    """Perplexity from summed NLLs, top-1 accuracy from greedy fills, over all masked tokens."""
    count = int(sum(m.sum() for m in masks))
    correct = sum(int((f.ids[m] == w[m]).sum()) for f, w, m in zip(fills, windows, masks))
    return {
        "system": system,
        "perplexity": math.exp(sum(nll) / count),
        "top1_accuracy": correct / count,
        "masked_tokens": count,
    }


def evaluate_maria(infiller: Infiller, windows: Windows, masks: list[np.ndarray], batch_size: int = 16) -> dict:
    """MARIA through the ONNX runtime: its scorer for perplexity, its greedy fills for accuracy."""
    nll = infiller.score(list(windows), masks, batch_size=batch_size)
    fills = infiller.fill_ids(list(windows), masks, Sampling(), batch_size=batch_size)
    return quality_row("MARIA", nll, windows, masks, fills)


def document_windows(
    documents: Iterable[str], infiller: Infiller, seq_len: int, count: int, name: str = "the text"
) -> np.ndarray:
    """The first `count` windows of seq_len tokens of the documents (any iterable: read only as far as those
    windows need), tokenized with the bundle's tokenizer and joined by its start token."""
    if not 2 <= seq_len <= infiller.manifest.max_sequence_length:
        raise SettingError(
            f"{{seq_len}} must be from 2 to the bundle's maximum {infiller.manifest.max_sequence_length}", "seq_len"
        )
    return pack_windows(documents, plain_encoder(infiller.tokenizer), seq_len, infiller.special.start, name, most=count)


def text_windows(path: str | Path, infiller: Infiller, seq_len: int, count: int) -> np.ndarray:
    """document_windows of a UTF-8 text file, one document per line (split on newlines only, as `maria train
    --line-documents` reads it), read a piece at a time and only as far as the windows need."""
    try:
        stream = open(path, "rb")
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    with stream:
        lines = StreamLines(stream, str(path), jsonl=False)
        texts = (line.text for line in lines if line.text is not None)  # plain lines: every one has its text
        return document_windows(texts, infiller, seq_len, count, str(path))


class BaselineBackend:
    """A Backend whose fusion is one of the baselines' (over an OnnxBackend with the baseline heads)."""

    def __init__(self, backend: HeadsBackend, system: str) -> None:
        self.backend, self.system = backend, system

    def mlm_hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.backend.mlm_hidden(input_ids, attention_mask)

    def empty_past(self, batch: int) -> Any:
        return self.backend.empty_past(batch)

    def ar_step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Any
    ) -> tuple[np.ndarray, Any]:
        return self.backend.ar_step(input_ids, attention_mask, position_ids, past)

    def fuse(self, mlm_hidden: np.ndarray, ar_hidden: np.ndarray) -> np.ndarray:
        if self.system == "AR alone":
            return self.backend.ar_logits(ar_hidden)
        if self.system == "MLM alone":
            return self.backend.mlm_logits(mlm_hidden)
        return (self.backend.ar_logits(ar_hidden) + self.backend.mlm_logits(mlm_hidden)) / 2


BASELINES = ("AR alone", "MLM alone", "PoE init")


def evaluate_baselines(
    infiller: Infiller, windows: Windows, masks: list[np.ndarray], batch_size: int = 16
) -> list[dict]:
    """The three baselines through ONNX Runtime, on the same masks (the bundle needs its baseline heads)."""
    rows = []
    for system in BASELINES:
        backend = BaselineBackend(infiller.backend, system)
        nll = [float(n.sum()) for n in score(backend, list(windows), masks, infiller.special, batch_size)]
        fills = infill(backend, list(windows), masks, infiller.special, Sampling(), batch_size, utf8=infiller.utf8)
        rows.append(quality_row(system, nll, windows, masks, fills))
    return rows
