"""Dynamic batching: requests gathered into one decode batch, run by one worker thread.

    event loop: submit(job) ──▶ bounded queue ──▶ worker thread: gather ≤ max_batch_size texts, waiting at most
    max_batch_delay after the first ──▶ Infiller.fill_ids (one call) ──▶ each job's future set on the loop

Jobs join a batch only with jobs of the same temperature / top-k / top-p (the decode loop takes one Sampling);
others wait for the next batch. Each text draws from its own generator of (request seed, index of the text in
its request, sample), so a request's result does not depend on what it was batched with.
"""

import asyncio
import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from runtime.choose import Sampling


class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One request: its encoded texts, settings, and where its result goes."""
    texts: list[str]
    encoded: list                     # runtime.text.MaskedText per text
    sampling: Sampling                # its seed is the request's seed
    num_samples: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    on_token: Callable | None = None  # (text index, sample, position, token, logprob), called on the loop
    cancelled: bool = False

    @property
    def size(self) -> int:
        return len(self.texts) * self.num_samples

    @property
    def sampling_key(self) -> tuple:
        return self.sampling.temperature, self.sampling.top_k, self.sampling.top_p

    def finish(self, setter, value) -> None:
        def set_once():
            if not self.future.done():
                setter(value)
        self.loop.call_soon_threadsafe(set_once)


@dataclass
class Batcher:
    infiller: object
    max_batch_size: int = 8
    max_batch_delay_s: float = 0.005
    max_queue: int = 256
    observe_batch: Callable[[int], None] = lambda size: None
    jobs: queue.Queue = field(init=False)
    held: collections.deque = field(init=False, default_factory=collections.deque)

    def __post_init__(self):
        self.jobs = queue.Queue(maxsize=self.max_queue)
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
        if self.held:
            return self.held.popleft()
        try:
            return self.jobs.get(timeout=timeout) if timeout is None or timeout > 0 else self.jobs.get_nowait()
        except queue.Empty:
            return None

    def _gather(self) -> list[Job]:
        """The first waiting job and those that join it within max_batch_delay_s, up to max_batch_size texts."""
        first = self._next(timeout=None)
        batch, size, other = [first], first.size, []
        until = time.monotonic() + self.max_batch_delay_s
        while size < self.max_batch_size:
            job = self._next(timeout=until - time.monotonic())
            if job is None:
                break
            if job.sampling_key != first.sampling_key or size + job.size > self.max_batch_size:
                other.append(job)
                continue
            batch.append(job)
            size += job.size
        self.held.extend(other)
        return [job for job in batch if not job.cancelled]

    def _work(self) -> None:
        while True:
            batch = self._gather()
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        rows = [(job, index, sample) for job in batch for index in range(len(job.texts))
                for sample in range(job.num_samples)]
        self.observe_batch(len(rows))
        ids = [job.encoded[index].ids for job, index, _ in rows]
        masked = [job.encoded[index].masked for job, index, _ in rows]
        rngs = [np.random.default_rng([job.sampling.seed, index, sample]) for job, index, sample in rows]

        def on_token(row, position, token, logprob):
            job, index, sample = rows[row]
            if job.on_token is not None:
                job.loop.call_soon_threadsafe(job.on_token, index, sample, position, token, logprob)

        try:
            fills = self.infiller.fill_ids(ids, masked, batch[0].sampling, batch_size=max(1, len(rows)),
                                           rngs=rngs, on_token=on_token)
        except Exception as error:           # handed to each request's handler, which answers for it
            for job in batch:
                job.finish(job.future.set_exception, error)
            return
        results = collections.defaultdict(list)
        for (job, index, _), fill in zip(rows, fills):
            results[id(job)].append(self.infiller.result(job.texts[index], job.encoded[index], fill))
        for job in batch:
            job.finish(job.future.set_result, results[id(job)])
