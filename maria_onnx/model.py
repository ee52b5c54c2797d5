"""The MARIA model: one linear fusion head over the concatenated hidden states of a frozen MLM and a frozen AR.

logits[i] = W . concat(h_mlm[i], h_ar[i]) + b          W: [V, d_mlm + d_ar], MLM first
h_mlm[i]  = MLM head transform at position i+1 of [CLS] x~_0 .. x~_{n-1} [SEP]   (x~ = [MASK] on M)
h_ar[i]   = AR final hidden state at the position of x_{i-1} in [START] x_0 .. x_{n-1}
"""

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbones


class FusionHead(nn.Module):
    def __init__(self, mlm_hidden_size: int, ar_hidden_size: int, vocab_size: int):
        super().__init__()
        self.mlm_hidden_size = mlm_hidden_size
        self.linear = nn.Linear(mlm_hidden_size + ar_hidden_size, vocab_size)

    def forward(self, mlm_hidden, ar_hidden):
        """[..., d_mlm], [..., d_ar] -> logits [..., V], computed in fp32."""
        features = torch.cat([mlm_hidden, ar_hidden], dim=-1).float()
        return F.linear(features, self.linear.weight.float(), self.linear.bias.float())

    @classmethod
    def product_of_experts(cls, backbones: Backbones) -> "FusionHead":
        """W3 = [W1/2 ; W2/2], b = b1/2: at step 0 the logits are the average of the two models' logits."""
        vocab = backbones.vocab_size
        decoder = backbones.mlm_decoder()
        lm_head = backbones.ar.get_output_embeddings()
        device = lm_head.weight.device  # the head is made where the backbones are
        head = cls(backbones.mlm_hidden_size, backbones.ar_hidden_size, vocab).to(device)
        with torch.no_grad():
            w1 = decoder.weight[:vocab].float()  # [V, d_mlm]
            w2 = lm_head.weight[:vocab].float()  # [V, d_ar]
            head.linear.weight.copy_(torch.cat([w1, w2], dim=1) / 2)
            zero = torch.zeros(vocab, device=device)
            b1 = decoder.bias[:vocab].float() if decoder.bias is not None else zero
            b2 = lm_head.bias[:vocab].float() if getattr(lm_head, "bias", None) is not None else zero
            head.linear.bias.copy_((b1 + b2) / 2)
        return head


class VocabularyHead(nn.Module):
    """A backbone's own projection to the shared vocabulary (the AR's LM head, the MLM's decoder):
    hidden [..., d] -> logits [..., V], computed in fp32 over the first V rows."""

    def __init__(self, linear: nn.Linear, vocab_size: int):
        super().__init__()
        self.linear, self.vocab_size = linear, vocab_size

    def forward(self, hidden):
        weight = self.linear.weight[: self.vocab_size].float()
        bias = self.linear.bias[: self.vocab_size].float() if self.linear.bias is not None else None
        return F.linear(hidden.float(), weight, bias)


def mlm_input_ids(backbones: Backbones, input_ids, masked):
    """[batch, n] content ids, [batch, n] bool -> [batch, n + 2] = [CLS] x~ [SEP]."""
    batch = input_ids.shape[0]
    tilde = torch.where(masked, torch.full_like(input_ids, backbones.special.mask), input_ids)
    cls = torch.full((batch, 1), backbones.special.cls, dtype=input_ids.dtype, device=input_ids.device)
    sep = torch.full((batch, 1), backbones.special.sep, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([cls, tilde, sep], dim=1)


def ar_input_ids(backbones: Backbones, input_ids):
    """[batch, n] -> [batch, n] = [START] x_0 .. x_{n-2}: position i holds the token before x_i."""
    start = torch.full((input_ids.shape[0], 1), backbones.special.start, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([start, input_ids[:, :-1]], dim=1)


@torch.no_grad()
def teacher_forced_hidden(backbones: Backbones, input_ids, masked):
    """One MLM pass over the masked sequence and one AR pass over the clean one (no padding).
    Returns mlm_hidden [batch, n, d_mlm] and ar_hidden [batch, n, d_ar], aligned so both predict x_i at i."""
    mlm_ids = mlm_input_ids(backbones, input_ids, masked)
    mlm_hidden = backbones.mlm_hidden(mlm_ids, torch.ones_like(mlm_ids))[:, 1:-1]
    ar_hidden, _ = backbones.ar_hidden(ar_input_ids(backbones, input_ids))
    return mlm_hidden, ar_hidden


def masked_nll(head: FusionHead, mlm_hidden, ar_hidden, input_ids, masked):
    """Negative log-likelihood of the true tokens at masked positions: [number of masked tokens]."""
    logits = head(mlm_hidden[masked], ar_hidden[masked])  # [m, V]
    return F.cross_entropy(logits, input_ids[masked], reduction="none")
