"""Whole-text AR scores from the bundle, spans of unknown length, and reranking: correctness against a hand
computation with the PyTorch backbones (quality is measured in MODEL.md, not asserted here)."""

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from maria_onnx.checkpoint import load_maria
from maria_onnx.cli import app
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.likelihood import ar_loglikelihood, ar_sample
from maria_onnx.runtime.requests import FillRequest
from maria_onnx.runtime.spans import GapSearch
from maria_onnx.runtime.text import MAX_CANDIDATES, span_candidates, with_lengths


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
    got = ar_loglikelihood(infiller.backend, ids, infiller.special, batch_size=2)  # padded batches
    assert got == pytest.approx([hand_loglikelihood(backbones, x.tolist()) for x in ids], abs=1e-4)


def test_the_span_length_is_the_candidate_the_ar_likes_best(olmo):
    infiller, backbones = olmo
    result = infiller.infill(["the value [MASK:1-3] of the list"])[0]
    assert 1 <= result.span_lengths[0] <= 3 and len(result.masked_positions) == result.span_lengths[0]
    assert [c["lengths"] for c in result.candidates] == [[1], [2], [3]]
    for candidate in result.candidates:  # each score is log p_AR of that candidate's filled text
        assert candidate["score"] == pytest.approx(hand_loglikelihood(backbones, candidate["ids"]), abs=1e-4)
        assert infiller.tokenizer.decode(candidate["ids"]) == candidate["text"]
    best = max(result.candidates, key=lambda c: c["score"])
    assert result.text == best["text"] and result.score == best["score"]
    assert json.loads(json.dumps(result.to_dict()))["span_lengths"] == result.span_lengths


def test_any_length_means_one_to_eight_and_beyond_64_combinations_the_lengths_are_searched():
    assert [lengths for lengths, _ in span_candidates("a [MASK:?] b", 100)] == [(n,) for n in range(1, 9)]
    assert len(span_candidates("[MASK:?] [MASK:?]", 100)) == 64 == MAX_CANDIDATES
    assert span_candidates("[MASK:?] [MASK:?] [MASK:?]", 100) is None  # 512: searched gap by gap
    assert with_lengths("[MASK:?] a [MASK:2-5]. [MASK]", (3, 4)) == "[MASK:3] a [MASK:4]. [MASK]"
    with pytest.raises(ValueError, match="a span of 4 to 2 tokens"):
        span_candidates("[MASK:4-2]", 100)
    with pytest.raises(
        ValueError, match=re.escape("'[MASK:1-200]' allows 200 lengths, over 64; narrow it to at most 64 ([MASK:1-64])")
    ):
        span_candidates("x [MASK:1-200] y", 300)
    with pytest.raises(ValueError, match="the span markers allow 264 lengths in all, over 256"):
        span_candidates("[MASK:?] " * 33, 300)


def search(ranges: list[range], score) -> tuple[GapSearch, int]:
    """Runs a GapSearch with `score` standing for the decoded texts' scores: (the search, its rounds)."""
    gaps, rounds = GapSearch(ranges), 0
    while pending := gaps.pending():
        assert not set(pending) & set(gaps.scores)  # nothing is decoded twice
        varying = [gap for gap in range(len(ranges)) if len({lengths[gap] for lengths in pending}) > 1]
        assert len(varying) <= 1  # one gap at a time, the others held
        gaps.scores.update({lengths: score(*lengths) for lengths in pending})
        rounds += 1
    return gaps, rounds


@pytest.mark.parametrize(
    "score, best, rounds",
    [
        # gaps that do not interact: the best of all, found in the first pass and checked in a second
        (lambda a, b, c: -((a - 5) ** 2) - (b - 3) ** 2 - (c - 2) ** 2, (5, 3, 2), 5),
        # coupled gaps: a and c climb a step each pass, and MAX_PASSES (3) stops them short of (6, 3, 5)
        (lambda a, b, c: -((a - 6) ** 2) - (b - 3) ** 2 - 2 * (c - a + 1) ** 2, (5, 3, 4), 9),
        # held where no single gap improves, though (8, 3, 4) is better
        (lambda a, b, c: -((a - 2 * c) ** 2) - 0.1 * (c - 4) ** 2 - (b - 3) ** 2, (2, 3, 1), 4),
    ],
)
def test_the_gap_search_climbs_one_gap_at_a_time(score, best, rounds):
    gaps, taken = search([range(1, 9), range(2, 6), range(1, 9)], score)
    assert gaps.best == best and taken == rounds and len(gaps.scores) < gaps.combinations == 256


def test_a_gap_search_ends_where_no_gap_improves_and_each_candidate_is_its_own_fill(olmo):
    infiller, backbones = olmo
    text = "a [MASK:?] of the [MASK:1-4] list [MASK:?] b"  # 8 x 4 x 8 = 256 combinations
    result = infiller.infill([text])[0]
    assert "searched gap by gap" in result.note and len(result.candidates) < 64
    tried = {tuple(c["lengths"]): c for c in result.candidates}
    best = tuple(result.span_lengths)
    assert tried[best]["text"] == result.text and result.score == max(c["score"] for c in result.candidates)
    for gap, allowed in enumerate([range(1, 9), range(1, 5), range(1, 9)]):  # no single gap does better
        for n in allowed:
            assert tried[best[:gap] + (n,) + best[gap + 1 :]]["score"] <= result.score
    for lengths in list(tried)[:: max(1, len(tried) // 4)]:  # a candidate is the fill of its fixed-length text
        alone = infiller.infill([with_lengths(text, lengths)])[0]
        assert alone.text == tried[lengths]["text"]
        assert tried[lengths]["score"] == pytest.approx(hand_loglikelihood(backbones, alone.ids), abs=1e-4)


def test_a_single_span_markers_lengths_are_decoded_together_whatever_the_bound():
    assert len(span_candidates("a [MASK:?] b", 64, most=1)) == 8
    assert span_candidates("a [MASK:?] b [MASK:1-2]", 64, most=16) is not None
    assert span_candidates("a [MASK:?] b [MASK:1-2]", 64, most=15) is None


def test_each_round_of_a_search_is_a_decode_batch_of_its_own_rows(olmo):
    infiller, _ = olmo
    request = FillRequest([infiller.prepare("a [MASK:?] of the [MASK:1-4] list [MASK:?] b", False)])
    batches = []
    result = infiller.infill_requests([request], on_batch=lambda rows, ns: batches.append((rows, ns)))[0][0]
    rows = [rows for rows, _ in batches]
    assert len(rows) > 1 and max(rows) <= request.size and sum(rows) == len(result.candidates)
    assert all(ns > 0 for _, ns in batches)


def test_a_searched_text_samples_the_same_whatever_it_is_batched_with(olmo):
    infiller, _ = olmo
    text, sampling = "[MASK:?] a [MASK:?] b [MASK:?]", Sampling(temperature=1.5, seed=9)
    alone = infiller.infill([text], sampling, num_samples=2)
    mixed = infiller.infill(["the [MASK] list", text], sampling, num_samples=2, batch_size=3, indices=[5, 0])
    assert [r.to_dict() for r in mixed[2:]] == [r.to_dict() for r in alone]
    assert len({r.text for r in alone}) == 2


def test_rerank_orders_samples_by_their_whole_text_score(olmo):
    infiller, backbones = olmo
    results = infiller.infill(
        ["a [MASK:2] of the [MASK]"], Sampling(temperature=2.0, seed=4), num_samples=6, rerank=True
    )
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    for result in results:
        assert result.score == pytest.approx(hand_loglikelihood(backbones, result.ids), abs=1e-4)
    plain = infiller.infill(["a [MASK:2] of the [MASK]"], Sampling(temperature=2.0, seed=4), num_samples=6)
    assert sorted(r.text for r in plain) == sorted(r.text for r in results)  # the same samples, reordered


def test_ar_sampling_continues_each_prefix(olmo):
    infiller, backbones = olmo
    prefixes = [np.array([7, 8, 9]), np.array([], dtype=np.int64)]
    rngs = [np.random.default_rng([1, i]) for i in range(2)]
    out = ar_sample(infiller.backend, prefixes, 5, infiller.special, Sampling(), rngs)
    assert [len(x) for x in out] == [8, 5] and out[0][:3].tolist() == [7, 8, 9]
    x = torch.tensor([[backbones.special.start, 7, 8, 9]])
    with torch.no_grad():  # greedy: the first token is the AR's argmax
        logits = backbones.ar(x).logits[0, -1, : backbones.vocab_size]
    logits[backbones.special.all] = -float("inf")
    assert out[0][3] == int(logits.argmax())


def test_cli_reports_the_chosen_length(bundles):
    result = CliRunner().invoke(
        app, ["infill", "the [MASK:?] value", "--model", str(bundles["llama"]), "--json", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["candidates"]) == 8 and 1 <= out["span_lengths"][0] <= 8


def test_the_insertion_score_judges_a_fill_by_its_context_and_its_mean(tmp_path):
    """insertion_scores: the given tokens' log p_AR, plus each run of fills' mean; and a request with
    span_score="insertion" keeps the candidate it scores best."""
    from maria_onnx.runtime.default_model import DEFAULT_MODEL
    from maria_onnx.runtime.likelihood import ar_token_logprobs, insertion_scores
    from maria_onnx.runtime.requests import FillRequest

    infiller = Infiller(DEFAULT_MODEL, device="cpu")
    ids = np.array(infiller.tokenizer.encode("The exception is raised when the file is missing.").ids)
    masked = np.zeros(len(ids), bool)
    masked[[2, 3, 6]] = True
    (per_token,) = ar_token_logprobs(infiller.backend, [ids], infiller.special)
    want = per_token[~masked].sum() + per_token[[2, 3]].mean() + per_token[6]
    assert insertion_scores(infiller.backend, [ids], [masked], infiller.special) == [pytest.approx(want)]
    text = "Use the [MASK:1-6] module to read files."
    request = FillRequest([infiller.prepare(text)], span_score="insertion")
    (chosen,) = infiller.infill_requests([request])[0]
    start = chosen.masked_positions[0]
    candidates = [np.array(c["ids"]) for c in chosen.candidates]
    lengths = [c["lengths"][0] for c in chosen.candidates]
    flags = [np.isin(np.arange(len(x)), range(start, start + n)) for x, n in zip(candidates, lengths)]
    scores = insertion_scores(infiller.backend, candidates, flags, infiller.special)
    assert chosen.span_lengths == chosen.candidates[int(np.argmax(scores))]["lengths"]
    assert chosen.score == pytest.approx(max(scores))
