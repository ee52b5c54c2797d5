"""The MARIA model in PyTorch: backbone checks, product-of-experts initialisation, the reference infiller."""

import numpy as np
import pytest
import torch

from maria_onnx.backbones import load_backbones
from maria_onnx.model import FusionHead, ar_input_ids, masked_nll, mlm_input_ids, teacher_forced_hidden
from maria_onnx.reference import reference_infill, reference_score
from maria_onnx.runtime.choose import Sampling
from maria_onnx.tools.tiny import make_pair


def random_case(rng, backbones, length, rate):
    ids = rng.integers(5, backbones.vocab_size, size=length)
    masked = rng.random(length) < rate
    masked[rng.integers(length)] = True
    return ids, masked


@pytest.fixture(scope="module", params=["olmo", "olmo2", "llama"])
def model(request, pairs):
    backbones = load_backbones(*pairs[request.param])
    head = FusionHead.product_of_experts(backbones)
    torch.manual_seed(1)
    with torch.no_grad():  # a head that is not the average, so the tests see both halves of W
        head.linear.weight.add_(0.05 * torch.randn_like(head.linear.weight))
    return backbones, head


@pytest.mark.parametrize("ar_type", ["olmo", "olmo2", "llama"])
def test_product_of_experts_is_the_average_of_the_two_models(pairs, ar_type):
    backbones = load_backbones(*pairs[ar_type])
    head = FusionHead.product_of_experts(backbones)
    ids = torch.randint(5, backbones.vocab_size, (2, 12))
    masked = torch.rand(2, 12) < 0.5
    mlm_hidden, ar_hidden = teacher_forced_hidden(backbones, ids, masked)
    with torch.no_grad():
        mlm_logits = backbones.mlm(mlm_input_ids(backbones, ids, masked)).logits[:, 1:-1, : backbones.vocab_size]
        ar_logits = backbones.ar(ar_input_ids(backbones, ids)).logits
        fused = head(mlm_hidden, ar_hidden)
    torch.testing.assert_close(fused, (mlm_logits + ar_logits) / 2, atol=1e-5, rtol=1e-5)


def test_product_of_experts_is_made_where_the_backbones_are(pairs):
    """Training on CUDA loads the backbones on the GPU: the head and its bias are made there, not on the CPU
    (the meta device stands in for a GPU here)."""
    backbones = load_backbones(*pairs["olmo"])
    backbones.mlm.to("meta"), backbones.ar.to("meta")
    head = FusionHead.product_of_experts(backbones)
    assert {p.device.type for p in head.parameters()} == {"meta"}


def test_cached_infill_agrees_with_a_teacher_forced_pass(model):
    """Log-probs of the cached left-to-right fills equal one full pass over the filled text."""
    backbones, head = model
    rng = np.random.default_rng(0)
    for rate in (0.1, 0.5, 0.9):
        ids, masked = random_case(rng, backbones, 20, rate)
        fill = reference_infill(backbones, head, [ids], [masked])[0]
        assert np.array_equal(fill.ids[~masked], ids[~masked])
        assert np.array_equal(fill.positions, np.flatnonzero(masked))
        with torch.no_grad():
            nll = masked_nll(
                head,
                *teacher_forced_hidden(backbones, torch.from_numpy(fill.ids)[None], torch.from_numpy(masked)[None]),
                torch.from_numpy(fill.ids)[None],
                torch.from_numpy(masked)[None],
            )
        np.testing.assert_allclose(-fill.logprobs, nll.numpy(), atol=1e-4)
        # greedy: no token the UTF-8 rule allows scores higher than the chosen one at the first masked position
        first = np.flatnonzero(masked)[0]
        logits = head(
            *(
                h[:, first]
                for h in teacher_forced_hidden(
                    backbones, torch.from_numpy(fill.ids)[None], torch.from_numpy(masked)[None]
                )
            )
        )[0]
        logits = logits.detach()
        logits[
            [
                backbones.special.mask,
                backbones.special.pad,
                backbones.special.cls,
                backbones.special.sep,
                backbones.special.start,
            ]
        ] = -float("inf")
        allowed = backbones.utf8.allowed(ids, np.flatnonzero(masked), 0)
        if allowed is not None:
            logits[torch.from_numpy(~allowed)] = -float("inf")
        assert int(logits.argmax()) == fill.ids[first]


def test_batched_reference_equals_one_by_one(model):
    backbones, head = model
    rng = np.random.default_rng(1)
    cases = [random_case(rng, backbones, int(rng.integers(3, 30)), float(rng.uniform(0.1, 0.9))) for _ in range(7)]
    ids, masked = [c[0] for c in cases], [c[1] for c in cases]
    alone = [reference_infill(backbones, head, [x], [m])[0] for x, m in zip(ids, masked)]
    batched = reference_infill(backbones, head, ids, masked, batch_size=4)
    for a, b in zip(alone, batched):
        assert np.array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    scores = reference_score(backbones, head, [f.ids for f in alone], masked, batch_size=3)
    np.testing.assert_allclose(scores, [-f.logprobs.sum() for f in alone], atol=1e-4)


def test_sampling_is_repeatable_and_never_picks_special_tokens(model):
    backbones, head = model
    rng = np.random.default_rng(2)
    ids, masked = random_case(rng, backbones, 40, 0.9)
    sampling = Sampling(temperature=5.0, top_k=0, top_p=1.0, seed=7)
    first = reference_infill(backbones, head, [ids] * 3, [masked] * 3, sampling)
    again = reference_infill(backbones, head, [ids] * 3, [masked] * 3, sampling)
    other = reference_infill(backbones, head, [ids] * 3, [masked] * 3, Sampling(temperature=5.0, seed=8))
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(first, again))
    assert any(not np.array_equal(a.ids, b.ids) for a, b in zip(first, other))
    special = {
        backbones.special.mask,
        backbones.special.pad,
        backbones.special.cls,
        backbones.special.sep,
        backbones.special.start,
    }
    assert not special & {int(t) for f in first for t in f.ids[f.positions]}
    top1 = reference_infill(backbones, head, [ids], [masked], Sampling(temperature=1.0, top_k=1, seed=3))[0]
    assert np.array_equal(top1.ids, reference_infill(backbones, head, [ids], [masked])[0].ids)


def test_text_without_masks_comes_back_unchanged(model):
    backbones, head = model
    ids = np.arange(5, 15)
    fill = reference_infill(backbones, head, [ids], [np.zeros(10, dtype=bool)])[0]
    assert np.array_equal(fill.ids, ids) and len(fill.positions) == 0


def test_pair_with_another_vocabulary_is_refused(tmp_path):
    mlm, ar = make_pair(tmp_path, "olmo", ar_tokenizer_seed=5)
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        load_backbones(mlm, ar)


def test_unsupported_architecture_and_missing_folder(pairs, tmp_path):
    mlm, ar = pairs["olmo"]
    with pytest.raises(ValueError, match="'olmo' model; supported MLM architectures: modernbert"):
        load_backbones(ar, ar)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_backbones(tmp_path / "nowhere", ar)
