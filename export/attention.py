"""The step graph's attention as one ONNX Runtime node per layer (com.microsoft MultiHeadAttention, on the CPU and
CUDA, fp32 and fp16) in place of the matmuls, scale, mask, softmax and transposes that eager attention traces to.

The node takes the query as [b, T, heads * head_dim] and the cache's keys and values as they lie in the slot buffers,
[b, heads, C, head_dim] each (the "BNSH" layout: no copy), with the additive mask as its attention bias. Only
where every query head has its own key/value head: the node has no grouped-query form over a given cache.
"""

import torch


class FusedAttention(torch.autograd.Function):
    """query [b, heads, T, d], keys and values [b, heads, C, d], bias [b, heads, T, C] -> [b, T, heads, d]."""

    @staticmethod
    def forward(ctx, query, key, value, bias, scaling: float, heads: int):
        scores = torch.matmul(query * scaling, key.transpose(2, 3)) + bias
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(weights, value).transpose(1, 2).contiguous()

    @staticmethod
    def symbolic(g, query, key, value, bias, scaling: float, heads: int):
        flat = g.op(
            "Reshape", g.op("Transpose", query, perm_i=[0, 2, 1, 3]), g.op("Constant", value_t=torch.tensor([0, 0, -1]))
        )
        none = g.op("prim::Constant")
        none.setType(torch._C.OptionalType.ofTensor())  # an input left out
        output = g.op(
            "com.microsoft::MultiHeadAttention", flat, key, value, none, none, bias, num_heads_i=heads, scale_f=scaling
        )
        output.setType(flat.type())
        return g.op("Reshape", output, g.op("Constant", value_t=torch.tensor([0, 0, heads, -1])))
