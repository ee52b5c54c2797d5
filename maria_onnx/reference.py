"""The PyTorch reference infiller: the runtime's decode loop driven by the eager PyTorch modules.

It is the parity oracle for the ONNX graphs and the "PyTorch eager" baseline of the benchmarks.
"""

import numpy as np
import torch
from transformers import DynamicCache

from runtime.choose import Sampling
from runtime.decode import Fill, SpecialIds, infill, score

from .backbones import Backbones
from .model import FusionHead


def special_ids(backbones: Backbones) -> SpecialIds:
    return SpecialIds(cls=backbones.cls_token_id, sep=backbones.sep_token_id, mask=backbones.mask_token_id,
                      start=backbones.start_token_id, pad=backbones.pad_token_id)


class TorchBackend:
    """The decode loop's backend on eager PyTorch modules; the KV cache is a transformers DynamicCache."""

    def __init__(self, backbones: Backbones, head: FusionHead):
        self.backbones, self.head = backbones, head
        self.device = next(head.parameters()).device

    def _tensor(self, array):
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @torch.no_grad()
    def mlm_hidden(self, input_ids, attention_mask):
        return self.backbones.mlm_hidden(self._tensor(input_ids), self._tensor(attention_mask)).float().cpu().numpy()

    def empty_past(self, batch: int):
        return DynamicCache()

    @torch.no_grad()
    def ar_step(self, input_ids, attention_mask, position_ids, past):
        hidden, past = self.backbones.ar_hidden(self._tensor(input_ids), self._tensor(attention_mask),
                                                self._tensor(position_ids), past)
        return hidden.float().cpu().numpy(), past

    @torch.no_grad()
    def fuse(self, mlm_hidden, ar_hidden):
        return self.head(self._tensor(mlm_hidden), self._tensor(ar_hidden)).cpu().numpy()


def reference_infill(backbones: Backbones, head: FusionHead, ids, masked, sampling: Sampling = Sampling(),
                     batch_size: int = 8) -> list[Fill]:
    """Fills the masked positions of each (ids, masked) pair with the eager PyTorch modules."""
    return infill(TorchBackend(backbones, head), ids, masked, special_ids(backbones), sampling, batch_size)


def reference_score(backbones: Backbones, head: FusionHead, ids, masked, batch_size: int = 8) -> list[float]:
    """Summed negative log-likelihood of the true tokens at the masked positions, per sequence."""
    nll = score(TorchBackend(backbones, head), ids, masked, special_ids(backbones), batch_size)
    return [float(n.sum()) for n in nll]
