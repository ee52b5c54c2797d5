"""Continuous batching: requests join the running decode batch between steps instead of waiting for it to finish.

    event loop: submit(job) ──▶ bounded queue ──▶ worker thread: each job's rounds (runtime/rounds.py, or a
    generation's annealing) start in the round driver (runtime/driver.py) as soon as the engine has room ──▶
    driver.step(): one engine step ──▶ a job whose rounds have ended gets its results and its future set on the
    loop

The engine has max_batch_size slots; a row takes a free slot at the next step, so a short request is not held
behind a long one, and rows of different temperatures share steps (each draws from its own generator of
(request seed, text, sample), so a result does not depend on what it ran with). Jobs are taken from the queue only
while fewer rows than slots wait, so the queue bound (503) still applies.
"""

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from maria_onnx.runtime.anneal import AnnealRequest
from maria_onnx.runtime.driver import Filler, RoundDriver, Run
from maria_onnx.runtime.engine import Engine
from maria_onnx.runtime.rounds import Rounds

from .jobs import Job, QueueFull


def started_run(driver: RoundDriver, job: Job, filler: Filler) -> tuple[Run, Callable[[], list]]:
    """The job's rounds started in the driver, and how to read its results once they end."""
    if isinstance(job.request, AnnealRequest):
        annealing = job.request.start(filler)
        return driver.start(annealing, annealing.sampling), lambda: annealing.results
    rounds = Rounds(filler, [job.request], [0])
    hear = None
    if job.on_token is not None:
        on_token = job.on_token

        def heard(number: int, *fill: object) -> None:  # on the worker thread: the callback runs on the job's loop
            job.loop.call_soon_threadsafe(on_token, *fill)

        hear = rounds.hearing(heard)
    return driver.start(rounds, job.request.sampling, hear), lambda: rounds.flat(0)


@dataclass
class ContinuousBatcher:
    filler: Filler
    max_batch_size: int = 8
    max_queue: int = 256
    observe_batch: Callable[[int, int], None] = lambda size, ns: None  # rows, ns: after each engine step
    observe_drafts: Callable[[int, int], None] = lambda drafted, kept: None  # speculating: after each engine step
    jobs: queue.Queue = field(init=False)

    def __post_init__(self) -> None:
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=self.max_queue)
        self.stopping = False
        self.driver = RoundDriver(self._new_engine())
        self.running: dict[Run, tuple[Job, Callable[[], list]]] = {}
        self.worker = threading.Thread(target=self._work, name="maria-engine", daemon=True)
        self.worker.start()

    def _new_engine(self) -> Engine:
        self.drafts_seen = 0, 0  # the engine's drafted and kept counts already observed
        engine = self.filler.new_decoder(self.max_batch_size)
        assert isinstance(engine, Engine), "continuous batching runs on the decode engine"
        return engine

    @property
    def engine(self) -> Engine:
        return self.driver.decoder  # type: ignore[return-value]

    @property
    def depth(self) -> int:
        return self.jobs.qsize()

    def stop(self) -> None:
        """The worker stops between steps (what it holds is dropped unanswered: the server answered it); waits."""
        self.stopping = True
        with contextlib.suppress(queue.Full):
            self.jobs.put_nowait(None)  # wakes a worker waiting for a job
        self.worker.join()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def _admit(self, job: Job | None) -> None:
        if job is None or job.cancelled:  # None: stop() woke the worker
            return
        try:
            run, results = started_run(self.driver, job, self.filler)
        except Exception as error:  # handed to the request's handler, which answers for it
            job.finish(job.future.set_exception, error)
            return
        self.running[run] = job, results

    def _take_jobs(self) -> None:
        """Blocks for a job while the engine is idle; otherwise takes jobs while fewer rows than slots wait."""
        if not self.driver.busy:
            self._admit(self.jobs.get())
        while len(self.engine.waiting) < self.engine.slots:
            try:
                self._admit(self.jobs.get_nowait())
            except queue.Empty:
                break

    def _drop_cancelled(self) -> None:
        """Frees the slots of requests whose client was answered with 504 (their deadline passed) or left."""
        for run in [run for run, (job, _) in self.running.items() if job.cancelled]:
            self.driver.cancel(run)
            del self.running[run]

    def _mark_started(self, step_began: int) -> None:
        """Jobs whose first rows took slots in the step begun at step_began: their queueing ended then."""
        for run, (job, _) in self.running.items():
            if not job.timings.started and run.started:
                job.timings.started = step_began

    def _finish(self, ended: list[Run]) -> None:
        for run in ended:
            job, results = self.running.pop(run)
            job.timings.filled = time.monotonic_ns()
            job.timings.started = job.timings.started or job.timings.filled  # nothing masked: no step
            try:
                if run.error is not None:
                    raise run.error
                job.finish(job.future.set_result, results())
            except Exception as error:  # handed to the request's handler, which answers for it
                job.finish(job.future.set_exception, error)

    def _fail_all(self, error: Exception) -> None:
        """An engine step failed: every running job is answered with the error, and a fresh engine goes on."""
        for job, _ in self.running.values():
            job.finish(job.future.set_exception, error)
        self.running.clear()
        self.driver = RoundDriver(self._new_engine())

    def _work(self) -> None:
        while not self.stopping:
            self._take_jobs()
            self._drop_cancelled()
            try:
                started, stepped = time.monotonic_ns(), self.engine.busy
                ended = self.driver.step()
                if stepped:
                    self.observe_batch(self.engine.last_batch, time.monotonic_ns() - started)
                    self.observe_drafts(
                        self.engine.drafted - self.drafts_seen[0], self.engine.kept - self.drafts_seen[1]
                    )
                    self.drafts_seen = self.engine.drafted, self.engine.kept
                    self._mark_started(started)
            except Exception as error:
                self._fail_all(error)
                continue
            self._finish(ended)
