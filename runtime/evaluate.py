"""Masked-token perplexity and greedy top-1 accuracy of fills, on fixed masks: torch-free, MARIA through ONNX.

The baselines (PyTorch) and the orchestration of `maria eval` live in tools/evaluate.py.
"""

import math

import numpy as np

from .choose import Sampling


def draw_masks(windows, mask_rate: float, seed: int, span: bool = False) -> list[np.ndarray]:
    """One mask per window, fixed by the seed: each token with probability mask_rate, or (span) runs of mean
    length 4 until about mask_rate of the window is covered. Every window gets at least one masked token."""
    if not 0 < mask_rate <= 1:
        raise ValueError(f"mask rate must be in (0, 1], got {mask_rate}")
    rng = np.random.default_rng(seed)
    masks = []
    for window in windows:
        n = len(window)
        if span:
            masked = np.zeros(n, dtype=bool)
            while masked.sum() < round(mask_rate * n):
                start, length = rng.integers(n), rng.geometric(0.25)
                masked[start:start + length] = True
        else:
            masked = rng.random(n) < mask_rate
        if not masked.any():
            masked[rng.integers(n)] = True
        masks.append(masked)
    return masks


def quality_row(system: str, nll: list[float], windows, masks, fills) -> dict:
    """Perplexity from summed NLLs, top-1 accuracy from greedy fills, over all masked tokens."""
    count = int(sum(m.sum() for m in masks))
    correct = sum(int((f.ids[m] == w[m]).sum()) for f, w, m in zip(fills, windows, masks))
    return {"system": system, "perplexity": math.exp(sum(nll) / count), "top1_accuracy": correct / count,
            "masked_tokens": count}


def evaluate_maria(infiller, windows, masks, batch_size: int = 16) -> dict:
    """MARIA through the ONNX runtime: its scorer for perplexity, its greedy fills for accuracy."""
    nll = infiller.score(list(windows), masks, batch_size=batch_size)
    fills = infiller.fill_ids(list(windows), masks, Sampling(), batch_size=batch_size)
    return quality_row("MARIA", nll, windows, masks, fills)


def text_windows(path, infiller, seq_len: int, count: int) -> np.ndarray:
    """The first `count` windows of seq_len tokens of a UTF-8 text file, tokenized with the bundle's tokenizer."""
    from pathlib import Path

    from .text import pack_windows, plain_encoder
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not valid UTF-8 (byte {error.start}); convert it to UTF-8") from None
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    if not 2 <= seq_len <= infiller.manifest.max_sequence_length:
        raise ValueError(f"--seq-len must be from 2 to the bundle's maximum {infiller.manifest.max_sequence_length}")
    documents = [line for line in text.splitlines() if line.strip()]
    return pack_windows(documents, plain_encoder(infiller.tokenizer), seq_len, infiller.special.start)[:count]
