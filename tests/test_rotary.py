"""The step graph's rotary embedding as ONNX Runtime's RotaryEmbedding nodes (export/rotary.py): where it applies,
what it replaces, and positions past the model's last one."""

import collections

import numpy as np
import onnx
import pytest
import torch
from transformers import LlamaConfig, LlamaModel, OlmoConfig, OlmoModel

from maria_onnx.export.rotary import fusable
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.manifest import load_manifest

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    max_position_embeddings=64,
)


@pytest.mark.parametrize("ar_type", ["olmo", "olmo2", "llama"])
def test_the_step_rotates_queries_and_keys_in_one_node_each(bundles, ar_type):
    """Two RotaryEmbedding nodes a layer and none of the model's own rotary arithmetic (Neg, Sin, Cos); the
    bundle's validation (tests/test_export.py) compares the step with the model's own function."""
    manifest = load_manifest(bundles[ar_type])
    graph = onnx.load(str(bundles[ar_type] / "ar_step.onnx")).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    assert ops["RotaryEmbedding"] == 2 * manifest.num_hidden_layers
    assert not ops["Neg"] and not ops["Sin"] and not ops["Cos"]


def test_only_tables_that_hold_what_the_model_computes_are_fused():
    """Full-head rotary with angles from the position alone is fused; angles that depend on the sequence's length
    (dynamic scaling) or a rotary part of the head (partial rotary) keep the model's own function."""
    torch.manual_seed(0)
    assert fusable(OlmoModel(OlmoConfig(**SMALL)), 8)
    assert fusable(LlamaModel(LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0})), 8)
    assert not fusable(LlamaModel(LlamaConfig(**SMALL, rope_scaling={"rope_type": "dynamic", "factor": 2.0})), 8)
    assert not fusable(LlamaModel(LlamaConfig(**SMALL, partial_rotary_factor=0.5)), 8)


def test_padding_past_the_models_last_position_leaves_the_real_tokens_alone(bundles):
    """A chunk's right padding may lie past the model's last position (a row near its end beside a row feeding a
    long chunk): those positions are clamped into the tables, and the real token's hidden state is the one it has
    fed alone."""
    infiller = Infiller(bundles["olmo"], device="cpu")
    last = infiller.manifest.max_sequence_length  # the tiny AR's 512 positions: 0 .. 511
    backend = infiller.backend
    position = 510
    alone = backend.cache_step(np.array([[7]]), np.array([[position]]), backend.new_cache(1, 528))
    padded = backend.cache_step(
        np.array([[7, 1, 1, 1]]), np.array([[position + i for i in range(4)]]), backend.new_cache(1, 528)
    )
    assert position + 3 > last and np.isfinite(padded).all()
    np.testing.assert_allclose(padded[0, 0], alone[0, 0], atol=1e-5)
