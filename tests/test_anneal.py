"""Annealing's rules with a fixed seed: energies are the AR's, the best kept never rises, zero steps is one-shot
MARIA sampling, and a seed repeats a run."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from maria_onnx.cli import app
from maria_onnx.runtime.anneal import AnnealRequest, Schedule, anneal
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.likelihood import ar_loglikelihood


@pytest.fixture(scope="module")
def infiller(bundles):
    return Infiller(bundles["llama"], device="cpu")


def test_energies_are_the_ar_and_the_best_never_rises(infiller):
    prefix, suffix = np.array([7, 8]), np.array([9])
    schedule = Schedule(steps=12, temperature_start=5.0)
    results = anneal(infiller, AnnealRequest(prefix, suffix, 6, 3, schedule, Sampling(temperature=1.5, seed=2)))
    for result in results:
        assert result.ids[:2] == [7, 8] and result.ids[-1] == 9 and len(result.ids) == 9
        assert len(result.energies) == len(result.best_energies) == 13
        assert all(b <= a + 1e-9 for a, b in zip(result.best_energies, result.best_energies[1:]))
        assert result.best_energies == pytest.approx(np.minimum.accumulate(result.energies).tolist())
        assert result.energy == pytest.approx(min(result.energies))
        assert -ar_loglikelihood(infiller.backend, [np.array(result.ids)], infiller.special)[0] == pytest.approx(
            result.energy
        )
    assert sum(r.accepted for r in results) > 0


def test_samples_beyond_the_batch_wait_for_a_slot_and_come_out_the_same(infiller):
    request = AnnealRequest(np.array([7]), np.zeros(0, np.int64), 5, 5, Schedule(steps=4), Sampling(1.0, seed=4))
    run = lambda batch_size: anneal(infiller, request, batch_size=batch_size)
    together, two_at_a_time = run(None), run(2)
    assert [(r.ids, r.accepted) for r in together] == [(r.ids, r.accepted) for r in two_at_a_time]
    assert np.allclose([r.energies for r in together], [r.energies for r in two_at_a_time], rtol=1e-5)


def test_zero_steps_is_one_shot_maria_sampling(infiller):
    sampling, empty = Sampling(temperature=1.0, seed=3), np.zeros(0, np.int64)
    results = anneal(infiller, AnnealRequest(empty, empty, 5, 4, Schedule(steps=0), sampling))
    template = np.full(5, infiller.special.mask)
    one_shot = infiller.fill_ids(
        [template] * 4,
        [np.ones(5, bool)] * 4,
        sampling,
        4,
        [np.random.default_rng([3, sample, 0]) for sample in range(4)],
    )
    assert [r.ids for r in results] == [f.ids.tolist() for f in one_shot]


def test_a_seed_repeats_a_run_and_the_cli_reports_energies(bundles):
    args = [
        "generate",
        "--length",
        "4",
        "--steps",
        "3",
        "--num-samples",
        "2",
        "--seed",
        "5",
        "--json",
        "--model",
        str(bundles["llama"]),
        "--device",
        "cpu",
        "--prefix",
        "the value",
    ]
    first, second = (CliRunner().invoke(app, args) for _ in range(2))
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(rows) == 2 and all(len(r["energies"]) == 4 and r["text"].startswith("the value") for r in rows)


def test_samples_beyond_a_group_are_annealed_and_printed_a_group_at_a_time(bundles, monkeypatch):
    """--num-samples over 16 batches goes a group at a time (memory stays bounded, each group printed when it
    ends), with the texts of one group: sample j keeps its generators of (seed, j, k)."""
    from maria_onnx.console import generate as console_generate
    from maria_onnx.console.fill import CHUNK_BATCHES

    samples = CHUNK_BATCHES + 2
    args = [
        "generate",
        "--length",
        "4",
        "--steps",
        "2",
        "--num-samples",
        str(samples),
        "--seed",
        "5",
        "--model",
        str(bundles["llama"]),
        "--device",
        "cpu",
    ]
    whole = CliRunner().invoke(app, args + ["--batch-size", "8"])
    groups, run = [], console_generate.anneal

    def counted(*rest, **kwargs):
        groups.append((rest[1].num_samples, kwargs["first_sample"]))
        return run(*rest, **kwargs)

    monkeypatch.setattr(console_generate, "anneal", counted)
    grouped = CliRunner().invoke(app, args + ["--batch-size", "1"])
    assert whole.exit_code == grouped.exit_code == 0, grouped.output
    assert groups == [(CHUNK_BATCHES, 0), (2, CHUNK_BATCHES)]
    assert grouped.stdout == whole.stdout and whole.stdout.count("\n") == samples


@pytest.mark.parametrize(
    "args, message",
    [
        (["--length", "3000"], "prefix, 3000 tokens and suffix make"),
        (["--length", "3", "--suffix", "word " * 3000], "--suffix: the text is"),
        (["--length", "3", "--prefix", "a [MASK] b"], "--prefix and --suffix are plain text"),
        (["--length", "3", "--anneal-start", "inf"], "--anneal-start is a Metropolis temperature"),
    ],
)
def test_bad_generation_requests_get_one_line_naming_the_option(bundles, args, message):
    result = CliRunner().invoke(app, ["generate", "--model", str(bundles["llama"]), "--device", "cpu", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match=r"^fraction_start is a share of the generated tokens, in \(0, 1\], got 0"):
        Schedule(fraction_start=0)
    with pytest.raises(ValueError, match="^fraction_end .* got nan"):
        Schedule(fraction_end=float("nan"))
    with pytest.raises(ValueError, match="^anneal_end is a Metropolis temperature, a finite number > 0, got 0"):
        Schedule(temperature_end=0)
    with pytest.raises(ValueError, match="^anneal_start .* got inf"):
        Schedule(temperature_start=float("inf"))
