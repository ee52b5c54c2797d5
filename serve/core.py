"""The server core, apart from every transport: settings, jobs checked and queued, answers awaited within their
deadline, bounds, auth, metrics and statistics. HTTP (serve/app.py) and gRPC (serve/grpc_service.py) are thin
adapters over one Server; each words its errors for its own clients from ClientError's status and line.
"""

import asyncio
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from maria_onnx.runtime.anneal import anneal_request
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.requests import SettingTypeError, TooLarge, bounded_request, read_settings
from maria_onnx.runtime.text import quoted

from .batcher import Batcher
from .continuous import ContinuousBatcher
from .jobs import Job, QueueFull
from .metrics import Metrics
from .protocol import VERSION
from .stats import Statistics, Timings

access_log = logging.getLogger("maria.access")
API_KEY = re.compile(r"[\x21-\x7e]+")  # what a bearer token in an HTTP header can carry
ClientLeft = Callable[[], Awaitable[None]]  # returns once the request's client has gone
STOPPED = "the server stopped before this request was answered (its grace period ended); retry it"


@dataclass(frozen=True)
class ServeSettings:
    model_name: str = "maria"
    max_batch_size: int = 8
    max_batch_delay_ms: float = 5.0
    max_queue: int = 256  # requests waiting; beyond it, 503
    max_body_bytes: int = 1 << 20
    max_texts: int = 64  # texts x samples per request
    timeout_s: float = 60.0  # per request, from arrival to answer
    api_key: str | None = None
    head_timeout_s: float = 10.0  # a connection's request head must come whole within this; beyond it, 408
    body_timeout_s: float = 30.0  # a request's body likewise, once its head has come; beyond it, 408
    keep_alive_s: float = 5.0  # an idle keep-alive connection (and an idle gRPC connection) is closed after this
    max_connections: int = 512  # open HTTP connections (and gRPC streams a connection); beyond it, 503

    def __post_init__(self) -> None:
        for option, value, unit in (
            ("--max-batch-delay-ms", self.max_batch_delay_ms, "milliseconds"),
            ("--timeout", self.timeout_s, "seconds"),
            ("--head-timeout", self.head_timeout_s, "seconds"),
            ("--body-timeout", self.body_timeout_s, "seconds"),
            ("--keep-alive", self.keep_alive_s, "seconds"),
        ):
            if not math.isfinite(value):
                raise ValueError(f"{option} takes a finite number of {unit}, got {value}")
        if self.api_key is not None and not API_KEY.fullmatch(self.api_key):
            raise ValueError(
                "--api-key (or MARIA_API_KEY) must be a bearer token: printable ASCII, no spaces, not "
                "empty; leave both out to serve without a key"
            )


class ClientError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def sampling_of(settings: dict) -> tuple[Sampling, int, bool]:
    """Sampling, num_samples and rerank from request settings; 400 for a wrong type, 422 for a refused value."""
    try:
        return read_settings(settings)
    except SettingTypeError as error:
        raise ClientError(400, str(error)) from None
    except ValueError as error:
        raise ClientError(422, str(error)) from None


class Server:
    """The server core over one Infiller and its batcher (continuous through the decode engine or, with the concat
    decoder, batch at a time): jobs checked and queued, answers awaited within their deadline, bounds, auth,
    metrics and statistics. Each transport (serve/app.py, serve/grpc_service.py) is a thin adapter over it."""

    def __init__(self, infiller: Infiller, settings: ServeSettings):
        self.infiller, self.settings, self.metrics, self.stats = infiller, settings, Metrics(), Statistics()
        self.started = int(time.time())  # what OpenAI's model list gives as the model's creation
        self.in_flight: set[Job] = set()  # queued or running, until answered
        self.batcher: ContinuousBatcher | Batcher
        if infiller.decoder == "engine":
            self.batcher = ContinuousBatcher(
                infiller, settings.max_batch_size, settings.max_queue, self.executed, self.drafted
            )
        else:
            self.batcher = Batcher(
                infiller, settings.max_batch_size, settings.max_batch_delay_ms / 1000, settings.max_queue, self.executed
            )

    def answer_the_rest(self) -> None:
        """The stop has outlasted its grace period: every request still waiting or running is answered 503, and
        its rows leave the decode worker at the next step."""
        for job in list(self.in_flight):
            job.cancelled = True
            job.finish(job.future.set_exception, ClientError(503, STOPPED, {"Retry-After": "1"}))

    def close(self) -> None:
        """Stops the decode worker between steps and waits for it: no model call is left running at exit."""
        self.batcher.stop()

    @property
    def ready(self) -> bool:
        """The decode worker is running."""
        return self.batcher.worker.is_alive()

    def authorized(self, authorization: str) -> bool:
        """An Authorization header (or gRPC metadata) value that passes: any without --api-key, else the bearer
        token (the scheme's name in any case, as RFC 7235 has it), compared in constant time."""
        key = self.settings.api_key
        scheme, _, token = authorization.partition(" ")
        return not key or (scheme.lower() == "bearer") & hmac.compare_digest(token.encode(), key.encode())

    def statistics(self, name: str | None, version: str | None) -> dict:
        """The statistics of the named model (404 for another), or without a name those of every model: one."""
        name = self.model_named(name, version) if name else self.settings.model_name
        return {"model_stats": [self.stats.model_stats(name, VERSION)]}

    def executed(self, rows: int, ns: int) -> None:
        """One engine step or batch over `rows` decode rows, run by the decode worker in ns."""
        self.metrics.batch_size.observe(rows)
        self.stats.executed(rows, ns)

    def drafted(self, drafts: int, kept: int) -> None:
        """Speculating: drafts fed to one engine step, and how many of them MARIA kept."""
        self.metrics.drafts.inc(drafts)
        self.metrics.drafts_kept.inc(kept)

    def job(
        self, texts: list, settings: dict, began: float, on_token: Callable | None = None, span_score: str = "text"
    ) -> Job:
        """Checks every text and setting before anything is queued; began: when the request arrived
        (time.monotonic); span_score: how span lengths are chosen (runtime/likelihood.py's SPAN_SCORES)."""
        if not texts:
            raise ClientError(400, "no text given; send at least one text with [MASK] markers")
        sampling, num_samples, rerank = sampling_of(settings)
        try:
            request = bounded_request(
                self.prepared, texts, sampling, num_samples, rerank, self.settings.max_texts, span_score
            )
        except TooLarge as error:
            raise ClientError(413, str(error)) from None
        loop = asyncio.get_running_loop()
        return Job(request, loop, loop.create_future(), Timings(arrived=int(began * 1e9)), on_token)

    def prepared(self, texts: list, rerank: bool, most: int) -> list:
        """Each text ready to fill (Infiller.prepare), or ClientError naming the first that is not."""
        prepared = []
        for number, text in enumerate(texts):
            if not isinstance(text, str):
                raise ClientError(400, f"text {number}: must be a string, got {type(text).__name__}")
            try:
                prepared.append(self.infiller.prepare(text, rerank, most))
            except ValueError as error:
                raise ClientError(422, f"text {number}: {error}") from None
        return prepared

    async def run(self, job: Job, left: ClientLeft | None = None, timeout_s: float | None = None) -> list:
        """The job's results (see queued), counted in the statistics whether it gets them or not."""
        job.timings.queued, results = time.monotonic_ns(), None
        try:
            results = await self.queued(job, left, timeout_s)
        finally:
            if results is None:
                self.stats.failed(job.timings)
        phases = job.timings.phases(time.monotonic_ns())
        self.stats.answered(phases, job.inferences)
        self.metrics.queue_time.observe(phases["queue"] / 1e9)
        self.metrics.infer_time.observe(phases["compute_infer"] / 1e9)
        self.metrics.tokens_filled.inc(job.tokens(results))
        return results

    async def queued(self, job: Job, left: ClientLeft | None, timeout_s: float | None) -> list:
        """Queues the job and waits for its results, its deadline (504) or, given left (a coroutine function that
        returns once the client has gone), its client leaving (499). A job that ends any way but with its results
        is dropped from the decode worker: its rows free their slots at the next step instead of being filled for
        nobody. The deadline is the server's --timeout, or the request's own timeout_s where that is shorter."""
        try:
            self.batcher.submit(job)
        except QueueFull:
            raise ClientError(503, "the server is busy: its queue is full; retry later", {"Retry-After": "1"}) from None
        self.metrics.queue_depth.set(self.batcher.depth)
        deadline = self.settings.timeout_s if timeout_s is None else min(self.settings.timeout_s, timeout_s)
        self.in_flight.add(job)
        try:
            waited = (time.monotonic_ns() - job.timings.arrived) / 1e9
            return await asyncio.wait_for(self.answer(job, left), deadline - waited)
        except asyncio.TimeoutError:
            raise ClientError(504, f"no answer within the deadline of {deadline:g} s") from None
        finally:
            if not job.future.done():  # the deadline passed, the client left, or this task was cancelled
                job.cancelled = True
            self.in_flight.discard(job)
            self.metrics.queue_depth.set(self.batcher.depth)

    @staticmethod
    async def answer(job: Job, left: ClientLeft | None) -> list:
        """The job's results; ClientError 499 if the client leaves first (left() returns)."""
        if left is None:
            return await asyncio.shield(job.future)
        leaving = asyncio.ensure_future(left())
        try:
            done, _ = await asyncio.wait({job.future, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
        if job.future not in done:
            raise ClientError(499, "the client closed the connection before the answer")
        return job.future.result()

    def model_named(self, name: str, version: str | None) -> str:
        """name, where it is the served model and version (none given: the served one) its version; else
        ClientError 404."""
        version = version or VERSION
        if name != self.settings.model_name:
            raise ClientError(404, f"no model {quoted(name)} here; this server serves '{self.settings.model_name}'")
        if version != VERSION:
            raise ClientError(404, f"no version {quoted(version)} of model '{name}' here; it has version {VERSION}")
        return name

    def anneal_job(self, settings: dict, began: float) -> Job:
        """Checks a generation's settings before it is queued."""
        if not self.infiller.manifest.has_baseline_heads:
            raise ClientError(
                501,
                "generation needs the AR's whole-text score, and the served bundle has no "
                "ar_lm_head.onnx; serve a bundle re-exported with `maria export`",
            )
        try:
            request = anneal_request(self.infiller, settings)
        except SettingTypeError as error:
            raise ClientError(400, str(error)) from None
        except ValueError as error:
            raise ClientError(422, str(error)) from None
        if request.num_samples > self.settings.max_texts:
            raise ClientError(
                413,
                f"{request.num_samples} samples are over the limit of {self.settings.max_texts} "
                f"per request; ask for at most {self.settings.max_texts}",
            )
        loop = asyncio.get_running_loop()
        return Job(request, loop, loop.create_future(), Timings(arrived=int(began * 1e9)))


def logged(server: Server, route: str, status: int, began: float, **line: object) -> None:
    """A finished request, HTTP or gRPC: counted by route and status, timed, and logged as one JSON line of `line`
    (method, path, client) with its status and time."""
    server.metrics.requests.labels(route, str(status)).inc()
    server.metrics.latency.labels(route).observe(time.monotonic() - began)
    access_log.info(
        json.dumps(
            {
                "method": line["method"],
                "path": quoted(str(line["path"]), str),  # the client's, cut short
                "status": status,
                "ms": round(1000 * (time.monotonic() - began), 2),
                "client": line["client"],
            }
        )
    )
