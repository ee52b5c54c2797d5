"""Export: three graphs that agree with PyTorch, a manifest that round-trips, checksums, and clear refusals."""

import collections
import json
import os
import shutil
import weakref

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from maria_onnx.checkpoint import load_maria
from maria_onnx.cli import app
from maria_onnx.export import bundle as bundle_module
from maria_onnx.export import quantize as quantize_module
from maria_onnx.export import validate as validate_module
from maria_onnx.export.bundle import export_bundle
from maria_onnx.export.validate import ValidationError
from maria_onnx.runtime.errors import SettingError
from maria_onnx.runtime.manifest import MANIFEST_NAME, Manifest, load_manifest

AR_TYPES = ["olmo", "olmo2", "llama"]


def session(folder, name):
    return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("ar_type", AR_TYPES)
def test_validation_report_is_within_tolerance(bundles, ar_type):
    report = json.loads((bundles[ar_type] / "validation.json").read_text())
    assert {c["graph"] for c in report["checks"]} == {
        "mlm",
        "ar_decoder",
        "ar_step",
        "fusion_head",
        "ar_lm_head",
        "mlm_decoder",
    }
    assert all(c["max_abs_diff"] <= c["tolerance"] <= 1e-3 for c in report["checks"])
    assert report["end_to_end"]["top1_agreement"] == 1.0
    assert report["end_to_end"]["engine_greedy_fill_agreement"] == 1.0


@pytest.mark.parametrize("ar_type", AR_TYPES)
def test_mlm_and_head_graphs_match_pytorch(bundles, checkpoints, ar_type):
    backbones, head, _ = load_maria(checkpoints[ar_type])
    rng = np.random.default_rng(0)
    ids = rng.integers(5, backbones.vocab_size, (3, 29))
    mask = np.ones_like(ids)
    mask[1, 11:], mask[2, 20:] = 0, 0
    (got,) = session(bundles[ar_type], "mlm.onnx").run(None, {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        want = backbones.mlm_hidden(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-4)
    for batch in (1, 3):
        mlm_hidden = rng.standard_normal((batch, head.mlm_hidden_size)).astype(np.float32)
        ar_hidden = rng.standard_normal((batch, backbones.ar_hidden_size)).astype(np.float32)
        (logits,) = session(bundles[ar_type], "fusion_head.onnx").run(
            None, {"mlm_hidden": mlm_hidden, "ar_hidden": ar_hidden}
        )
        with torch.no_grad():
            want = head(torch.from_numpy(mlm_hidden), torch.from_numpy(ar_hidden)).numpy()
        assert logits.dtype == np.float32 and logits.shape == (batch, backbones.vocab_size)
        np.testing.assert_allclose(logits, want, atol=1e-4)


@pytest.mark.parametrize("ar_type", AR_TYPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_decoder_matches_one_full_pass(bundles, checkpoints, ar_type, batch):
    """Prefill a chunk from an empty past, then decode tokens one by one; rows padded to other lengths."""
    backbones, _, _ = load_maria(checkpoints[ar_type])
    manifest = load_manifest(bundles[ar_type])
    decoder = session(bundles[ar_type], "ar_decoder.onnx")
    rng = np.random.default_rng(batch)
    total, prefill = 12, 7
    ids = rng.integers(5, backbones.vocab_size, (batch, total))
    mask = np.ones((batch, total), dtype=np.int64)
    mask[1:, :2] = 0  # rows 1.. are left-padded by two: holes in the cache
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    past = {
        name: np.zeros((batch, manifest.num_key_value_heads, 0, manifest.head_dim), np.float32)
        for name in manifest.graph("ar_decoder").inputs
        if name.startswith("past_key_values.")
    }
    hidden = []
    for begin, end in [(0, prefill)] + [(t, t + 1) for t in range(prefill, total)]:
        outputs = dict(
            zip(
                [o.name for o in decoder.get_outputs()],
                decoder.run(
                    None,
                    {
                        "input_ids": ids[:, begin:end],
                        "attention_mask": mask[:, :end],
                        "position_ids": positions[:, begin:end],
                        **past,
                    },
                ),
            )
        )
        past = {name: outputs[name.replace("past_key_values.", "present.")] for name in past}
        hidden.append(outputs["last_hidden_state"])
        assert outputs["present.0.key"].shape[2] == end
    with torch.no_grad():
        full = backbones.ar.base_model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
        ).last_hidden_state.numpy()
    real = mask == 1
    np.testing.assert_allclose(np.concatenate(hidden, axis=1)[real], full[real], atol=1e-4)


def test_manifest_round_trips_and_describes_the_graphs(bundles, checkpoints):
    folder = bundles["llama"]
    manifest = load_manifest(folder)
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    backbones, _, _ = load_maria(checkpoints["llama"])
    assert manifest.num_key_value_heads == backbones.ar.config.num_key_value_heads == 2  # grouped-query
    assert manifest.num_hidden_layers == 2 and manifest.vocab_size == backbones.vocab_size
    assert manifest.special_ids.mask == backbones.special.mask
    for name in ("mlm", "ar_decoder", "ar_step", "fusion_head", "ar_lm_head", "mlm_decoder"):
        spec = manifest.graph(name)
        graph = session(folder, spec.file)
        assert [i.name for i in graph.get_inputs()] == spec.inputs
        assert [o.name for o in graph.get_outputs()] == spec.outputs
    assert manifest.graph("ar_decoder").outputs[0] == "last_hidden_state"
    assert set(manifest.files) == {
        "mlm.onnx",
        "ar_decoder.onnx",
        "ar_step.onnx",
        "fusion_head.onnx",
        "ar_lm_head.onnx",
        "mlm_decoder.onnx",
        "tokenizer.json",
        "validation.json",
    }
    assert set(manifest.source["versions"]) >= {"torch", "transformers", "onnx", "optimum-onnx"}


@pytest.mark.parametrize(
    "name", ["mlm.onnx", "ar_decoder.onnx", "fusion_head.onnx", "tokenizer.json", "validation.json"]
)
def test_a_changed_byte_fails_the_checksum(bundles, tmp_path, name):
    folder = shutil.copytree(bundles["olmo"], tmp_path / "bundle")
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 1
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{name} fails its sha256 check"):
        load_manifest(folder)


def test_newer_schema_and_missing_manifest_are_refused(bundles, tmp_path):
    folder = shutil.copytree(bundles["olmo"], tmp_path / "bundle")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    (folder / MANIFEST_NAME).write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ValueError, match="schema 99, newer than"):
        load_manifest(folder)
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="maria.json is missing"):
        load_manifest(folder)


def test_a_checkpoint_given_as_a_bundle_is_named(checkpoints):
    result = CliRunner().invoke(app, ["infill", "a [MASK]", "--model", str(checkpoints["olmo"]), "--device", "cpu"])
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {checkpoints['olmo']} is a training checkpoint, not a bundle; export it first: maria export "
        f"{checkpoints['olmo']} --out BUNDLE"
    )


@pytest.mark.parametrize("dtype, quantize", [("fp16", None), ("fp32", "int8"), ("fp32", "int4")])
def test_reduced_precision_exports_are_judged_at_their_own_level(checkpoints, tmp_path, dtype, quantize):
    manifest = export_bundle(checkpoints["olmo"], tmp_path / "b", dtype=dtype, quantize=quantize)
    report = json.loads((tmp_path / "b" / "validation.json").read_text())
    end = report["end_to_end"]
    assert report["variant"] == (quantize or "fp16")
    if quantize is None:
        assert end["top1_agreement"] >= end["least_top1_agreement"]
    else:  # against PyTorch's fp32: relative errors within the bound, clear choices kept
        bound, agreement = validate_module.QUANTIZED[quantize]
        assert 0 < max(c["relative_error"] for c in report["checks"]) <= bound
        assert 0 < end["logits_relative_error"] <= bound and end["clear_choices"] > 0
        assert end["clear_top1_agreement"] >= agreement and end["engine_clear_agreement"] >= agreement
        assert manifest.source["quantization"] == quantize_module.settings(quantize)
    assert manifest.dtype == dtype
    assert manifest.quantization == {None: "none", "int8": "int8-dynamic", "int4": "int4-weight-only"}[quantize]
    (logits,) = session(tmp_path / "b", "fusion_head.onnx").run(
        None,
        {
            "mlm_hidden": np.zeros((1, manifest.mlm_hidden_size), np.float16 if dtype == "fp16" else np.float32),
            "ar_hidden": np.zeros((1, manifest.ar_hidden_size), np.float16 if dtype == "fp16" else np.float32),
        },
    )
    assert logits.dtype == np.float32


def test_int4_quantizes_every_weight_matrix_and_leaves_the_embeddings(checkpoints, tmp_path):
    export_bundle(checkpoints["llama"], tmp_path / "b", quantize="int4")
    for file in ("mlm.onnx", "ar_step.onnx", "ar_decoder.onnx", "fusion_head.onnx", "ar_lm_head.onnx"):
        graph = onnx.load(str(tmp_path / "b" / file)).graph
        constants = {t.name for t in graph.initializer}
        kinds = collections.Counter(n.op_type for n in graph.node)
        weighted = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in constants]
        assert kinds["MatMulNBits"] > 0 and not weighted, (file, weighted)
        gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in constants]
        assert all(numpy_helper.to_array(graph_tensor(graph, n.input[0])).dtype == np.float32 for n in gathers)
    for node in onnx.load(str(tmp_path / "b" / "ar_step.onnx")).graph.node:
        if node.op_type == "MatMulNBits":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert (attributes["bits"], attributes["block_size"], attributes["accuracy_level"]) == (4, 32, 4)


def graph_tensor(graph, name: str):
    return next(t for t in graph.initializer if t.name == name)


def test_a_broken_quantized_bundle_is_refused(checkpoints, tmp_path, monkeypatch):
    """Scales of the step graph's int4 weights turned around, as a faulty quantizer might write them: the relative
    errors are near 1 and the export is refused, leaving nothing."""
    real = quantize_module.to_int4

    def broken(path, large):
        model = real(path, large)
        if path.name == "ar_step.onnx":
            for tensor in model.graph.initializer:
                if tensor.name.endswith("_scales"):
                    tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor)[::-1].copy(), tensor.name))
        return model

    monkeypatch.setattr(quantize_module, "to_int4", broken)
    with pytest.raises(ValidationError, match=r"ar_step.onnx output 'last_hidden_state' differs from PyTorch's fp32"):
        export_bundle(checkpoints["olmo"], tmp_path / "b", quantize="int4")
    assert list(tmp_path.iterdir()) == []


def test_validation_holds_one_ar_graph_at_a_time(checkpoints, tmp_path, monkeypatch):
    """ar_decoder.onnx is validated on a backend of its own, gone before ar_step.onnx's is made: at OLMo-1B shapes
    each AR graph is 4.7 GB in fp32."""
    live, opened = weakref.WeakSet(), []
    real = bundle_module.OnnxBackend

    def tracked(*args, **kwargs):
        assert not live, "a backend was still alive when the next one was made"
        backend = real(*args, **kwargs)
        opened.append((backend.ar is not None, backend.step is not None))
        live.add(backend)
        return backend

    monkeypatch.setattr(bundle_module, "OnnxBackend", tracked)
    export_bundle(checkpoints["olmo"], tmp_path / "b")
    assert opened == [(True, False), (False, True)]
    opened.clear()
    export_bundle(checkpoints["olmo"], tmp_path / "c", concat_decoder=False)
    assert opened == [(False, True)]


def test_failed_validation_names_the_graph_and_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(validate_module.TOLERANCE, "fp32", (1e-12, 1.0))
    with pytest.raises(ValidationError, match=r"mlm.onnx output 'hidden_states' differs from PyTorch by"):
        export_bundle(checkpoints["olmo"], tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_are_refused_before_anything_is_written(checkpoints, pairs, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a MARIA checkpoint"):
        export_bundle(tmp_path, tmp_path / "b")
    moved = shutil.copytree(checkpoints["olmo"], tmp_path / "moved")
    config = json.loads((moved / "maria_config.json").read_text())
    (moved / "maria_config.json").write_text(json.dumps({**config, "ar_path": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match="AR backbone folder .*gone.* does not exist"):
        export_bundle(moved, tmp_path / "b")
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="cannot write the bundle"):
        export_bundle(checkpoints["olmo"], tmp_path / "file" / "b")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_bundle(checkpoints["olmo"], tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "moved", "taken"]


def test_unsupported_architecture_is_refused(checkpoints, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    ar = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300)).save_pretrained(ar)
    folder = shutil.copytree(checkpoints["olmo"], tmp_path / "ckpt")
    config = json.loads((folder / "maria_config.json").read_text())
    (folder / "maria_config.json").write_text(json.dumps({**config, "ar_path": str(ar)}))
    with pytest.raises(ValueError, match="'gpt2' model; supported AR architectures"):
        export_bundle(folder, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_graphs_with_external_weights_export_and_load(checkpoints, tmp_path, monkeypatch, dtype):
    """Graphs over 2 GB come out of Optimum with their weights in <name>_data; the bundle keeps them external."""
    import onnx

    from maria_onnx.runtime.infiller import Infiller

    export_backbones = bundle_module.export_backbones

    def as_if_large(backbones, folder, opset, concat_decoder):
        specs = export_backbones(backbones, folder, opset, concat_decoder)
        for name in ("mlm.onnx", "ar_decoder.onnx"):
            onnx.save(
                onnx.load(str(folder / name)),
                str(folder / name),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=name + "_data",
                size_threshold=0,
            )
        return specs

    monkeypatch.setattr(bundle_module, "export_backbones", as_if_large)
    manifest = export_bundle(checkpoints["llama"], tmp_path / "b", dtype=dtype)
    referenced = set()
    for name in ("mlm.onnx", "ar_decoder.onnx"):
        graph = onnx.load(str(tmp_path / "b" / name), load_external_data=False).graph
        referenced |= {
            entry.value for tensor in graph.initializer for entry in tensor.external_data if entry.key == "location"
        }
    assert referenced and referenced <= set(manifest.files)  # external weights ship, checksummed
    assert not [name for name in manifest.files if name.endswith("_data")]
    assert len(Infiller(tmp_path / "b", device="cpu").infill(["a [MASK:2] b"])[0].fills) == 2


@pytest.mark.parametrize("dtype, quantize", [("fp32", None), ("fp16", None), ("fp32", "int4")])
def test_tensors_written_one_file_each_end_up_in_one_weights_file_per_graph(
    checkpoints, tmp_path, monkeypatch, dtype, quantize
):
    """torch.onnx writes a graph over 2 GB with each tensor in a file of its own, named after the tensor (Optimum
    gathers only the initializers among them): at OLMo-1B size the bundle held 293 loose files, and fp16 failed
    to save a 2.4 GB graph. Every graph is made to come out that way here. Every file of the bundle is as readable
    as the others (onnx writes a weights file private: at OLMo-1B size the int4 and fp16 step graphs' were)."""
    import onnx

    from maria_onnx.runtime.infiller import Infiller

    export = torch.onnx.export

    def scattered(model, args, f, **options):
        export(model, args, f, **options)
        onnx.save(
            onnx.load(str(f)), str(f), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0
        )

    monkeypatch.setattr(torch.onnx, "export", scattered)
    manifest = export_bundle(checkpoints["llama"], tmp_path / "b", dtype=dtype, quantize=quantize)
    graphs = {spec.file for spec in manifest.graphs.values()}
    weights = {name for name in manifest.files if name.endswith(".weights")}
    assert weights and weights <= {graph + ".weights" for graph in graphs}
    assert set(manifest.files) == graphs | weights | {"tokenizer.json", "validation.json"}
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == sorted({*manifest.files, MANIFEST_NAME})
    umask = os.umask(0)
    os.umask(umask)
    assert {name: (tmp_path / "b" / name).stat().st_mode & 0o777 for name in manifest.files} == {
        name: 0o666 & ~umask for name in manifest.files
    }
    assert len(Infiller(tmp_path / "b", device="cpu").infill(["a [MASK:2] b"])[0].fills) == 2


def test_baseline_heads_match_the_backbones_and_can_be_left_out(bundles, checkpoints, tmp_path):
    backbones, _, _ = load_maria(checkpoints["olmo"])
    manifest = load_manifest(bundles["olmo"])
    assert {"ar_lm_head.onnx", "mlm_decoder.onnx"} <= set(manifest.files) and manifest.has_baseline_heads
    rng = np.random.default_rng(2)
    ar_hidden = rng.standard_normal((3, manifest.ar_hidden_size)).astype(np.float32)
    mlm_hidden = rng.standard_normal((3, manifest.mlm_hidden_size)).astype(np.float32)
    (ar_logits,) = session(bundles["olmo"], "ar_lm_head.onnx").run(None, {"ar_hidden": ar_hidden})
    (mlm_logits,) = session(bundles["olmo"], "mlm_decoder.onnx").run(None, {"mlm_hidden": mlm_hidden})
    with torch.no_grad():
        want_ar = backbones.ar.lm_head(torch.from_numpy(ar_hidden))[:, : backbones.vocab_size]
        want_mlm = backbones.mlm.decoder(torch.from_numpy(mlm_hidden))[:, : backbones.vocab_size]
    np.testing.assert_allclose(ar_logits, want_ar.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(mlm_logits, want_mlm.numpy(), atol=1e-4, rtol=1e-4)
    lean = export_bundle(checkpoints["olmo"], tmp_path / "lean", baseline_heads=False)
    assert not lean.has_baseline_heads and "ar_lm_head.onnx" not in lean.files
    from maria_onnx.runtime.infiller import Infiller

    infiller = Infiller(tmp_path / "lean", device="cpu")
    assert infiller.infill(["a [MASK] b"])[0].fills
    with pytest.raises(ValueError, match="has no ar_lm_head.onnx .*re-export"):
        infiller.backend.ar_logits(ar_hidden)
    with pytest.raises(ValueError, match="^span markers need the AR's whole-text score, and this bundle has no"):
        infiller.prepare("a [MASK:1-3] b", rerank=False, most=8)
    with pytest.raises(SettingError) as refused:  # each front end words the setting its own way
        infiller.prepare("a [MASK] b", rerank=True, most=8)
    assert str(refused.value).startswith("rerank needs the AR's whole-text score")
    assert refused.value.worded(lambda name: f"--{name}").startswith("--rerank needs")


def test_an_fp16_bundle_computes_in_fp16(checkpoints, tmp_path):
    """ONNX Runtime's CPU provider, saving an optimized fp16 graph, writes into it the Casts to fp32 its own kernels
    need: the shipped shapes' fp16 step graph held 113 (every MatMul's weights cast to fp32 and its output back),
    the MLM 106, and a GPU ran them at every step. In an fp16 bundle no backbone weight is cast and every MatMul
    of the backbones reads fp16 weights (the heads are linear layers in fp32 by design, fp16 hidden states in)."""
    import onnx

    manifest = export_bundle(checkpoints["llama"], tmp_path / "b", dtype="fp16")
    for spec in (manifest.graph(name) for name in ("mlm", "ar_step", "ar_decoder")):
        graph = onnx.load(str(tmp_path / "b" / spec.file)).graph
        weights = {tensor.name: tensor.data_type for tensor in graph.initializer}
        assert not [node.name for node in graph.node if node.op_type == "Cast" and node.input[0] in weights], spec.file
        read = [
            weights[name] for node in graph.node if node.op_type == "MatMul" for name in node.input if name in weights
        ]
        assert read and set(read) == {onnx.TensorProto.FLOAT16}, spec.file


def test_an_int4_bundle_fills_scores_serves_and_round_trips_through_its_manifest(checkpoints, tmp_path):
    from maria_onnx.runtime.infiller import Infiller

    manifest = export_bundle(checkpoints["olmo"], tmp_path / "b", quantize="int4", concat_decoder=False)
    again = load_manifest(tmp_path / "b")  # checksums verified
    assert again == manifest and Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert again.quantization == "int4-weight-only" and again.source["quantization"]["block_size"] == 32
    infiller = Infiller(tmp_path / "b", device="cpu")
    (filled,) = infiller.infill(["a [MASK:3] b"])
    assert len(filled.fills) == 3 and all(lp <= 0 for lp in filled.fill_logprobs)
    (nll,) = infiller.score([np.array(filled.ids)], [np.isin(np.arange(len(filled.ids)), filled.masked_positions)])
    assert np.isfinite(nll) and nll > 0
    pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn, prometheus-client) is not installed")
    from tests.test_serve import call, server

    with server("--model", tmp_path / "b") as (url, _):
        status, _, body = call(url, "/v1/infill", {"text": ["a [MASK:3] b"]})
    assert status == 200 and json.loads(body)["results"][0]["fills"] == filled.fills


def test_the_shipped_model_quantized_in_place_of_an_export_keeps_a_valid_manifest(tmp_path):
    from maria_onnx.runtime.default_model import DEFAULT_MODEL
    from maria_onnx.runtime.infiller import Infiller
    from maria_onnx.tools.quantized_quality import quantized_copy

    copy = quantized_copy(DEFAULT_MODEL, tmp_path / "int4", "int4")
    manifest = load_manifest(copy)  # every checksum renewed
    assert manifest.quantization == "int4-weight-only" and manifest.source["quantized_from"] == str(DEFAULT_MODEL)
    step = onnx.load(str(copy / "ar_step.onnx"), load_external_data=False)
    assert "MatMulNBits" in {node.op_type for node in step.graph.node}
    assert len(Infiller(copy, device="cpu").infill(["The [MASK] statement"])[0].fills) == 1
