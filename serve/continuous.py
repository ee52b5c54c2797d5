"""Continuous batching: requests join the running decode batch between steps instead of waiting for it to finish.

    event loop: submit(job) ──▶ bounded queue ──▶ worker thread: each job's rows (texts x samples x span
    candidates) go into the decode engine (runtime/engine.py) as soon as it has room ──▶ engine.step() ──▶ a job
    whose rows are all filled gets its results (span choice, reranking) and its future set on the loop; where
    its span lengths are searched gap by gap (runtime/rounds.py), the next round's rows go in instead

The engine has max_batch_size slots; a row takes a free slot at the next step, so a short request is not held
behind a long one, and rows of different temperatures share steps (each draws from its own generator of
(request seed, text, sample), so a result does not depend on what it ran with). Jobs are taken from the queue only
while fewer rows than slots wait, so the queue bound (503) still applies.
"""

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from maria_onnx.runtime.anneal import AnnealRequest, Annealing
from maria_onnx.runtime.decode import Fill
from maria_onnx.runtime.engine import Engine
from maria_onnx.runtime.rounds import Rounds

from .batcher import Job, QueueFull


@dataclass
class Running:
    """A job in the engine: its rounds of rows (runtime/rounds.py's Rounds, or a generation's Annealing: one round
    a step), how to read its results once they end, and per row of the current round the sequence filling it
    (None where nothing is masked)."""
    job: Job
    rounds: Rounds | Annealing
    results: Callable[[], list]
    sequences: list


def running_of(job: Job, infiller) -> Running:
    if isinstance(job.request, AnnealRequest):
        annealing = job.request.start(infiller)
        return Running(job, annealing, lambda: annealing.results, [])
    rounds = Rounds(infiller, [job.request], [0])
    return Running(job, rounds, lambda: rounds.flat(0), [])


@dataclass
class ContinuousBatcher:
    infiller: object
    max_batch_size: int = 8
    max_queue: int = 256
    observe_batch: Callable[[int, int], None] = lambda size, ns: None     # rows, ns: after each engine step
    jobs: queue.Queue = field(init=False)

    def __post_init__(self):
        self.jobs = queue.Queue(maxsize=self.max_queue)
        self.engine = self._new_engine()
        self.running: list[Running] = []
        self.worker = threading.Thread(target=self._work, name="maria-engine", daemon=True)
        self.worker.start()

    def _new_engine(self) -> Engine:
        return Engine(self.infiller.backend, self.infiller.special, slots=self.max_batch_size,
                      fixed_shapes=self.infiller.backend.on_device, utf8=self.infiller.utf8)

    @property
    def depth(self) -> int:
        return self.jobs.qsize()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            return
        running = running_of(job, self.infiller)
        self._submit(running)
        self.running.append(running)

    def _submit(self, running: Running) -> None:
        """Puts the rows of the job's current round into the engine."""
        job = running.job
        running.sequences = []
        for row in running.rounds.rows:
            if not row.encoded.masked.any():
                running.sequences.append(None)
                continue
            hear = None
            if job.on_token is not None and not job.request.texts[row.text].spans:
                hear = (lambda position, token, logprob, text=row.text, sample=row.sample:
                        job.loop.call_soon_threadsafe(job.on_token, text, sample, position, token, logprob))
            running.sequences.append(self.engine.submit(row.encoded.ids, row.encoded.masked, job.request.sampling,
                                                        row.rng, hear))

    def _take_jobs(self) -> None:
        """Blocks for a job while the engine is idle; otherwise takes jobs while fewer rows than slots wait."""
        if not self.engine.busy and not self.running:
            self._admit(self.jobs.get())
        while len(self.engine.waiting) < self.engine.slots:
            try:
                self._admit(self.jobs.get_nowait())
            except queue.Empty:
                break

    def _drop_cancelled(self) -> None:
        """Frees the slots of requests whose client was answered with 504 (their deadline passed)."""
        for running in [r for r in self.running if r.job.cancelled]:
            self.running.remove(running)
            for sequence in running.sequences:
                if sequence is not None:
                    self.engine.cancel(sequence)

    def _mark_started(self, step_began: int) -> None:
        """Jobs whose first rows took slots in the step begun at step_began: their queueing ended then."""
        for running in self.running:
            if not running.job.timings.started and any(s is not None and s.slot >= 0 for s in running.sequences):
                running.job.timings.started = step_began

    def _finish(self) -> None:
        for running in [r for r in self.running if all(s is None or s.done for s in r.sequences)]:
            job = running.job
            try:
                fills = [Fill.unchanged(row.encoded.ids) if s is None else s.fill()
                         for row, s in zip(running.rounds.rows, running.sequences)]
                if running.rounds.collect(fills):         # a gap-by-gap search goes on: its next round goes in
                    self._submit(running)
                    continue
                outcome = job.future.set_result, running.results()
            except Exception as error:        # handed to the request's handler, which answers for it
                outcome = job.future.set_exception, error
            self.running.remove(running)
            job.timings.filled = time.monotonic_ns()
            job.timings.started = job.timings.started or job.timings.filled       # nothing masked: no step
            job.finish(*outcome)

    def _work(self) -> None:
        while True:
            self._take_jobs()
            self._drop_cancelled()
            try:
                if self.engine.busy:
                    started = time.monotonic_ns()
                    self.engine.step()
                    self.observe_batch(self.engine.last_batch, time.monotonic_ns() - started)
                    self._mark_started(started)
            except Exception as error:
                for running in self.running:
                    running.job.finish(running.job.future.set_exception, error)
                self.running.clear()
                self.engine = self._new_engine()
                continue
            self._finish()
