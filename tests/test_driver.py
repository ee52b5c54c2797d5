"""The round driver (runtime/driver.py): one loop from rows to decoder steps to results, for the CLI and the server
alike; the engine and the concat decoder's batch loop behind one interface."""

import asyncio
import time

import pytest
from typer.testing import CliRunner

from maria_onnx.cli import app
from maria_onnx.runtime import driver
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.driver import RoundDriver
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.requests import FillRequest
from maria_onnx.runtime.rounds import Rounds
from maria_onnx.serve.continuous import ContinuousBatcher
from maria_onnx.serve.jobs import Job
from maria_onnx.serve.stats import Timings

TEXT = "The [MASK] statement is used to [MASK] an exception."
SPANS = "a [MASK:?] of the [MASK:1-2] list b"


@pytest.fixture
def started(monkeypatch):
    """Records, for each run the driver starts, the kind of its decoder."""
    kinds = []
    start = RoundDriver.start

    def recording(self, *args, **kwargs):
        kinds.append(type(self.decoder).__name__)
        return start(self, *args, **kwargs)

    monkeypatch.setattr(RoundDriver, "start", recording)
    return kinds


def served(infiller: Infiller, request: FillRequest) -> list:
    """The results of one job through maria serve's continuous batcher."""

    async def run():
        loop = asyncio.get_running_loop()
        job = Job(request, loop, loop.create_future(), Timings(arrived=time.monotonic_ns()))
        ContinuousBatcher(infiller, max_batch_size=4).submit(job)
        return await asyncio.wait_for(job.future, 120)

    return asyncio.run(run())


def test_the_cli_and_the_server_fill_through_the_same_driver(started):
    result = CliRunner().invoke(app, ["infill", TEXT, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert started == ["Engine"]
    infiller = Infiller(device="cpu")
    (filled,) = served(infiller, FillRequest([infiller.prepare(TEXT)]))
    assert started == ["Engine", "Engine"]
    assert filled.text == result.stdout.strip()


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0, seed=3)])
def test_the_engine_and_the_batch_loop_give_the_same_rounds(bundles, sampling):
    """Span candidates, several samples: the driver over either decoder fills every row alike."""
    results = {}
    for name in ("engine", "concat"):
        infiller = Infiller(bundles["olmo"], device="cpu", decoder=name)
        request = FillRequest([infiller.prepare(TEXT), infiller.prepare(SPANS)], sampling, num_samples=2)
        rounds = Rounds(infiller, [request], [0])
        decoder = infiller.new_decoder(3)
        assert driver.fill_rounds(RoundDriver(decoder), [(rounds, sampling, None)])
        results[type(decoder).__name__] = [(r.text, r.span_lengths) for r in rounds.flat(0)]
    assert results["Engine"] == results["BatchDecoder"]
    assert len(results["Engine"]) == 4


def test_runs_share_steps_and_end_on_their_own(bundles):
    """Two runs in one driver: the shorter ends first, each with the results it gets alone."""
    infiller = Infiller(bundles["olmo"], device="cpu")
    short = FillRequest([infiller.prepare("a [MASK] b")])
    long = FillRequest([infiller.prepare("a [MASK:6] b")])
    alone = [infiller.infill_requests([r])[0][0].text for r in (short, long)]
    together = RoundDriver(infiller.new_decoder(4))
    runs = {
        together.start(Rounds(infiller, [r], [0]), r.sampling): name for name, r in (("short", short), ("long", long))
    }
    order = []
    for _ in range(20):
        order += [runs[run] for run in together.step()]
        if not together.busy:
            break
    assert order == ["short", "long"]
    assert [run.rounds.flat(0)[0].text for run in runs] == alone


def test_a_cancelled_run_leaves_the_decoder(bundles):
    infiller = Infiller(bundles["olmo"], device="cpu")
    request = FillRequest([infiller.prepare("a [MASK:6] b")])
    together = RoundDriver(infiller.new_decoder(2))
    run = together.start(Rounds(infiller, [request], [0]), request.sampling)
    together.step()
    together.cancel(run)
    assert not together.busy and not together.decoder.busy


def test_a_round_that_cannot_be_collected_ends_its_run_with_the_error(bundles):
    infiller = Infiller(bundles["olmo"], device="cpu")
    good, bad = (FillRequest([infiller.prepare("a [MASK] b")]) for _ in range(2))
    together = RoundDriver(infiller.new_decoder(2))
    failing = Rounds(infiller, [bad], [0])
    failing.collect = lambda fills: (_ for _ in ()).throw(RuntimeError("collect failed"))
    kept = together.start(Rounds(infiller, [good], [0]), good.sampling)
    dropped = together.start(failing, bad.sampling)
    ended = []
    while together.busy:
        ended += together.step()
    assert {id(run) for run in ended} == {id(kept), id(dropped)}
    assert kept.error is None and str(dropped.error) == "collect failed"
    with pytest.raises(RuntimeError, match="collect failed"):
        driver.fill_rounds(RoundDriver(infiller.new_decoder(2)), [(failing, bad.sampling, None)])
