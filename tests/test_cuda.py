"""On an NVIDIA GPU: the runtime on ONNX Runtime's CUDA execution provider against the PyTorch reference on the same
GPU (fp32 bundles; fp16 with eager and fused attention), IO binding on against off, greedy choices made on the
device against on the host, CUDA graphs against plain steps, and `maria serve --device cuda`. Skipped, with the
reason printed, where CUDA cannot run (no GPU, no onnxruntime-gpu, no CUDA libraries)."""

import json

import numpy as np
import pytest
import torch
from test_runtime import random_cases

from maria_onnx.checkpoint import load_maria
from maria_onnx.export.bundle import export_bundle
from maria_onnx.reference import reference_infill, reference_score
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.sessions import cuda_missing
from maria_onnx.tools.tiny import corpus

MISSING = cuda_missing() or (None if torch.cuda.is_available() else "PyTorch sees no CUDA device")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"needs CUDA: {MISSING}")


@pytest.fixture(scope="module", params=["olmo", "llama"])
def on_gpu(request, bundles, checkpoints):
    """(fp32 bundle on CUDA, PyTorch backbones and head on CUDA, checkpoint)."""
    backbones, head, _ = load_maria(checkpoints[request.param], device="cuda")
    return Infiller(bundles[request.param], device="cuda"), backbones, head, checkpoints[request.param]


def test_the_sessions_and_the_cache_are_on_the_gpu(on_gpu):
    infiller = on_gpu[0]
    assert infiller.device == "cuda" and infiller.backend.io_binding
    for session in (infiller.backend.mlm, infiller.backend.step, infiller.backend.head):
        assert session.get_providers()[0] == "CUDAExecutionProvider"
    cache = infiller.backend.new_cache(2, 32)
    assert all(buffer.device_name().lower() == "cuda" for buffer in cache.buffers)


@pytest.mark.parametrize("decoder", ["engine", "concat"])
def test_fp32_fills_and_scores_match_pytorch_on_the_same_gpu(on_gpu, decoder):
    infiller, backbones, head, _ = on_gpu
    infiller = Infiller(infiller.bundle, device="cuda", decoder=decoder)
    ids, masked = random_cases(np.random.default_rng(1), backbones.vocab_size, 24)
    want = reference_infill(backbones, head, ids, masked, batch_size=4)
    got = infiller.fill_ids(ids, masked, batch_size=4)
    for g, w in zip(got, want):
        assert np.array_equal(g.ids, w.ids)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-3)
    filled = [w.ids for w in want]
    np.testing.assert_allclose(
        infiller.score(filled, masked, batch_size=4),
        reference_score(backbones, head, filled, masked),
        rtol=1e-3,
        atol=1e-3,
    )


def test_io_binding_on_and_off_give_the_same_fills(on_gpu):
    bound = Infiller(on_gpu[0].bundle, device="cuda", decoder="concat")
    unbound = Infiller(on_gpu[0].bundle, device="cuda", decoder="concat", io_binding=False)
    assert bound.backend.io_binding and not unbound.backend.io_binding
    ids, masked = random_cases(np.random.default_rng(2), bound.manifest.vocab_size, 16)
    for a, b in zip(bound.fill_ids(ids, masked, batch_size=4), unbound.fill_ids(ids, masked, batch_size=4)):
        assert np.array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


def test_greedy_steps_choose_on_the_gpu(on_gpu):
    """The engine's greedy fills chosen on the device (runtime/graphs/greedy.onnx on CUDA: only ids and
    log-probabilities read back), speculating too, fill as with the logits read back to the host."""
    bound = Infiller(on_gpu[0].bundle, device="cuda", speculate=4)
    unbound = Infiller(on_gpu[0].bundle, device="cuda", speculate=4, io_binding=False)
    ids, masked = random_cases(np.random.default_rng(4), bound.manifest.vocab_size, 16)
    for a, b in zip(bound.fill_ids(ids, masked, batch_size=4), unbound.fill_ids(ids, masked, batch_size=4)):
        assert np.array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-4)
    assert bound.backend.greedy.get_providers()[0] == "CUDAExecutionProvider"


def test_cuda_graph_steps_fill_like_plain_steps(on_gpu):
    plain = Infiller(on_gpu[0].bundle, device="cuda")
    graphed = Infiller(on_gpu[0].bundle, device="cuda", cuda_graph=True)
    assert graphed.backend.cuda_graph
    ids, masked = random_cases(np.random.default_rng(3), plain.manifest.vocab_size, 16)
    for _ in range(2):  # the second pass replays the captured graphs
        for a, b in zip(plain.fill_ids(ids, masked, batch_size=4), graphed.fill_ids(ids, masked, batch_size=4)):
            assert np.array_equal(a.ids, b.ids)
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("attention", ["eager", "fused"])
def test_fp16_bundle_on_cuda_against_pytorch_fp16(checkpoints, tmp_path, attention):
    export_bundle(checkpoints["olmo"], tmp_path / "fp16", dtype="fp16", attention=attention)
    infiller = Infiller(tmp_path / "fp16", device="cuda")
    assert infiller.manifest.dtype == "fp16"
    backbones, head, _ = load_maria(checkpoints["olmo"], device="cuda", dtype=torch.float16)
    ids, masked = random_cases(np.random.default_rng(4), backbones.vocab_size, 24)
    want = reference_infill(backbones, head, ids, masked, batch_size=4)
    got = infiller.fill_ids(ids, masked, batch_size=4)
    same = np.concatenate([g.ids[m] == w.ids[m] for g, w, m in zip(got, want, masked)])
    assert same.mean() >= 0.9, f"fp16 greedy fills agree with PyTorch fp16 on {same.mean():.3f} of masked tokens"
    filled = [w.ids for w in want]
    scores = np.array(infiller.score(filled, masked, batch_size=4))
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, reference_score(backbones, head, filled, masked), rtol=3e-2, atol=3e-2)


def test_serve_on_cuda_answers(bundles):
    from test_serve import call, oip, server

    reference = Infiller(bundles["olmo"], device="cpu")
    words = corpus(1, seed=9)[0].split()
    texts = [" ".join(words[:2] + ["[MASK]"] + words[3:-2] + ["[MASK:2]"])]  # --device cuda: CUDA or no server
    with server("--model", bundles["olmo"], device="cuda") as (url, _):
        status, _, body = call(url, "/v2/models/maria/infer", oip(texts))
        assert status == 200
        got = {o["name"]: o for o in json.loads(body)["outputs"]}["text"]["data"]
    assert got == [r.text for r in reference.infill(texts)]
