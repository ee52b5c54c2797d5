"""The AR step graph over a preallocated KV cache (ar_step.onnx), exported from the Hugging Face model itself.

    input_ids     [b, T]          the chunk of each row, right-padded
    position_ids  [b, T]          each token's position in its sequence, which is also its slot in the cache
    cache.N.key   [b, kv_heads, C, head_dim]: the keys of layer N, C positions per row
    cache.N.value [b, kv_heads, head_dim, C]: its values, stored transposed (or [b, kv_heads, C, head_dim] as the
                  keys, with --attention fused; the manifest's values_transposed says which)
 -> last_hidden_state [b, T, d_ar], and cache_out.N.key / cache_out.N.value: the same buffers with the chunk's
    keys and values written at position_ids (ScatterND: one head_dim row per token and head; ScatterElements: one
    element per token, head and dimension, for transposed values)

The runtime binds cache_out.* to the very memory of cache.*, and ONNX Runtime's scatters skip their copy when
input and output are one buffer: the cache is written in place and never copied. Attention reads the whole buffer
and masks what a query may not see: key j is visible to the token at position p when j <= p, so each row reads its
own history (slots past a row's length hold stale values and stay masked), and no attention mask is fed.

Eager attention (the default) takes the cache as the operand ONNX Runtime's CPU GEMM reads in place in both of
its products: scores as keys @ queries^T (then transposed, [b, kv, C, T] is small) and the output as
weights @ (values^T)^T. Written the textbook way (queries @ keys^T, weights @ values), a chunk of more than one
token makes the GEMM repack each row's whole cache first (measured: docs/benchmarks.md, "CPU: the decode engine
against the concat decoder"). Fused attention is one ONNX Runtime node a layer (export/attention.py); on the CPU
it is the slower of the two (docs/benchmarks.md). The decoder layers and norms are the model's own modules; the
cache and the attention function are ours, so every family whose layers take (position_embeddings,
past_key_values) exports through one path. The rotary embedding is one ONNX Runtime node per query and key over
tables of the model's own cos and sin where those tables hold what the model computes (export/rotary.py), and the
model's own function elsewhere.
"""

import contextlib
from pathlib import Path

import torch
from transformers import AttentionInterface

from maria_onnx.runtime.slots import capacity_axis

from .attention import FusedAttention
from .rotary import RotaryTables, fusable, fused_rotary
from .weights import exporting

STEP_FILE = "ar_step.onnx"
ATTENTION = "maria_slots"
FUSED_ATTENTION = "maria_slots_fused"


class StepCache:
    """The Hugging Face Cache interface over given buffers (keys [b, kv, C, head_dim], values [b, kv, head_dim, C]
    transposed, or [b, kv, C, head_dim] as the keys): update() writes the chunk's keys and values at position_ids
    and returns the layer's two buffers."""

    def __init__(
        self, buffers: list, position_ids: torch.Tensor, kv_heads: int, head_dim: int, values_transposed: bool
    ):
        self.buffers, self.values_transposed = list(buffers), values_transposed
        batch = position_ids.shape[0]
        self.key_index = (
            torch.arange(batch, device=position_ids.device)[:, None, None],
            torch.arange(kv_heads, device=position_ids.device)[None, :, None],
            position_ids[:, None, :],
        )
        if values_transposed:  # [b, kv, d, T]
            self.value_index = position_ids[:, None, None, :].expand(batch, kv_heads, head_dim, -1)

    def update(self, key, value, layer_idx: int, cache_kwargs=None):
        keys, values = 2 * layer_idx, 2 * layer_idx + 1
        dtype = self.buffers[keys].dtype
        self.buffers[keys] = self.buffers[keys].index_put(self.key_index, key.to(dtype))
        if self.values_transposed:
            self.buffers[values] = self.buffers[values].scatter(3, self.value_index, value.transpose(2, 3).to(dtype))
        else:
            self.buffers[values] = self.buffers[values].index_put(self.key_index, value.to(dtype))
        return self.buffers[keys], self.buffers[values]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def slot_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention without repeating the shared key/value heads: the query heads of one group are folded
    into its rows. query [b, h, T, d], key [b, kv, C, d], value [b, kv, d, C] (transposed), attention_mask
    [b, 1, T, C] additive (already repeated for the groups, see ArStep). Products in the order the module
    docstring explains."""
    groups = module.num_key_value_groups
    if groups > 1:
        batch, heads, width, dim = query.shape
        query = query.reshape(batch, heads // groups, groups * width, dim)
    scores = torch.matmul(key, (query * scaling).transpose(2, 3)).transpose(2, 3)
    weights = torch.softmax(scores + attention_mask, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value.transpose(2, 3))
    if groups > 1:
        output = output.reshape(batch, heads, width, dim)
    return output.transpose(1, 2).contiguous(), None


def fused_slot_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """export/attention.py's node: query [b, h, T, d], key and value [b, h, C, d], attention_mask [b, h, T, C]."""
    return FusedAttention.apply(query, key, value, attention_mask, scaling, module.config.num_attention_heads), None


AttentionInterface.register(ATTENTION, slot_attention)
AttentionInterface.register(FUSED_ATTENTION, fused_slot_attention)


def _sliding_window(config) -> int | None:
    """The window a model's attention is limited to, where one applies (Mistral, Qwen2 with use_sliding_window)."""
    window = getattr(config, "sliding_window", None)
    if window is None or (hasattr(config, "use_sliding_window") and not config.use_sliding_window):
        return None
    return window if window < config.max_position_embeddings else None


def check_fused_attention(config) -> None:
    """Refuses --attention fused for an AR whose query heads share key/value heads: the node has no such form."""
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    if kv_heads != config.num_attention_heads:
        raise ValueError(
            f"--attention fused needs a key/value head for every query head; this AR shares {kv_heads} "
            f"among {config.num_attention_heads}; use --attention eager"
        )


class ArStep(torch.nn.Module):
    """The AR base model (embeddings, decoder layers, final norm) as one step over the slot cache."""

    def __init__(self, base_model, fuse_rotary: bool = True, fuse_attention: bool = False):
        """fuse_rotary: the rotary embedding as export/rotary.py's nodes, where the model's allows; fuse_attention:
        attention as export/attention.py's node (the values then lie as the keys do), which needs a key/value head
        for every query head."""
        super().__init__()
        if _sliding_window(base_model.config) is not None:
            raise ValueError(
                f"the AR uses sliding-window attention (window {base_model.config.sliding_window}); "
                "the step graph supports full attention only"
            )
        self.base = base_model
        config = base_model.config
        self.kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.groups = config.num_attention_heads // self.kv_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.fuse_rotary = fuse_rotary and fusable(base_model, self.head_dim)
        if fuse_attention:
            check_fused_attention(config)
        self.fuse_attention = fuse_attention
        self.values_transposed = not fuse_attention  # the cache's value layout (runtime/slots.py)

    def forward(self, input_ids, position_ids, *cache):
        base = self.base
        hidden = base.embed_tokens(input_ids)
        slots = torch.arange(cache[0].shape[2], device=input_ids.device)
        visible = slots[None, None, :] <= position_ids[:, :, None]  # [b, T, C]
        mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~visible, torch.finfo(hidden.dtype).min)[:, None]  # [b, 1, T, C]
        if self.groups > 1:  # [b, 1, groups * T, C]
            mask = mask[:, :, None].expand(-1, -1, self.groups, -1, -1).flatten(2, 3)
        if self.fuse_attention:  # [b, heads, T, C]: ONNX Runtime 1.20 misreads a bias broadcast over heads
            mask = mask.expand(-1, self.kv_heads, -1, -1)
        if self.fuse_rotary:
            position_embeddings = RotaryTables(
                base.rotary_emb, hidden, position_ids, base.config.max_position_embeddings, self.head_dim
            )
        else:
            position_embeddings = base.rotary_emb(hidden, position_ids)
        step_cache = StepCache(cache, position_ids, self.kv_heads, self.head_dim, self.values_transposed)
        for layer in base.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=step_cache,
                position_embeddings=position_embeddings,
            )
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return (base.norm(hidden), *step_cache.buffers)


def step_names(layers: int) -> tuple[list[str], list[str]]:
    """The step graph's input and output names."""
    cache = [f"cache.{n}.{kind}" for n in range(layers) for kind in ("key", "value")]
    return (
        ["input_ids", "position_ids", *cache],
        ["last_hidden_state", *[name.replace("cache.", "cache_out.") for name in cache]],
    )


def export_step(ar_model, folder: Path, opset: int, fuse_attention: bool = False) -> tuple[list[str], list[str]]:
    """Writes ar_step.onnx (fp32) from the AR's base model; returns (inputs, outputs). fuse_attention: see ArStep."""
    step = ArStep(ar_model.base_model, fuse_attention=fuse_attention).eval()
    config = step.base.config
    inputs, outputs = step_names(config.num_hidden_layers)
    value_shape = (step.head_dim, 8) if step.values_transposed else (8, step.head_dim)
    cache = [
        torch.zeros(2, step.kv_heads, *shape)
        for _ in range(config.num_hidden_layers)
        for shape in ((8, step.head_dim), value_shape)
    ]
    example = (torch.tensor([[5, 6, 7], [8, 9, 1]]), torch.tensor([[0, 1, 2], [0, 1, 2]]), *cache)
    dynamic = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
        **{
            name: {0: "batch_size", capacity_axis(name, step.values_transposed): "capacity"}
            for name in inputs[2:] + outputs[1:]
        },
    }
    previous = config._attn_implementation
    config._attn_implementation = FUSED_ATTENTION if step.fuse_attention else ATTENTION
    try:
        with (
            torch.no_grad(),
            exporting(folder, STEP_FILE) as path,
            fused_rotary(step.base) if step.fuse_rotary else contextlib.nullcontext(),
        ):
            torch.onnx.export(
                step,
                example,
                str(path),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic,
                opset_version=opset,
                dynamo=False,
                custom_opsets={"com.microsoft": 1},
            )
    finally:
        config._attn_implementation = previous
    return inputs, outputs
