"""The step graph's rotary position embedding as one ONNX Runtime node per query and key (com.microsoft
RotaryEmbedding, on the CPU and CUDA, fp32 and fp16) instead of the Slice, Neg, Concat, Mul and Add nodes the model's
own apply_rotary_pos_emb traces to, and without the cos and sin computed from the positions at every step: the
model's rotary module gives its cos and sin for every position once, at export, and the graph looks them up.

While the step is exported, the AR family's apply_rotary_pos_emb is swapped for fused_rotary_pos_emb, and ArStep
hands the layers RotaryTables as their position embeddings (the layers pass them through as (cos, sin)). Only where
the tables hold what the model computes: rotary embeddings over the whole head (no partial rotary) whose angles
depend on the position alone (not dynamic or long-context scaling chosen by the sequence's length).
"""

import contextlib
import sys

import torch

STATIC_ROPE = ("default", "linear", "llama3")


class FusedRotary(torch.autograd.Function):
    """x [b, heads, T, head_dim] rotated at position_ids [b, T] by tables [positions, head_dim / 2] (the rotate-half
    layout). The node reads [b, T, heads * head_dim]: the transposes around it cancel the layer's own, so attention
    gets the query in the layout it had (a query transposed inside the matmul costs the CPU's GEMM a pass)."""

    @staticmethod
    def forward(ctx, x, position_ids, cos_table, sin_table, head_dim: int):
        cos, sin = cos_table[position_ids][:, None].to(x.dtype), sin_table[position_ids][:, None].to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

    @staticmethod
    def symbolic(g, x, position_ids, cos_table, sin_table, head_dim: int):
        flat = g.op(
            "Reshape", g.op("Transpose", x, perm_i=[0, 2, 1, 3]), g.op("Constant", value_t=torch.tensor([0, 0, -1]))
        )
        rotated = g.op("com.microsoft::RotaryEmbedding", flat, position_ids, cos_table, sin_table, interleaved_i=0)
        rotated.setType(flat.type())  # torch.onnx cannot infer a custom node's type; it is its input's
        heads = g.op("Reshape", rotated, g.op("Constant", value_t=torch.tensor([0, 0, -1, head_dim])))
        return g.op("Transpose", heads, perm_i=[0, 2, 1, 3])


class RotaryTables:
    """The layers' position embeddings where the rotary embedding is fused: the model's cos and sin for each of
    `positions` positions, and the step's positions, clamped into the tables (a chunk's padding may lie past the
    model's last position; its keys are overwritten before any token attends to them)."""

    def __init__(self, rotary_emb, hidden, position_ids, positions: int, head_dim: int):
        cos, sin = rotary_emb(hidden, torch.arange(positions, device=position_ids.device)[None])
        self.cos, self.sin = cos[0, :, : head_dim // 2], sin[0, :, : head_dim // 2]
        self.position_ids, self.head_dim = position_ids.clamp(max=positions - 1), head_dim

    def __iter__(self):  # a layer unpacks its position embeddings as (cos, sin)
        return iter((self, None))


def fused_rotary_pos_emb(q, k, tables: RotaryTables, _=None, *args, **kwargs):
    return tuple(
        FusedRotary.apply(x, tables.position_ids, tables.cos.to(x.dtype), tables.sin.to(x.dtype), tables.head_dim)
        for x in (q, k)
    )


def _family(base_model):
    return sys.modules[type(base_model.layers[0].self_attn).__module__]


def fusable(base_model, head_dim: int) -> bool:
    """Whether the tables would hold what the model computes (see the module's docstring)."""
    rotary = getattr(base_model, "rotary_emb", None)
    if rotary is None or not hasattr(_family(base_model), "apply_rotary_pos_emb"):
        return False
    if getattr(rotary, "rope_type", "default") not in STATIC_ROPE:
        return False
    probe = torch.zeros(1, 1, 1, dtype=torch.float32)
    cos, _ = rotary(probe, torch.zeros(1, 1, dtype=torch.long))
    return cos.shape[-1] == head_dim


@contextlib.contextmanager
def fused_rotary(base_model):
    """The AR family's apply_rotary_pos_emb swapped for fused_rotary_pos_emb while the step is exported."""
    family = _family(base_model)
    original = family.apply_rotary_pos_emb
    family.apply_rotary_pos_emb = fused_rotary_pos_emb
    try:
        yield
    finally:
        family.apply_rotary_pos_emb = original
