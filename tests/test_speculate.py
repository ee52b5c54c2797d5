"""Speculative infilling (Engine(speculate=k)): greedy fills identical to one mask a step for every AR family, with
chunked prefill, continuous batching, span candidates, UTF-8 whole characters, the CLI and the server; sampled fills
drawn from the same distribution (a chi-square test that fails with a wrong acceptance rule); per-text seeds."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from test_runtime import random_cases
from test_serve import ROOT, call, server

from maria_onnx.runtime import choose
from maria_onnx.runtime.anneal import AnnealRequest, Schedule, anneal
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.decode import sequence_rngs
from maria_onnx.runtime.engine import Engine
from maria_onnx.runtime.errors import SettingError
from maria_onnx.runtime.evaluate import draw_masks
from maria_onnx.runtime.infiller import Infiller

FAMILIES = ["olmo", "olmo2", "llama", "qwen2"]
WINDOWS = ROOT / "tests" / "data" / "default_model_eval_windows.npy"


def fills(infiller, ids, masked, sampling=Sampling(), slots=3, **settings):
    """(each sequence's Fill, the engine) through one engine of `slots` slots."""
    engine = Engine(infiller.backend, infiller.special, slots=slots, utf8=infiller.utf8, **settings)
    rngs = sequence_rngs(sampling.seed, len(ids))
    sequences = [engine.submit(x, m, sampling, rng) for x, m, rng in zip(ids, masked, rngs)]
    engine.run()
    return [s.fill() for s in sequences], engine


def assert_same(got, want, atol=1e-4):
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g.ids, w.ids) and np.array_equal(g.positions, w.positions)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=atol)


@pytest.fixture(scope="module")
def shipped():
    return Infiller(device="cpu")


@pytest.fixture(scope="module")
def held_out():
    """Windows of the shipped model's test split, masked at 0.5."""
    windows = [w.astype(np.int64) for w in np.load(WINDOWS)[:24]]
    return windows, draw_masks(windows, 0.5, 7)


@pytest.mark.parametrize("ar_type", FAMILIES)
def test_greedy_fills_equal_one_mask_a_step_for_every_family(bundles, ar_type):
    infiller = Infiller(bundles[ar_type], device="cpu")
    ids, masked = random_cases(np.random.default_rng(11), infiller.manifest.vocab_size, 12)
    want, _ = fills(infiller, ids, masked)
    for k in (2, 4):
        got, engine = fills(infiller, ids, masked, speculate=k, draft_floor=0.0)  # random heads are unsure
        assert engine.drafted > 0
        assert_same(got, want)


def test_on_real_text_drafts_are_kept_in_fewer_steps_with_the_same_fills(shipped, held_out):
    """The shipped model on its test split: MARIA keeps a share of the MLM head's drafts, so the texts take fewer
    steps, and every fill is the one a step at a time gives (slots shared, texts joining as others finish)."""
    ids, masked = held_out
    want, plain = fills(shipped, ids, masked, slots=4)
    for k, floor in ((2, 0.0), (4, 0.0), (8, 0.3)):
        got, engine = fills(shipped, ids, masked, slots=4, speculate=k, draft_floor=floor)
        assert 0 < engine.kept < engine.drafted and engine.steps < plain.steps
        assert_same(got, want)


def test_drafts_below_the_floor_are_not_fed(shipped, held_out):
    ids, masked = held_out
    _, free = fills(shipped, ids, masked, speculate=4)
    _, floored = fills(shipped, ids, masked, speculate=4, draft_floor=0.5)
    _, none = fills(shipped, ids, masked, speculate=4, draft_floor=1.01)
    assert free.drafted > floored.drafted > 0 and floored.kept / floored.drafted > free.kept / free.drafted
    assert none.drafted == 0 and none.steps == fills(shipped, ids, masked)[1].steps


def test_greedy_fills_past_a_rejected_draft_become_the_drafts_there(shipped, held_out):
    """A step's fills past its first rejected draft are dropped, but kept as the sequence's drafts at their
    positions (with their probabilities), and the fills stay those of a step at a time."""
    ids, masked = held_out
    want, _ = fills(shipped, ids[:1], masked[:1])
    engine = Engine(shipped.backend, shipped.special, slots=1, utf8=shipped.utf8, speculate=8, draft_floor=0.0)
    sequence = engine.submit(ids[0], masked[0], Sampling(), np.random.default_rng(0))
    chosen, fuse_best = [], shipped.backend.fuse_best
    shipped.backend.fuse_best = lambda *args: chosen.append(fuse_best(*args)) or chosen[-1]
    refreshed = 0
    try:
        while engine.busy:
            before = sequence.filled
            engine.step()
            tokens, logprobs = chosen[-1]
            dropped = slice(sequence.filled, before + len(tokens))  # fills past the first rejected draft
            assert np.array_equal(sequence.drafts[dropped], tokens[sequence.filled - before :])
            np.testing.assert_allclose(sequence.confidence[dropped], np.exp(logprobs[sequence.filled - before :]))
            refreshed += dropped.stop - dropped.start
    finally:
        shipped.backend.fuse_best = fuse_best
    assert refreshed > 0
    assert_same([sequence.fill()], want)


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_chunked_prefill_and_padded_shapes_keep_the_fills(shipped, held_out, fixed_shapes):
    """A step feeds at most max_chunk tokens a row, drafts or not (padded shapes: a power of two)."""
    ids, masked = held_out
    masked = [m & (np.arange(len(m)) > 20) for m in masked[:8]]  # a first mask past max_chunk
    want, _ = fills(shipped, ids[:8], masked)
    widths, step = [], shipped.backend.cache_step
    shipped.backend.cache_step = lambda x, p, cache: widths.append(x.shape[1]) or step(x, p, cache)
    try:
        got, engine = fills(shipped, ids[:8], masked, speculate=4, max_chunk=8, fixed_shapes=fixed_shapes)
    finally:
        shipped.backend.cache_step = step
    assert engine.kept > 0 and max(widths) == 8
    assert_same(got, want)


def test_span_candidates_and_whole_characters_fill_the_same(shipped):
    """[MASK:?] and [MASK:a-b] candidates, and spans between multi-byte characters, through Infiller.infill."""
    texts = [
        "The [MASK:?] statement is used to raise an [MASK:1-3].",
        "Café [MASK:4] naïve — “[MASK:3]” ☃ [MASK] 🎉.",
        "def read(path):\n    with open(path) as [MASK:2]:\n        return [MASK:5]",
    ]
    want = shipped.infill(texts)
    got = Infiller(device="cpu", speculate=4).infill(texts)
    assert [r.text for r in got] == [r.text for r in want]
    assert all("\ufffd" not in r.text for r in got)


def chi_square(samples: np.ndarray, probs: np.ndarray) -> float:
    """How far samples (ids) lie from probabilities over ids: Pearson's statistic, bins with an expected count under
    5 merged, as a standard normal deviate (Wilson and Hilferty's cube root; about 3.1 at p = 0.001)."""
    expected = probs * len(samples)
    observed = np.bincount(samples, minlength=len(probs)).astype(float)
    small = expected < 5
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    observed, expected = observed[expected > 0], expected[expected > 0]
    statistic, freedom = float(((observed - expected) ** 2 / expected).sum()), len(expected) - 1
    shift = 2 / (9 * freedom)
    return ((statistic / freedom) ** (1 / 3) - (1 - shift)) / np.sqrt(shift)


DRAWS = 3000


def first_fills(infiller, sampling: Sampling, speculate: int) -> tuple[np.ndarray, np.ndarray, Engine]:
    """DRAWS fills of the first of two adjacent masked positions, each with its own generator; that position's
    exact distribution under MARIA (its AR state sees the given tokens only); the engine that filled them."""
    from maria_onnx.runtime.decode import teacher_forced_logits

    rng = np.random.default_rng(0)
    x = rng.integers(5, infiller.manifest.vocab_size, 12)
    masked = np.zeros(12, dtype=bool)
    masked[[5, 6]] = True
    engine = Engine(infiller.backend, infiller.special, slots=256, speculate=speculate, draft_width=16, draft_floor=0.0)
    rngs = [np.random.default_rng([21, i]) for i in range(DRAWS)]
    sequences = [engine.submit(x, masked, sampling, r) for r in rngs]
    engine.run()
    logits = teacher_forced_logits(infiller.backend, [x], [masked], infiller.special)[0][0].astype(np.float64)
    logits[infiller.special.all] = -np.inf
    exact = choose.distribution(logits, sampling)
    return np.array([s.tokens[6] for s in sequences]), exact, engine


SAMPLING = Sampling(temperature=1.0, top_k=12, seed=0)


def test_sampled_fills_follow_marias_distribution(bundles):
    """The first fill is the draft kept or replaced by the rule: its distribution is MARIA's own (chi-square, 3,000
    draws, p > 0.001: a deviate under 3.1), as without speculation; the drafts were kept some of the time and
    replaced the rest."""
    infiller = Infiller(bundles["llama"], device="cpu")
    speculated, exact, engine = first_fills(infiller, SAMPLING, speculate=2)
    plain, _, _ = first_fills(infiller, SAMPLING, speculate=0)
    assert engine.drafted == DRAWS and 0.05 < engine.kept / DRAWS < 0.95
    assert chi_square(plain, exact) < 3.1
    assert chi_square(speculated, exact) < 3.1


def test_a_wrong_acceptance_rule_fails_the_same_test(bundles, monkeypatch):
    """Keeping every draft (the MLM's distribution), or drawing a replaced draft from p instead of max(0, p - q):
    the same chi-square test rejects both."""
    infiller = Infiller(bundles["llama"], device="cpu")

    def always(p, q, draft, rng):
        rng.random()
        return draft

    def from_p(p, q, draft, rng):
        return draft if rng.random() * q[draft] < p[draft] else choose.draw(p, rng)

    for wrong in (always, from_p):
        monkeypatch.setattr(choose, "keep_draft", wrong)
        speculated, exact, _ = first_fills(infiller, SAMPLING, speculate=2)
        assert chi_square(speculated, exact) > 5, wrong.__name__  # p < 3e-7


def test_a_texts_sampled_fills_do_not_depend_on_its_batch(shipped, held_out):
    ids, masked = held_out
    sampling = Sampling(temperature=0.9, top_p=0.95, seed=4)
    together, _ = fills(shipped, ids[:6], masked[:6], sampling, slots=6, speculate=4)
    rngs = sequence_rngs(4, 6)
    for index in (0, 3, 5):
        engine = Engine(shipped.backend, shipped.special, slots=1, utf8=shipped.utf8, speculate=4)
        alone = engine.submit(ids[index], masked[index], sampling, rngs[index])
        engine.run()
        assert_same([alone.fill()], [together[index]], atol=1e-5)


def test_annealing_with_greedy_fills_is_the_same(shipped):
    """Greedy drafts draw nothing, so each sample's re-masking and acceptance draws are as without speculation."""

    def generate(infiller):
        encode = lambda text: np.array(infiller.tokenizer.encode(text, add_special_tokens=False).ids)
        request = AnnealRequest(encode("def read(path):"), encode(" return text"), 10, 3, Schedule(steps=4), Sampling())
        return [(r.text, r.energies, r.accepted) for r in anneal(infiller, request)]

    assert generate(Infiller(device="cpu", speculate=4)) == generate(shipped)


def test_settings_that_cannot_speculate_are_named(bundles, checkpoints, tmp_path):
    from maria_onnx.export.bundle import export_bundle

    with pytest.raises(SettingError, match=r"\{?speculate\}? takes 0"):
        Infiller(bundles["olmo"], device="cpu", speculate=1)
    with pytest.raises(SettingError, match="needs the engine"):
        Infiller(bundles["olmo"], device="cpu", decoder="concat", speculate=2)
    export_bundle(checkpoints["olmo"], tmp_path / "bare", baseline_heads=False)
    with pytest.raises(SettingError, match="mlm_decoder.onnx"):
        Infiller(tmp_path / "bare", device="cpu", speculate=2)


TEXTS = [
    "The [MASK] statement is used to [MASK] an exception.",
    "Use the [MASK:3] module to read [MASK:4] files, then [MASK:2] them.",
    "The with statement is used to wrap the [MASK:6] of a block with methods defined by a context manager.",
]


def test_the_cli_fills_the_same_and_names_a_bad_setting():
    def infill(*args):
        return subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), "infill", "--device", "cpu", "--json", *args, *TEXTS],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    plain, speculated = infill(), infill("--speculate", "4")
    assert speculated.returncode == 0
    for got, want in zip(*(map(json.loads, r.stdout.splitlines()) for r in (speculated, plain)), strict=True):
        assert got["text"] == want["text"] and got["ids"] == want["ids"]
        np.testing.assert_allclose(got["fill_logprobs"], want["fill_logprobs"], atol=1e-4)
    bad = infill("--speculate", "1")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --speculate takes 0 (off) or the masked positions a step may fill, at least 2; got 1"
    ]
    concat = infill("--speculate", "3", "--decoder", "concat")
    assert concat.returncode == 2 and "--decoder" in concat.stderr


def test_the_server_fills_the_same(shipped):
    want = shipped.infill(TEXTS)
    with server("--speculate", "4") as (url, _):
        status, _, body = call(url, "/v1/infill", {"text": TEXTS})
        metrics = call(url, "/metrics")[2].decode()
    assert status == 200
    assert [r["text"] for r in json.loads(body)["results"]] == [r.text for r in want]
    drafts, kept = (float(re.search(rf"^{name}_total (\S+)$", metrics, re.M).group(1)) for name in COUNTERS)
    assert drafts >= kept > 0


COUNTERS = ("maria_drafts", "maria_drafts_kept")


def test_a_draft_the_utf8_rule_refuses_is_not_fed(shipped):
    """A draft MARIA could never keep (a lone continuation byte where a character must start) ends the chunk
    before it: greedy drafts are cut there, and the fills are as without drafts."""
    continuation = next(i for i, data in enumerate(shipped.utf8.data) if data == b"\x80")
    encoded = shipped.encode("Hello [MASK:4] world, and [MASK:3] more.")
    want, _ = fills(shipped, [encoded.ids], [encoded.masked])
    engine = Engine(shipped.backend, shipped.special, slots=1, utf8=shipped.utf8, speculate=4, draft_tokens=64)
    sequence = engine.submit(encoded.ids, encoded.masked, Sampling(), np.random.default_rng(0))
    engine._admit()
    sequence.drafts[:], sequence.confidence[:] = continuation, 1.0  # sure, and always refused
    engine.run()
    assert engine.drafted == 0
    assert_same([sequence.fill()], want)


def test_sampled_fills_with_drafts_stay_whole_characters(shipped):
    texts = ["Café [MASK:4] naïve — “[MASK:3]” ☃ [MASK:2] 🎉.", "日本語の[MASK:6]です。"]
    sampling = Sampling(temperature=1.3, seed=3)
    results = Infiller(device="cpu", speculate=4).infill(texts, sampling, num_samples=6)
    assert len(results) == 12 and all("\ufffd" not in r.text for r in results)


def test_the_exactness_check_counts_the_drafts_it_fed(tmp_path):
    from maria_onnx.tools.bench_speculate import main

    main(["--windows", str(WINDOWS), "--exact", "140", "--slots", "3", "--out", str(tmp_path / "exact.json")])
    report = json.loads((tmp_path / "exact.json").read_text())["exactness"]
    assert report["texts"] == 140 and report["slots"] == 3  # 128 windows and 12 of other documents
    assert report["steps_without"] > report["masked_tokens"] / 3
    for k in ("2", "3", "4", "8"):
        assert report["speculate"][k]["texts_differing"] == 0
        assert 0 < report["speculate"][k]["drafts_kept"] < report["speculate"][k]["drafts_fed"]
