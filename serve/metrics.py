"""Prometheus metrics of the server, in their own registry (served at GET /metrics)."""

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "maria_requests",
            "Requests by route (gRPC: by method path) and status code (gRPC: the HTTP status the same outcome gets)",
            ["route", "status"],
            registry=r,
        )
        self.queue_depth = Gauge("maria_queue_depth", "Requests waiting for the decode worker", registry=r)
        self.batch_size = Histogram(
            "maria_batch_size",
            "Decode rows (texts x samples x span candidates) per batch or engine step",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.latency = Histogram(
            "maria_request_latency_seconds",
            "Time from request to response, by route",
            ["route"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.drafts = Counter(
            "maria_drafts", "Speculative infilling (--speculate): MLM drafts fed to the decode step", registry=r
        )
        self.drafts_kept = Counter("maria_drafts_kept", "... and those MARIA kept as its own fills", registry=r)
        self.tokens_filled = Counter(
            "maria_tokens_filled", "Masked tokens filled (by a generation: its samples' tokens)", registry=r
        )
        phase_buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.queue_time = Histogram(
            "maria_queue_seconds",
            "Time a request waited for the decode worker (its first row taking a slot, or its batch starting)",
            registry=r,
            buckets=phase_buckets,
        )
        self.infer_time = Histogram(
            "maria_infer_seconds",
            "Time from a request's start in the decode worker to its last fill",
            registry=r,
            buckets=phase_buckets,
        )
