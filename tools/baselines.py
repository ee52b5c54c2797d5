"""The PyTorch baselines of `maria eval` and `maria bench`, on the same masks and inputs as MARIA's.

Each quality baseline is a fusion head with one half switched off, so every system runs the same scorer and
decode loop:
    AR alone   W = [0 ; W_ar],          b = b_ar     p(x_i | x_<i): left context only
    MLM alone  W = [W_mlm ; 0],         b = b_mlm    one MLM pass, masks predicted independently
    PoE init   W = [W_mlm/2 ; W_ar/2],  b = (b_mlm + b_ar)/2   MARIA's head before training

The speed baseline `mlm_autoregressive` decodes with the MLM alone, left to right, re-running it after every fill.
"""

from pathlib import Path

import numpy as np
import torch

from maria_onnx.backbones import Backbones, load_backbones
from maria_onnx.config import MariaConfig
from maria_onnx.model import FusionHead
from maria_onnx.reference import TorchBackend, reference_infill, reference_score
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.decode import encode_masked
from maria_onnx.runtime.evaluate import quality_row


def baseline_heads(backbones: Backbones) -> dict[str, FusionHead]:
    poe = FusionHead.product_of_experts(backbones)
    d_mlm = backbones.mlm_hidden_size
    heads = {"PoE init": poe}
    for name, keep in (("AR alone", slice(d_mlm, None)), ("MLM alone", slice(0, d_mlm))):
        head = FusionHead(d_mlm, backbones.ar_hidden_size, backbones.vocab_size)
        with torch.no_grad():
            head.linear.weight.zero_()
            head.linear.weight[:, keep] = 2 * poe.linear.weight[:, keep]
            bias = backbones.mlm_decoder().bias if name == "MLM alone" else None
            head.linear.bias.copy_(
                bias[: backbones.vocab_size] if bias is not None else torch.zeros(backbones.vocab_size)
            )
        heads[name] = head.eval()
    return heads


def evaluate_baselines(backbones: Backbones, windows, masks, batch_size: int = 16) -> list[dict]:
    rows = []
    for name, head in baseline_heads(backbones).items():
        nll = reference_score(backbones, head, list(windows), masks, batch_size=batch_size)
        fills = reference_infill(backbones, head, list(windows), masks, Sampling(), batch_size=batch_size)
        rows.append(quality_row(name, nll, windows, masks, fills))
    return rows


def load_baseline_backbones(manifest, backbones_from=None):
    """The backbones for the baselines: from a checkpoint folder, else the folders the bundle was exported from.
    Returns (backbones or None, a note saying why there are none)."""
    if backbones_from is not None:
        config = MariaConfig.load(backbones_from)
        return load_backbones(config.mlm_path, config.ar_path), ""
    mlm, ar = manifest.source.get("mlm_path"), manifest.source.get("ar_path")
    if mlm and ar and Path(mlm).is_dir() and Path(ar).is_dir():
        return load_backbones(mlm, ar), ""
    return None, (
        "the bundle's backbone folders are not on this machine; pass --backbones-from CHECKPOINT "
        "for the baselines; MARIA only"
    )


@torch.no_grad()
def mlm_autoregressive(backbones: Backbones, ids, masked) -> list[np.ndarray]:
    """One batch: at each step every sequence fills its next masked position (greedy) from a fresh MLM pass."""
    backend, special = TorchBackend(backbones, None), backbones.special
    current, remaining = [x.copy() for x in ids], [m.copy() for m in masked]
    targets = [np.flatnonzero(m) for m in masked]
    decoder, vocab = backbones.mlm_decoder(), backbones.vocab_size
    for step in range(max(len(t) for t in targets)):
        hidden = encode_masked(backend, current, remaining, special)  # [batch, n + 2, d_mlm]
        rows = [row for row, t in enumerate(targets) if step < len(t)]
        positions = [targets[row][step] for row in rows]
        chosen = backend.tensor(hidden[rows, np.array(positions) + 1]).to(decoder.weight.dtype)  # fp16 on GPU
        logits = decoder(chosen)[:, :vocab].float()  # [rows, V]
        logits[:, special.all] = -float("inf")
        for index, row in enumerate(rows):  # fills keep the text valid UTF-8, as MARIA's do
            refused = backbones.utf8.refused(current[row], targets[row], step)
            if refused is not None:
                logits[index, torch.from_numpy(refused)] = -float("inf")
        for row, position, token in zip(rows, positions, logits.argmax(-1).cpu().numpy()):
            current[row][position], remaining[row][position] = token, False
    return current
