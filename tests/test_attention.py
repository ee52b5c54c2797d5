"""`maria export --attention fused`: the step graph's attention as one ONNX Runtime MultiHeadAttention node a
layer (export/attention.py), over a cache whose values lie as its keys do. Fills and scores as the eager graph's,
on every path the engine takes; refused, before anything is written, for an AR whose query heads share key/value
heads."""

import collections

import numpy as np
import onnx
import pytest
from test_runtime import random_cases
from typer.testing import CliRunner

from maria_onnx.checkpoint import load_maria
from maria_onnx.cli import app
from maria_onnx.export.bundle import export_bundle
from maria_onnx.reference import reference_infill
from maria_onnx.runtime.infiller import Infiller


@pytest.fixture(scope="module")
def fused(checkpoints, tmp_path_factory):
    """ar_type -> a bundle of the checkpoint exported with --attention fused (validated by the export itself)."""
    root = tmp_path_factory.mktemp("fused")
    for ar_type in ("olmo", "olmo2"):
        export_bundle(checkpoints[ar_type], root / ar_type, attention="fused", concat_decoder=False)
    return {ar_type: root / ar_type for ar_type in ("olmo", "olmo2")}


def test_one_attention_node_a_layer_over_values_laid_out_as_keys(fused):
    infiller = Infiller(fused["olmo"], device="cpu")
    graph = onnx.load(str(fused["olmo"] / "ar_step.onnx")).graph
    ops = collections.Counter(node.op_type for node in graph.node)
    layers = infiller.manifest.num_hidden_layers
    assert ops["MultiHeadAttention"] == layers and not ops["Softmax"] and not ops["ScatterElements"]
    cache = infiller.backend.new_cache(2, 32)
    m = infiller.manifest
    assert not cache.values_transposed
    assert [b.shape for b in cache.buffers] == [(2, m.num_key_value_heads, 32, m.head_dim)] * (2 * layers)


@pytest.mark.parametrize("ar_type", ["olmo", "olmo2"])
def test_fused_fills_equal_the_pytorch_reference_and_the_eager_graph(fused, bundles, checkpoints, ar_type):
    """Ragged chunks through 3 slots, slots reused (the engine's CPU path), and every step over all slots with
    chunks padded to a power of two (the path it takes on CUDA)."""
    backbones, head, _ = load_maria(checkpoints[ar_type])
    ids, masked = random_cases(np.random.default_rng(3), backbones.vocab_size, 9)
    want = reference_infill(backbones, head, ids, masked, batch_size=9)
    eager = Infiller(bundles[ar_type], device="cpu", decoder="engine").fill_ids(ids, masked, batch_size=3)
    infiller = Infiller(fused[ar_type], device="cpu")
    got = infiller.fill_ids(ids, masked, batch_size=3)
    infiller.backend.on_device = True
    device_like = infiller.fill_ids(ids, masked, batch_size=3)
    for g, w, e, d in zip(got, want, eager, device_like):
        assert np.array_equal(g.ids, w.ids) and np.array_equal(g.ids, e.ids) and np.array_equal(d.ids, w.ids)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)
        np.testing.assert_allclose(d.logprobs, w.logprobs, atol=1e-4)
    filled = [w.ids for w in want]
    np.testing.assert_allclose(
        Infiller(fused[ar_type], device="cpu").score(filled, masked, batch_size=4),
        Infiller(bundles[ar_type], device="cpu").score(filled, masked, batch_size=4),
        atol=1e-4,
    )


def test_an_fp16_fused_bundle_runs_its_attention_in_fp16(checkpoints, tmp_path):
    export_bundle(checkpoints["olmo"], tmp_path / "fp16", dtype="fp16", attention="fused", concat_decoder=False)
    graph = onnx.load(str(tmp_path / "fp16" / "ar_step.onnx")).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    attention = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
    assert attention and all(
        types[name] == onnx.TensorProto.FLOAT16
        for node in attention
        for name in [*node.input, *node.output]
        if name in types
    )
    assert all(name in types for node in attention for name in node.input[1:3])  # the cache, fp16


def test_grouped_query_attention_is_refused_before_anything_is_written(checkpoints, tmp_path):
    result = CliRunner().invoke(
        app, ["export", str(checkpoints["llama"]), "--out", str(tmp_path / "b"), "--attention", "fused"]
    )
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "error: --attention fused needs a key/value head for every query head; this AR shares 2 among 4; use "
        "--attention eager"
    )
    assert not (tmp_path / "b").exists()
    result = CliRunner().invoke(
        app, ["export", str(checkpoints["olmo"]), "--out", str(tmp_path / "b"), "--attention", "flash"]
    )
    assert result.exit_code == 2 and "--attention must be eager or fused, got 'flash'" in result.output


def test_a_manifest_that_misnames_the_value_layout_is_refused(fused, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(fused["olmo"], tmp_path / "misnamed")
    manifest = json.loads((folder / "maria.json").read_text())
    (folder / "maria.json").write_text(json.dumps({**manifest, "values_transposed": True}))
    with pytest.raises(ValueError, match=r"ar_step.onnx 'cache.0.value' is .* re-export the bundle"):
        Infiller(folder, device="cpu")
    (folder / "maria.json").write_text(json.dumps({**manifest, "values_transposed": "no"}))
    with pytest.raises(ValueError, match="'values_transposed' must be bool, got 'no'"):
        Infiller(folder, device="cpu")
