"""Whole-text AR scores from the bundle, spans of unknown length, and reranking: correctness against a hand
computation with the PyTorch backbones (quality is measured in MODEL.md, not asserted here)."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from maria_onnx.checkpoint import load_maria
from runtime.choose import Sampling
from runtime.infiller import Infiller
from runtime.likelihood import ar_loglikelihood, ar_sample
from runtime.text import MAX_CANDIDATES, span_candidates


def hand_loglikelihood(backbones, ids) -> float:
    """log p_AR(x) = sum_i log softmax(AR([START] x_<i))[x_i], straight from the Hugging Face model."""
    x = torch.tensor([ids])
    inputs = torch.cat([torch.tensor([[backbones.special.start]]), x[:, :-1]], dim=1)
    with torch.no_grad():
        logits = backbones.ar(inputs).logits[0, :, : backbones.vocab_size].double()
    return float(logits.log_softmax(-1)[torch.arange(len(ids)), x[0]].sum())


@pytest.fixture(scope="module")
def olmo(bundles, checkpoints):
    backbones, _, _ = load_maria(checkpoints["olmo"])
    return Infiller(bundles["olmo"], device="cpu"), backbones


def test_ar_loglikelihood_matches_the_model(olmo):
    infiller, backbones = olmo
    rng = np.random.default_rng(0)
    ids = [rng.integers(6, backbones.vocab_size, n) for n in (7, 19, 1)]
    got = ar_loglikelihood(infiller.backend, ids, infiller.special, batch_size=2)   # padded batches
    assert got == pytest.approx([hand_loglikelihood(backbones, x.tolist()) for x in ids], abs=1e-4)


def test_the_span_length_is_the_candidate_the_ar_likes_best(olmo):
    infiller, backbones = olmo
    result = infiller.infill(["the value [MASK:1-3] of the list"])[0]
    assert 1 <= result.span_lengths[0] <= 3 and len(result.masked_positions) == result.span_lengths[0]
    assert [c["lengths"] for c in result.candidates] == [[1], [2], [3]]
    for candidate in result.candidates:                # each score is log p_AR of that candidate's filled text
        assert candidate["score"] == pytest.approx(hand_loglikelihood(backbones, candidate["ids"]), abs=1e-4)
        assert infiller.tokenizer.decode(candidate["ids"]) == candidate["text"]
    best = max(result.candidates, key=lambda c: c["score"])
    assert result.text == best["text"] and result.score == best["score"]
    assert json.loads(json.dumps(result.to_dict()))["span_lengths"] == result.span_lengths


def test_any_length_means_one_to_eight_and_the_product_is_bounded():
    assert [lengths for lengths, _ in span_candidates("a [MASK:?] b", 100)] == [(n,) for n in range(1, 9)]
    assert len(span_candidates("[MASK:?] [MASK:?]", 100)) == 64 == MAX_CANDIDATES
    with pytest.raises(ValueError, match="allow 512 combinations of lengths, over 64"):
        span_candidates("[MASK:?] [MASK:?] [MASK:?]", 100)
    with pytest.raises(ValueError, match="a span of 4 to 2 tokens"):
        span_candidates("[MASK:4-2]", 100)


def test_rerank_orders_samples_by_their_whole_text_score(olmo):
    infiller, backbones = olmo
    results = infiller.infill(["a [MASK:2] of the [MASK]"], Sampling(temperature=2.0, seed=4), num_samples=6,
                              rerank=True)
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    for result in results:
        assert result.score == pytest.approx(hand_loglikelihood(backbones, result.ids), abs=1e-4)
    plain = infiller.infill(["a [MASK:2] of the [MASK]"], Sampling(temperature=2.0, seed=4), num_samples=6)
    assert sorted(r.text for r in plain) == sorted(r.text for r in results)    # the same samples, reordered


def test_ar_sampling_continues_each_prefix(olmo):
    infiller, backbones = olmo
    prefixes = [np.array([7, 8, 9]), np.array([], dtype=np.int64)]
    rngs = [np.random.default_rng([1, i]) for i in range(2)]
    out = ar_sample(infiller.backend, prefixes, 5, infiller.special, Sampling(), rngs)
    assert [len(x) for x in out] == [8, 5] and out[0][:3].tolist() == [7, 8, 9]
    x = torch.tensor([[backbones.special.start, 7, 8, 9]])
    with torch.no_grad():                              # greedy: the first token is the AR's argmax
        logits = backbones.ar(x).logits[0, -1, : backbones.vocab_size]
    logits[backbones.special.all] = -float("inf")
    assert out[0][3] == int(logits.argmax())


def test_cli_reports_the_chosen_length(bundles):
    result = CliRunner().invoke(app, ["infill", "the [MASK:?] value", "--model", str(bundles["llama"]), "--json",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["candidates"]) == 8 and 1 <= out["span_lengths"][0] <= 8
