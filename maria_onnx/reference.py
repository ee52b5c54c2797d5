"""The PyTorch reference infiller: the runtime's decode loop driven by the eager PyTorch modules (a `Backend`).

It is the parity oracle for the ONNX graphs and the "PyTorch eager" baseline of the benchmarks.
"""

import numpy as np
import torch
from transformers import DynamicCache

from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.decode import Fill, infill, score

from .backbones import Backbones
from .model import FusionHead, VocabularyHead


class TorchBackend:
    """runtime.backend.Backend on eager PyTorch modules; the KV cache is a transformers DynamicCache."""

    def __init__(self, backbones: Backbones, head: FusionHead | None):
        self.backbones, self.head = backbones, head
        self.device = next(backbones.ar.parameters()).device

    def tensor(self, array) -> torch.Tensor:
        """A numpy array as a tensor on the backend's device."""
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    @torch.no_grad()
    def mlm_hidden(self, input_ids, attention_mask):
        return self.backbones.mlm_hidden(self.tensor(input_ids), self.tensor(attention_mask)).float().cpu().numpy()

    def empty_past(self, batch: int):
        return DynamicCache()

    @torch.no_grad()
    def ar_step(self, input_ids, attention_mask, position_ids, past):
        hidden, past = self.backbones.ar_hidden(
            self.tensor(input_ids), self.tensor(attention_mask), self.tensor(position_ids), past
        )
        return hidden.float().cpu().numpy(), past

    @torch.no_grad()
    def ar_logits(self, ar_hidden):
        """The AR's own LM head: [r, d_ar] -> [r, V] (fp32)."""
        head = VocabularyHead(self.backbones.ar.get_output_embeddings(), self.backbones.vocab_size)
        return head(self.tensor(ar_hidden)).cpu().numpy()

    @torch.no_grad()
    def mlm_logits(self, mlm_hidden):
        """The MLM's own decoder: [r, d_mlm] -> [r, V] (fp32)."""
        head = VocabularyHead(self.backbones.mlm_decoder(), self.backbones.vocab_size)
        return head(self.tensor(mlm_hidden)).cpu().numpy()

    @torch.no_grad()
    def fuse(self, mlm_hidden, ar_hidden):
        assert self.head is not None, "a backend without a fusion head (the MLM baseline's) does not fuse"
        return self.head(self.tensor(mlm_hidden), self.tensor(ar_hidden)).cpu().numpy()


def reference_infill(
    backbones: Backbones,
    head: FusionHead,
    ids,
    masked,
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
    rngs=None,
    utf8: bool = True,
) -> list[Fill]:
    """Fills the masked positions of each (ids, masked) pair with the eager PyTorch modules; rngs as in
    runtime.decode.infill; utf8: the fills keep the text valid UTF-8, as the runtime's do."""
    return infill(
        TorchBackend(backbones, head),
        ids,
        masked,
        backbones.special,
        sampling,
        batch_size,
        rngs,
        utf8=backbones.utf8 if utf8 else None,
    )


def reference_score(backbones: Backbones, head: FusionHead, ids, masked, batch_size: int = 8) -> list[float]:
    """Summed negative log-likelihood of the true tokens at the masked positions, per sequence."""
    nll = score(TorchBackend(backbones, head), ids, masked, backbones.special, batch_size)
    return [float(n.sum()) for n in nll]
