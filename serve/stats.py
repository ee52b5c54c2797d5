"""Triton's statistics extension (GET /v2/models/{name}/stats): cumulative counts and durations of the model's
inference since the server started, in the JSON that tritonclient's get_inference_statistics reads.

    a request:  arrived ─────────▶ queued ───▶ started ─────────▶ filled ──────────▶ answered
                        compute_input        queue       compute_infer      compute_output
                (read, checked, tokenized)         (its first row takes a slot, or its batch starts,
                                                    to its last fill)
    an execution: one step of the decode engine (or one batch of the concat decoder) over `batch_size` rows

Requests count from when they reach the queue: one refused before it (unreadable, a bad setting) is not an
inference. success and fail are whole times, arrival to answer; fail counts a full queue, a passed deadline, a
client that left and a model error. compute_output is the results built from the fills (span choice, reranking,
text); with the concat decoder that happens inside its batch, so there it is only the hand-over to the route. A
batch statistic's time is the whole execution, so it is all compute_infer (compute_input and compute_output count
the executions with 0 ns).
"""

import threading
import time
from dataclasses import dataclass, field

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


@dataclass
class Timings:
    """When one request passed each point (time.monotonic_ns); set by the route and the decode worker."""

    arrived: int
    queued: int = 0
    started: int = 0
    filled: int = 0

    def phases(self, done: int) -> dict:
        """ns spent in each phase by a request answered at `done`: the whole (success) and its four parts."""
        return {
            "success": done - self.arrived,
            "compute_input": self.queued - self.arrived,
            "queue": self.started - self.queued,
            "compute_infer": self.filled - self.started,
            "compute_output": done - self.filled,
        }


@dataclass
class Statistics:
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_inference: int = 0  # ms since the epoch
    inference_count: int = 0  # texts answered
    execution_count: int = 0  # engine steps or batches run
    phases: dict = field(default_factory=lambda: {phase: [0, 0] for phase in PHASES})  # phase -> [count, ns]
    batches: dict = field(default_factory=dict)  # rows -> [count, ns]

    def _add(self, counts: list, ns: int) -> None:
        counts[0] += 1
        counts[1] += max(0, ns)

    def executed(self, batch_size: int, ns: int) -> None:
        """One model execution over batch_size rows (called by the decode worker)."""
        with self.lock:
            self.execution_count += 1
            self._add(self.batches.setdefault(batch_size, [0, 0]), ns)

    def answered(self, phases: dict, texts: int) -> None:
        """A request answered with its results, given its Timings.phases."""
        with self.lock:
            self.last_inference = time.time_ns() // 1_000_000
            self.inference_count += texts
            for phase, ns in phases.items():
                self._add(self.phases[phase], ns)

    def failed(self, timings: Timings) -> None:
        """A queued request that ended without its results."""
        with self.lock:
            self._add(self.phases["fail"], time.monotonic_ns() - timings.arrived)

    def model_stats(self, name: str, version: str) -> dict:
        """The extension's $model_stat object."""

        def duration(counts: list[int]) -> dict:
            return {"count": counts[0], "ns": counts[1]}

        with self.lock:
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {phase: duration(counts) for phase, counts in self.phases.items()},
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": duration([counts[0], 0]),
                        "compute_infer": duration(counts),
                        "compute_output": duration([counts[0], 0]),
                    }
                    for size, counts in sorted(self.batches.items())
                ],
            }
