"""Dynamic batching: requests gathered into one decode batch, run by one worker thread.

    event loop: submit(job) ──▶ bounded queue ──▶ worker thread: gather ≤ max_batch_size texts, waiting at most
    max_batch_delay after the first ──▶ Infiller.infill_requests (the round driver over the concat decoder's
    batch loop) ──▶ each job's future set on the loop

Jobs join a batch only with jobs of the same temperature / top-k / top-p (the decode loop takes one Sampling);
others wait for the next batch. Each text draws from its own generator of (request seed, index of the text in
its request, sample) (Infiller.infill_requests), so a request's result does not depend on what it was batched
with.
"""

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from maria_onnx.runtime.anneal import AnnealRequest, run_annealing
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.requests import FillRequest

from .jobs import Job, QueueFull


@dataclass
class Batcher:
    infiller: Infiller
    max_batch_size: int = 8
    max_batch_delay_s: float = 0.005
    max_queue: int = 256
    observe_batch: Callable[[int, int], None] = lambda size, ns: None  # rows, ns: after each decode batch
    jobs: queue.Queue = field(init=False)
    held: collections.deque = field(init=False, default_factory=collections.deque)

    def __post_init__(self) -> None:
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=self.max_queue)
        self.stopping = False
        self.worker = threading.Thread(target=self._work, name="maria-batcher", daemon=True)
        self.worker.start()

    @property
    def depth(self) -> int:
        return self.jobs.qsize() + len(self.held)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def _next(self, timeout: float | None) -> Job | None:
        """The next job (held ones first); None where none comes within timeout (None: wait for one)."""
        if self.held:
            return self.held.popleft()
        try:
            return self.jobs.get(timeout=timeout) if timeout is None or timeout > 0 else self.jobs.get_nowait()
        except queue.Empty:
            return None

    def _gather(self) -> list[Job]:
        """The first waiting job and those that join it within max_batch_delay_s, up to max_batch_size texts; a
        generation runs alone."""
        first = self._next(timeout=None)
        if first is None:  # stop() woke the worker
            return []
        if isinstance(first.request, AnnealRequest):
            return [] if first.cancelled else [first]
        batch, size, other = [first], first.request.size, []
        job: Job | None
        until = time.monotonic() + self.max_batch_delay_s
        while size < self.max_batch_size:
            job = self._next(timeout=until - time.monotonic())
            if job is None:
                break
            if (
                isinstance(job.request, AnnealRequest)
                or job.sampling_key != first.sampling_key
                or size + job.request.size > self.max_batch_size
            ):
                other.append(job)
                continue
            batch.append(job)
            size += job.request.size
        self.held.extend(other)
        return [job for job in batch if not job.cancelled]

    def stop(self) -> None:
        """The worker stops once its batch is filled (the server answered every job it holds); waits for it."""
        self.stopping = True
        with contextlib.suppress(queue.Full):
            self.jobs.put_nowait(None)  # wakes a worker waiting for a job
        self.worker.join()

    def _work(self) -> None:
        while not self.stopping:
            batch = self._gather()
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        def on_token(number: int, index: int, sample: int, position: int, token: int, logprob: float) -> None:
            job = batch[number]
            if job.on_token is not None:
                job.loop.call_soon_threadsafe(job.on_token, index, sample, position, token, logprob)

        started = time.monotonic_ns()
        for job in batch:
            job.timings.started = started
        try:
            results: list[list]
            first, request = batch[0], batch[0].request
            if isinstance(request, AnnealRequest):  # its deadline or its client leaving stops it between steps
                decoder = self.infiller.new_decoder(self.max_batch_size)
                results = [
                    run_annealing(decoder, request.start(self.infiller), self.observe_batch, lambda: first.cancelled)
                ]
            else:
                fills = [job.request for job in batch if isinstance(job.request, FillRequest)]
                results = list(self.infiller.infill_requests(fills, on_token, on_batch=self.observe_batch))
        except Exception as error:  # handed to each request's handler, which answers for it
            for job in batch:
                job.finish(job.future.set_exception, error)
            return
        filled = time.monotonic_ns()
        for job, result in zip(batch, results):
            job.timings.filled = filled
            job.finish(job.future.set_result, result)
