"""`maria serve`: MARIA over HTTP. The Open Inference Protocol (KServe v2, as Triton speaks it, binary tensor data
included), a plain JSON route and a server-sent-event stream, all fed to one batcher: continuous batching through
the decode engine (serve/continuous.py), or batch at a time with --decoder concat (serve/batcher.py).

    GET  /v2/health/live  /v2/health/ready  /v2  /v2/models/{name}  /v2/models/{name}/ready
         /v2/models/{name}/config          Triton's model-configuration extension
         /v2/models/{name}/stats           Triton's statistics extension (serve/stats.py); /v2/models/stats too
    POST /v2/models/{name}/infer       OIP: text (BYTES) -> text, result (BYTES)
    POST /v2/models/{name}/generate    Triton's generate extension: {"text": ...} -> {"text": ..., "result": ...}
         /v2/models/{name}/generate_stream   the same as one server-sent event (serve/generate.py)
         (the model's seven routes also under /v2/models/{name}/versions/1/)
    POST /v1/infill                    {"text": [...], "temperature": ...} -> {"results": [maria infill --json]}
    POST /v1/infill/stream             SSE: one "token" event per chosen fill token, then one "result" event
    POST /v1/generate                  {"length": N, "prefix": ..., "steps": ...} -> {"results": [maria generate
                                       --json]}: simulated annealing, one round of decode rows a step
    GET  /metrics                      Prometheus text format
    (and with --grpc-port the Open Inference Protocol over gRPC, serve/grpc_service.py, over the same Server)

Client errors get one line in {"error": ...}: 400 unreadable request, 401 bad token, 404 unknown model,
413 body or texts over the bounds, 422 a text or setting the model refuses, 501 generation without the AR's
head, 503 queue full, 504 deadline passed
(and 404 / 405 for a path or method no route has);
a client that leaves before its answer is logged as 499, and its rows leave the decode worker. Bodies may come
gzip- or deflate-compressed, and answers go compressed where the client accepts it (serve/encoding.py).
"""

import asyncio
import hmac
import json
import logging
import math
import re
import time
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route

from maria_onnx.runtime.anneal import anneal_request
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.requests import SETTINGS, SettingTypeError, TooLarge, bounded_request, read_settings
from maria_onnx.runtime.text import quoted
from maria_onnx.runtime.utf8 import FillPieces

from .batcher import Batcher
from .jobs import Job, QueueFull
from .continuous import ContinuousBatcher
from .encoding import EncodingError, accepted, compress, decompress
from .generate import SSE_TYPE, event, generate_response, read_generate
from .metrics import Metrics
from .protocol import (VERSION, BadRequest, InferRequest, infer_response, metadata, model_config, parse_infer,
                       request_json, text_list)
from .stats import Statistics, Timings

access_log = logging.getLogger("maria.access")
API_KEY = re.compile(r"[\x21-\x7e]+")          # what a bearer token in an HTTP header can carry


@dataclass(frozen=True)
class ServeSettings:
    model_name: str = "maria"
    max_batch_size: int = 8
    max_batch_delay_ms: float = 5.0
    max_queue: int = 256              # requests waiting; beyond it, 503
    max_body_bytes: int = 1 << 20
    max_texts: int = 64               # texts x samples per request
    timeout_s: float = 60.0           # per request, from arrival to answer
    api_key: str | None = None

    def __post_init__(self):
        for option, value, unit in (("--max-batch-delay-ms", self.max_batch_delay_ms, "milliseconds"),
                                    ("--timeout", self.timeout_s, "seconds")):
            if not math.isfinite(value):
                raise ValueError(f"{option} takes a finite number of {unit}, got {value}")
        if self.api_key is not None and not API_KEY.fullmatch(self.api_key):
            raise ValueError("--api-key (or MARIA_API_KEY) must be a bearer token: printable ASCII, no spaces, not "
                             "empty; leave both out to serve without a key")


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
    """The routes, over one Infiller and its batcher: continuous (the decode engine) or, with the concat decoder,
    batch at a time."""

    def __init__(self, infiller, settings: ServeSettings):
        self.infiller, self.settings, self.metrics, self.stats = infiller, settings, Metrics(), Statistics()
        if infiller.decoder == "engine":
            self.batcher = ContinuousBatcher(infiller, settings.max_batch_size, settings.max_queue, self.executed)
        else:
            self.batcher = Batcher(infiller, settings.max_batch_size, settings.max_batch_delay_ms / 1000,
                                   settings.max_queue, self.executed)

    @property
    def ready(self) -> bool:
        """The decode worker is running."""
        return self.batcher.worker.is_alive()

    def authorized(self, authorization: str) -> bool:
        """An Authorization header (or gRPC metadata) value that passes: any without --api-key, else the bearer
        token, compared in constant time."""
        key = self.settings.api_key
        return not key or hmac.compare_digest(authorization.encode(), f"Bearer {key}".encode())

    def statistics(self, name: str | None, version: str | None) -> dict:
        """The statistics of the named model (404 for another), or without a name those of every model: one."""
        name = self.model_named(name, version) if name else self.settings.model_name
        return {"model_stats": [self.stats.model_stats(name, VERSION)]}

    def executed(self, rows: int, ns: int) -> None:
        """One engine step or batch over `rows` decode rows, run by the decode worker in ns."""
        self.metrics.batch_size.observe(rows)
        self.stats.executed(rows, ns)

    async def body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            raise ClientError(413, f"the body is {declared} bytes, over the limit of {self.settings.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                raise ClientError(413, f"the body is over the limit of {self.settings.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return decompress(b"".join(chunks), request.headers.get("content-encoding"), self.settings.max_body_bytes)
        except EncodingError as error:
            raise ClientError(error.status, str(error)) from None

    def job(self, texts: list, settings: dict, began: float, on_token=None) -> Job:
        """Checks every text and setting before anything is queued; began: when the request arrived
        (time.monotonic)."""
        if not texts:
            raise ClientError(400, "no text given; send at least one text with [MASK] markers")
        sampling, num_samples, rerank = sampling_of(settings)
        try:
            request = bounded_request(self.prepared, texts, sampling, num_samples, rerank, self.settings.max_texts)
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

    async def run(self, job: Job, request: Request | None = None, timeout_s: float | None = None) -> list:
        """The job's results (see queued), counted in the statistics whether it gets them or not."""
        job.timings.queued, results = time.monotonic_ns(), None
        try:
            results = await self.queued(job, request, timeout_s)
        finally:
            if results is None:
                self.stats.failed(job.timings)
        phases = job.timings.phases(time.monotonic_ns())
        self.stats.answered(phases, job.inferences)
        self.metrics.queue_time.observe(phases["queue"] / 1e9)
        self.metrics.infer_time.observe(phases["compute_infer"] / 1e9)
        self.metrics.tokens_filled.inc(job.tokens(results))
        return results

    async def queued(self, job: Job, request: Request | None, timeout_s: float | None) -> list:
        """Queues the job and waits for its results, its deadline (504) or, given its request, its client leaving
        (499). A job that ends any way but with its results is dropped from the decode worker: its rows free their
        slots at the next step instead of being filled for nobody. The deadline is the server's --timeout, or the
        request's own timeout_s where that is shorter."""
        try:
            self.batcher.submit(job)
        except QueueFull:
            raise ClientError(503, "the server is busy: its queue is full; retry later",
                              {"Retry-After": "1"}) from None
        self.metrics.queue_depth.set(self.batcher.depth)
        deadline = self.settings.timeout_s if timeout_s is None else min(self.settings.timeout_s, timeout_s)
        try:
            waited = (time.monotonic_ns() - job.timings.arrived) / 1e9
            return await asyncio.wait_for(self.answer(job, request), deadline - waited)
        except asyncio.TimeoutError:
            raise ClientError(504, f"no answer within the deadline of {deadline:g} s") from None
        finally:
            if not job.future.done():          # the deadline passed, the client left, or this task was cancelled
                job.cancelled = True
            self.metrics.queue_depth.set(self.batcher.depth)

    @staticmethod
    async def answer(job: Job, request: Request | None) -> list:
        """The job's results; ClientError 499 if the client of request disconnects first."""
        if request is None:
            return await asyncio.shield(job.future)
        left = asyncio.ensure_future(client_left(request))
        try:
            done, _ = await asyncio.wait({job.future, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
        if job.future not in done:
            raise ClientError(499, "the client closed the connection before the answer")
        return job.future.result()

    # -- routes ---------------------------------------------------------------------------------------------

    async def live(self, request):
        return JSONResponse({"live": True})

    async def ready_route(self, request):
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def server_metadata(self, request):
        from importlib.metadata import version
        return JSONResponse({"name": "maria-onnx", "version": version("maria-onnx"),
                             "extensions": ["binary_tensor_data", "model_configuration", "statistics"]})

    def model(self, request) -> str:
        """The model a route names, with its version where the route has one: the served model, version 1."""
        return self.model_named(request.path_params["name"], request.path_params.get("version"))

    def model_named(self, name: str, version: str | None) -> str:
        """name, where it is the served model and version (none given: the served one) its version; else
        ClientError 404."""
        version = version or VERSION
        if name != self.settings.model_name:
            raise ClientError(404, f"no model '{name}' here; this server serves '{self.settings.model_name}'")
        if version != VERSION:
            raise ClientError(404, f"no version '{version}' of model '{name}' here; it has version {VERSION}")
        return name

    async def model_metadata(self, request):
        return JSONResponse(metadata(self.model(request)))

    async def model_config(self, request):
        return JSONResponse(model_config(self.model(request), self.settings.max_batch_size))

    async def model_statistics(self, request):
        """The model's statistics; without a model in the path (/v2/models/stats), those of every model."""
        return JSONResponse(self.statistics(request.path_params.get("name"), request.path_params.get("version")))

    async def model_ready(self, request):
        self.model(request)
        return await self.ready_route(request)

    async def infer(self, request):
        began, name = time.monotonic(), self.model(request)
        header = request.headers.get("inference-header-content-length")
        if header is not None and not header.isdigit():
            raise ClientError(400, f"Inference-Header-Content-Length must be a number of bytes, got {quoted(header)}")
        try:
            parsed: InferRequest = parse_infer(await self.body(request), int(header) if header else None)
        except BadRequest as error:
            raise ClientError(400, str(error)) from None
        results = await self.run(self.job(parsed.texts, parsed.settings, began), request, parsed.timeout_s)
        body, headers = infer_response(name, parsed, results)
        return Response(body, headers=headers)

    async def json_body(self, request):
        """The request body's JSON value; ClientError 400 where it is not JSON."""
        try:
            return request_json(await self.body(request))
        except BadRequest as error:
            raise ClientError(400, str(error)) from None

    async def json_request(self, request) -> tuple[list, dict]:
        payload = await self.json_body(request)
        if not isinstance(payload, dict):
            raise ClientError(400, f'send a JSON object {{"text": [...], ...}}, got {type(payload).__name__}')
        if "text" not in payload:
            raise ClientError(400, f'the request has no "text" field (it has {quoted(sorted(payload))}); '
                                   f'send {{"text": [...], ...}} with fields text, {", ".join(SETTINGS)}')
        try:
            texts = text_list(payload.pop("text"))
        except BadRequest as error:
            raise ClientError(400, str(error)) from None
        unknown = set(payload) - set(SETTINGS)
        if unknown:
            raise ClientError(400, f"unknown fields {quoted(sorted(unknown))}; fields are text, {', '.join(SETTINGS)}")
        return texts, payload

    async def infill(self, request):
        began = time.monotonic()
        texts, settings = await self.json_request(request)
        results = await self.run(self.job(texts, settings, began), request)
        return JSONResponse({"results": [r.to_dict() for r in results]})

    async def stream(self, request):
        began = time.monotonic()
        texts, settings = await self.json_request(request)
        events: asyncio.Queue = asyncio.Queue()
        pieces = {}                                # (text, sample) -> its FillPieces

        def on_token(index, sample, position, token, logprob):
            if (index, sample) not in pieces:
                ids = job.request.texts[index].candidates[0][1].ids
                pieces[index, sample] = FillPieces(self.infiller.tokenizer, ids)
            piece = pieces[index, sample].add(position, token)
            events.put_nowait({"event": "token", "data": {"text": index, "sample": sample, "position": position,
                                                          "token": token, "piece": piece, "logprob": logprob}})

        job = self.job(texts, settings, began, on_token)
        task = asyncio.ensure_future(self.run(job))
        task.add_done_callback(lambda _: events.put_nowait(None))

        async def lines():
            try:
                while (event := await events.get()) is not None:
                    yield f"event: {event['event']}\ndata: {json.dumps(event['data'], ensure_ascii=False)}\n\n"
            finally:                               # the client left mid-stream: run() drops the job
                if not task.done():
                    task.cancel()
            try:
                results = task.result()
            except ClientError as error:
                yield f"event: error\ndata: {json.dumps({'error': str(error), 'status': error.status})}\n\n"
                return
            except Exception as error:             # the model failed: logged, and the stream says so
                logging.getLogger("maria.serve").exception("the stream's fill failed")
                yield f"event: error\ndata: {json.dumps({'error': f'the model failed: {error}', 'status': 500})}\n\n"
                return
            payload = {"results": [r.to_dict() for r in results]}
            yield f"event: result\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream")

    async def generate(self, request):
        """Triton's generate extension (serve/generate.py): one JSON object."""
        return JSONResponse(await self.generated(request))

    async def generate_stream(self, request):
        """The same object as one server-sent event; an error before it is one JSON line, as on every route."""
        return Response(event(await self.generated(request)), media_type=SSE_TYPE)

    async def generated(self, request) -> dict:
        began, name = time.monotonic(), self.model(request)
        try:
            texts, settings = read_generate(await self.json_body(request))
        except BadRequest as error:
            raise ClientError(400, str(error)) from None
        return generate_response(name, await self.run(self.job(texts, settings, began), request))

    async def anneal(self, request):
        """`maria generate` over HTTP: simulated annealing, each sample's object of `maria generate --json`."""
        began = time.monotonic()
        payload = await self.json_body(request)
        if not isinstance(payload, dict):
            raise ClientError(400, f'send a JSON object {{"length": N, ...}}, got {type(payload).__name__}')
        results = await self.run(self.anneal_job(payload, began), request)
        return JSONResponse({"results": [r.to_dict() for r in results]})

    def anneal_job(self, settings: dict, began: float) -> Job:
        """Checks a generation's settings before it is queued."""
        if not self.infiller.manifest.has_baseline_heads:
            raise ClientError(501, "generation needs the AR's whole-text score, and the served bundle has no "
                                   "ar_lm_head.onnx; serve a bundle re-exported with `maria export`")
        try:
            request = anneal_request(self.infiller, settings)
        except SettingTypeError as error:
            raise ClientError(400, str(error)) from None
        except ValueError as error:
            raise ClientError(422, str(error)) from None
        if request.num_samples > self.settings.max_texts:
            raise ClientError(413, f"{request.num_samples} samples are over the limit of {self.settings.max_texts} "
                                   f"per request; ask for at most {self.settings.max_texts}")
        loop = asyncio.get_running_loop()
        return Job(request, loop, loop.create_future(), Timings(arrived=int(began * 1e9)))

    async def metrics_route(self, request):
        self.metrics.queue_depth.set(self.batcher.depth)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def client_left(request: Request) -> None:
    """Returns when the client disconnects. The body has been read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(infiller, settings: ServeSettings = ServeSettings()) -> Starlette:
    """The ASGI application serving `infiller`."""
    server = Server(infiller, settings)
    model = {"": ("GET", server.model_metadata), "/ready": ("GET", server.model_ready),
             "/config": ("GET", server.model_config), "/stats": ("GET", server.model_statistics),
             "/infer": ("POST", server.infer), "/generate": ("POST", server.generate),
             "/generate_stream": ("POST", server.generate_stream)}
    routes = {"/v2/health/live": ("GET", server.live), "/v2/health/ready": ("GET", server.ready_route),
              "/v2": ("GET", server.server_metadata), "/v2/models/stats": ("GET", server.model_statistics),
              **{prefix + suffix: route for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
                 for suffix, route in model.items()},
              "/v1/infill": ("POST", server.infill), "/v1/infill/stream": ("POST", server.stream),
              "/v1/generate": ("POST", server.anneal),
              "/metrics": ("GET", server.metrics_route)}
    app = Starlette(routes=[Route(path, guarded(server, path, handler), methods=[method])
                            for path, (method, handler) in routes.items()],
                    exception_handlers={404: unrouted(server), 405: unrouted(server)})
    app.router.redirect_slashes = False      # a 307 with an empty body; the 404 below names the slash instead
    app.state.server = server
    return app


def unrouted(server: Server):
    """The answer to a path no route has (404) or a method its route does not take (405): one line in JSON, as
    every other error, so a client's error decoding reads it."""
    async def answer(request: Request, error):
        began, path = time.monotonic(), request.url.path
        if error.status_code == 405:
            allowed = error.headers.get("Allow", "")
            message = f"{path} takes {allowed}, not {request.method}"
        elif path != "/" and path.endswith("/") and routed(request, path.rstrip("/")):
            message = f"no route {path}; leave out the trailing slash: {path.rstrip('/')}"
        else:
            message = (f"no route {path}; the routes are /v2/..., /v1/infill, /v1/infill/stream, /v1/generate and "
                       "/metrics")
        response = JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)
        record(server, "(unrouted)", request, error.status_code, began)       # one label: paths are the client's
        return response
    return answer


def routed(request: Request, path: str) -> bool:
    """Whether a route of the request's app takes `path` (with any method)."""
    scope = {**request.scope, "path": path}
    return any(route.matches(scope)[0] != Match.NONE for route in request.app.router.routes)


def guarded(server: Server, path: str, handler):
    """Wraps a route: the bearer token (health routes stay open), one-line errors, metrics, an access log line."""
    open_route = path.startswith("/v2/health")

    async def route(request: Request):
        began = time.monotonic()
        try:
            if not open_route and not server.authorized(request.headers.get("authorization", "")):
                raise ClientError(401, "missing or wrong bearer token; send 'Authorization: Bearer <api key>'",
                                  {"WWW-Authenticate": "Bearer"})
            response = await handler(request)
        except ClientError as error:
            response = JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers)
        except Exception:                          # not the client's doing: logged with its traceback here
            logging.getLogger("maria.serve").exception("%s %s failed", request.method, request.url.path)
            response = JSONResponse({"error": "the server failed on this request; see its log"}, status_code=500)
        if isinstance(response, StreamingResponse):        # counted and logged when its stream ends
            response.body_iterator = logged_stream(server, path, request, began, response.body_iterator)
            return response
        record(server, path, request, response.status_code, began)
        return encoded(response, accepted(request.headers.get("accept-encoding")))

    return route


def encoded(response: Response, encoding: str | None) -> Response:
    """The response compressed with encoding (gzip or deflate), where the client accepts one."""
    if encoding is None or not response.body:
        return response
    headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "content-encoding")}
    return Response(compress(response.body, encoding), status_code=response.status_code,
                    headers={**headers, "content-encoding": encoding, "vary": "Accept-Encoding"})


def record(server: Server, route: str, request: Request, status: int, began: float) -> None:
    """A finished HTTP request: its count and latency in the metrics, its access-log line."""
    logged(server, route, status, began, method=request.method, path=request.url.path,
           client=request.client.host if request.client else None)


def logged(server: Server, route: str, status: int, began: float, **line) -> None:
    """A finished request, HTTP or gRPC: counted by route and status, timed, and logged as one JSON line of `line`
    (method, path, client) with its status and time."""
    server.metrics.requests.labels(route, str(status)).inc()
    server.metrics.latency.labels(route).observe(time.monotonic() - began)
    access_log.info(json.dumps({"method": line["method"], "path": line["path"], "status": status,
                                "ms": round(1000 * (time.monotonic() - began), 2), "client": line["client"]}))


async def logged_stream(server: Server, path: str, request: Request, began: float, events):
    """The stream's events; when it ends, the request is recorded with its whole time, as 499 if the client left
    before the last event."""
    status = 499
    try:
        async for event in events:
            yield event
        status = 200
    finally:
        await events.aclose()                  # the stream's own cleanup runs now, not when it is collected
        record(server, path, request, status, began)
