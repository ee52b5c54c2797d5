"""`maria serve`'s HTTP transport: a thin adapter over the server core (serve/core.py). The Open Inference Protocol
(KServe v2, as Triton speaks it, binary tensor data included), a plain JSON route and a server-sent-event stream,
all fed to the core's one batcher: continuous batching through the decode engine (serve/continuous.py), or batch
at a time with --decoder concat (serve/batcher.py).

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
    POST /v1/completions               OpenAI's completions, `suffix` for insertion (serve/openai.py); streams
                                       OpenAI's chunks with "stream": true
    GET  /v1/models  /v1/models/{model}   OpenAI's model list and model
    GET  /metrics                      Prometheus text format
    (and with --grpc-port the Open Inference Protocol over gRPC, serve/grpc_service.py, over the same Server)

Client errors get one line in {"error": ...}: 400 unreadable request, 401 bad token, 404 unknown model,
413 body or texts over the bounds, 422 a text or setting the model refuses, 501 generation without the AR's
head, 503 queue full, 504 deadline passed
(and 404 / 405 for a path or method no route has); on OpenAI's routes, in OpenAI's error object;
a client that leaves before its answer is logged as 499, and its rows leave the decode worker. Bodies may come
gzip- or deflate-compressed, and answers go compressed where the client accepts it (serve/encoding.py).
"""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route

from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.requests import SETTINGS
from maria_onnx.runtime.text import quoted

from . import openai
from .core import ClientError, ClientLeft, Server, ServeSettings, logged
from .encoding import EncodingError, accepted, compress, decompress
from .generate import SSE_TYPE, event, generate_response, read_generate
from .jobs import Job
from .protocol import (
    BadRequest,
    InferRequest,
    infer_response,
    metadata,
    model_config,
    parse_infer,
    request_json,
    text_list,
)


class HttpRoutes:
    """The HTTP transport: each route reads its request, hands a job to the server core and writes its answer."""

    def __init__(self, server: Server):
        self.server = server
        self.settings = server.settings

    async def body(self, request: Request) -> bytes:
        """The request's body, decompressed: 413 over the limit, 408 where it does not come within
        --body-timeout, 499 where the client leaves first."""
        deadline = self.settings.body_timeout_s
        try:
            raw = await asyncio.wait_for(self.raw_body(request), deadline)
        except asyncio.TimeoutError:
            raise ClientError(408, f"the request's body did not come whole within {deadline:g} s") from None
        except ClientDisconnect:  # the client's doing, not the server's: counted and logged as 499
            raise ClientError(499, "the client closed the connection before its body was sent") from None
        try:
            return decompress(raw, request.headers.get("content-encoding"), self.settings.max_body_bytes)
        except EncodingError as error:
            raise ClientError(error.status, str(error)) from None

    async def raw_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        chunks, size = [], 0
        stream = request.stream()
        if declared and declared.isdigit() and int(declared) > limit:
            await drained(stream, int(declared))
            raise ClientError(413, f"the body is {quoted(declared, str)} bytes, over the limit of {limit}")
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                await drained(stream, size)
                raise ClientError(413, f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready_route(self, request: Request) -> Response:
        return JSONResponse({"ready": self.server.ready}, status_code=200 if self.server.ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        from importlib.metadata import version

        return JSONResponse(
            {
                "name": "maria-onnx",
                "version": version("maria-onnx"),
                "extensions": ["binary_tensor_data", "model_configuration", "statistics"],
            }
        )

    def model(self, request: Request) -> str:
        """The model a route names, with its version where the route has one: the served model, version 1."""
        return self.server.model_named(request.path_params["name"], request.path_params.get("version"))

    async def model_metadata(self, request: Request) -> Response:
        return JSONResponse(metadata(self.model(request)))

    async def model_config(self, request: Request) -> Response:
        return JSONResponse(model_config(self.model(request), self.settings.max_batch_size))

    async def model_statistics(self, request: Request) -> Response:
        """The model's statistics; without a model in the path (/v2/models/stats), those of every model."""
        return JSONResponse(self.server.statistics(request.path_params.get("name"), request.path_params.get("version")))

    async def model_ready(self, request: Request) -> Response:
        self.model(request)
        return await self.ready_route(request)

    async def infer(self, request: Request) -> Response:
        began, name = time.monotonic(), self.model(request)
        header = request.headers.get("inference-header-content-length")
        if header is not None and not header.isdigit():
            raise ClientError(400, f"Inference-Header-Content-Length must be a number of bytes, got {quoted(header)}")
        try:
            parsed: InferRequest = parse_infer(await self.body(request), int(header) if header else None)
        except BadRequest as error:
            raise ClientError(400, str(error)) from None
        results = await self.server.run(
            self.server.job(parsed.texts, parsed.settings, began), left(request), parsed.timeout_s
        )
        body, headers = infer_response(name, parsed, results)
        return Response(body, headers=headers)

    async def json_body(self, request: Request) -> Any:
        """The request body's JSON value; ClientError 400 where it is not JSON."""
        try:
            return request_json(await self.body(request))
        except BadRequest as error:
            raise ClientError(400, str(error)) from None

    async def json_request(self, request: Request) -> tuple[list, dict]:
        payload = await self.json_body(request)
        if not isinstance(payload, dict):
            raise ClientError(400, f'send a JSON object {{"text": [...], ...}}, got {type(payload).__name__}')
        if "text" not in payload:
            raise ClientError(
                400,
                f'the request has no "text" field (it has {quoted(sorted(payload))}); '
                f'send {{"text": [...], ...}} with fields text, {", ".join(SETTINGS)}',
            )
        try:
            texts = text_list(payload.pop("text"))
        except BadRequest as error:
            raise ClientError(400, str(error)) from None
        unknown = set(payload) - set(SETTINGS)
        if unknown:
            raise ClientError(400, f"unknown fields {quoted(sorted(unknown))}; fields are text, {', '.join(SETTINGS)}")
        return texts, payload

    async def infill(self, request: Request) -> Response:
        began = time.monotonic()
        texts, settings = await self.json_request(request)
        results = await self.server.run(self.server.job(texts, settings, began), left(request))
        return JSONResponse({"results": [r.to_dict() for r in results]})

    async def stream(self, request: Request) -> Response:
        began = time.monotonic()
        texts, settings = await self.json_request(request)
        events: asyncio.Queue = asyncio.Queue()

        def on_token(index: int, sample: int, position: int, token: int, logprob: float) -> None:
            piece = job.piece(self.server.infiller.tokenizer, index, sample, position, token)
            events.put_nowait(
                {
                    "event": "token",
                    "data": {
                        "text": index,
                        "sample": sample,
                        "position": position,
                        "token": token,
                        "piece": piece,
                        "logprob": logprob,
                    },
                }
            )

        job = self.server.job(texts, settings, began, on_token)

        def line(event: dict) -> str:
            return f"event: {event['event']}\ndata: {json.dumps(event['data'], ensure_ascii=False)}\n\n"

        def answered(results: list) -> list[str]:
            payload = {"results": [r.to_dict() for r in results]}
            return [f"event: result\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"]

        def failed(error: ClientError) -> str:
            return f"event: error\ndata: {json.dumps({'error': str(error), 'status': error.status})}\n\n"

        return StreamingResponse(streamed(self.server, job, events, line, answered, failed), media_type=SSE_TYPE)

    async def completions(self, request: Request) -> Response:
        """OpenAI's completions (serve/openai.py): insertion with `suffix`, continuation without."""
        began, name, infiller = time.monotonic(), self.settings.model_name, self.server.infiller
        completion = openai.read_completion(
            await self.json_body(request), name, self.settings.max_texts, infiller.max_sequence_length
        )
        answer = openai.Answer(completion, name, infiller.tokenizer)
        texts, settings, rule = completion.texts(), completion.settings, completion.span_score
        if not completion.stream:
            job = self.server.job(texts, settings, began, span_score=rule)
            return JSONResponse(answer.body(await self.server.run(job, left(request))))
        stream = openai.Stream(answer, lambda *fill: job.piece(infiller.tokenizer, *fill))
        job = self.server.job(texts, settings, began, stream.hear, rule)
        return StreamingResponse(
            streamed(self.server, job, stream.events, stream.line, stream.answered, openai.error_event),
            media_type=SSE_TYPE,
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse(openai.models(self.settings.model_name, self.server.started))

    async def model_card(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.settings.model_name:
            raise openai.unknown_model(name, self.settings.model_name)
        return JSONResponse(openai.model_card(name, self.server.started))

    async def generate(self, request: Request) -> Response:
        """Triton's generate extension (serve/generate.py): one JSON object."""
        return JSONResponse(await self.generated(request))

    async def generate_stream(self, request: Request) -> Response:
        """The same object as one server-sent event; an error before it is one JSON line, as on every route."""
        return Response(event(await self.generated(request)), media_type=SSE_TYPE)

    async def generated(self, request: Request) -> dict:
        began, name = time.monotonic(), self.model(request)
        try:
            texts, settings = read_generate(await self.json_body(request))
        except BadRequest as error:
            raise ClientError(400, str(error)) from None
        return generate_response(name, await self.server.run(self.server.job(texts, settings, began), left(request)))

    async def anneal(self, request: Request) -> Response:
        """`maria generate` over HTTP: simulated annealing, each sample's object of `maria generate --json`."""
        began = time.monotonic()
        payload = await self.json_body(request)
        if not isinstance(payload, dict):
            raise ClientError(400, f'send a JSON object {{"length": N, ...}}, got {type(payload).__name__}')
        results = await self.server.run(self.server.anneal_job(payload, began), left(request))
        return JSONResponse({"results": [r.to_dict() for r in results]})

    async def metrics_route(self, request: Request) -> Response:
        self.server.metrics.queue_depth.set(self.server.batcher.depth)
        return Response(generate_latest(self.server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


MODEL_PATHS = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")  # the protocol's two
DRAIN_BYTES = 64 << 20  # of a body over the limit, read and dropped before the 413 (nginx's lingering close)
DRAIN_SECONDS = 5.0


async def drained(stream: AsyncIterator[bytes], size: int) -> None:
    """Reads and drops the rest of a body over the limit, so that a client still sending it reads the 413: closed
    with its bytes unread, the connection is reset and clients like urllib see only that. A body over DRAIN_BYTES,
    or one that takes over DRAIN_SECONDS, is left unread (the answer goes, and the connection closes)."""
    if size > DRAIN_BYTES:
        return

    async def read_rest() -> None:
        read = 0
        async for chunk in stream:
            read += len(chunk)
            if read > DRAIN_BYTES:
                return

    with contextlib.suppress(asyncio.TimeoutError, ClientDisconnect):
        await asyncio.wait_for(read_rest(), DRAIN_SECONDS)


def streamed(
    server: Server,
    job: Job,
    events: asyncio.Queue,
    line: Callable[[Any], str],
    answered: Callable[[list], list[str]],
    failed: Callable[[ClientError], str],
) -> AsyncIterator[str]:
    """A job's server-sent events: line(event) for each event put on `events` while it runs, then answered(results)
    (its last lines), or failed(error) where it fails. A client that leaves mid-stream drops the job."""
    task = asyncio.ensure_future(server.run(job))
    task.add_done_callback(lambda _: events.put_nowait(None))

    async def lines() -> AsyncIterator[str]:
        try:
            while (event := await events.get()) is not None:
                yield line(event)
        finally:  # the client left mid-stream: run() drops the job
            if not task.done():
                task.cancel()
        try:
            results = task.result()
        except ClientError as error:
            yield failed(error)
            return
        except Exception as error:  # the model failed: logged, and the stream says so
            logging.getLogger("maria.serve").exception("the stream's fill failed")
            yield failed(ClientError(500, f"the model failed: {error}"))
            return
        for text in answered(results):
            yield text

    return lines()


def left(request: Request) -> ClientLeft:
    """The server core's ClientLeft of an HTTP request."""
    return lambda: client_left(request)


async def client_left(request: Request) -> None:
    """Returns when the client disconnects. The body has been read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(infiller: Infiller, settings: ServeSettings = ServeSettings()) -> Starlette:
    """The ASGI application serving `infiller`."""
    server = Server(infiller, settings)
    http = HttpRoutes(server)
    routes = {  # "{model}": under /v2/models/{name} and /v2/models/{name}/versions/{version} alike
        "/v2/health/live": ("GET", http.live),
        "/v2/health/ready": ("GET", http.ready_route),
        "/v2": ("GET", http.server_metadata),
        "/v2/models/stats": ("GET", http.model_statistics),
        "{model}": ("GET", http.model_metadata),
        "{model}/ready": ("GET", http.model_ready),
        "{model}/config": ("GET", http.model_config),
        "{model}/stats": ("GET", http.model_statistics),
        "{model}/infer": ("POST", http.infer),
        "{model}/generate": ("POST", http.generate),
        "{model}/generate_stream": ("POST", http.generate_stream),
        "/v1/infill": ("POST", http.infill),
        "/v1/infill/stream": ("POST", http.stream),
        "/v1/generate": ("POST", http.anneal),
        "/v1/completions": ("POST", http.completions),
        "/v1/models": ("GET", http.models),
        "/v1/models/{model}": ("GET", http.model_card),
        "/metrics": ("GET", http.metrics_route),
    }
    app = Starlette(
        routes=[
            Route(path, guarded(server, path, handler), methods=[method])
            for pattern, (method, handler) in routes.items()
            for path in model_paths(pattern)
        ],
        exception_handlers={404: unrouted(server), 405: unrouted(server)},
    )
    app.router.redirect_slashes = False  # a 307 with an empty body; the 404 below names the slash instead
    app.state.server = server
    return app


def model_paths(pattern: str) -> list[str]:
    """The paths of a route pattern: "{model}..." under both of the protocol's model paths, others as they are."""
    if not pattern.startswith("{model}"):
        return [pattern]
    return [pattern.replace("{model}", prefix, 1) for prefix in MODEL_PATHS]


def unrouted(server: Server) -> Callable[[Request, Exception], Awaitable[Response]]:
    """The answer to a path no route has (404) or a method its route does not take (405): one line in JSON, as
    every other error, so a client's error decoding reads it."""

    async def answer(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException), "the handler of statuses 404 and 405, which Starlette raises so"
        began, path = time.monotonic(), request.url.path
        shown = quoted(path, str)  # the client's path, cut short
        if error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "")
            message = f"{shown} takes {allowed}, not {quoted(request.method, str)}"
        elif path != "/" and path.endswith("/") and routed(request, path.rstrip("/")):
            message = f"no route {shown}; leave out the trailing slash: {quoted(path.rstrip('/'), str)}"
        else:
            message = (
                f"no route {shown}; the routes are /v2/..., /v1/infill, /v1/infill/stream, /v1/generate, "
                "/v1/completions, /v1/models and /metrics"
            )
        body = error_body(path)(ClientError(error.status_code, message))
        response = JSONResponse(body, status_code=error.status_code, headers=error.headers)
        record(server, "(unrouted)", request, error.status_code, began)  # one label: paths are the client's
        return response

    return answer


def routed(request: Request, path: str) -> bool:
    """Whether a route of the request's app takes `path` (with any method)."""
    scope = {**request.scope, "path": path}
    return any(route.matches(scope)[0] != Match.NONE for route in request.app.router.routes)


def error_body(path: str) -> Callable[[ClientError], dict]:
    """How a route's errors are written: OpenAI's error object on OpenAI's routes, else {"error": line}."""
    if openai_path(path):
        return openai.error_body
    return lambda error: {"error": str(error)}


def openai_path(path: str) -> bool:
    """A path of OpenAI's API (or one its clients would try): /v1/ but for this server's own /v1 routes."""
    return path.startswith("/v1/") and not path.startswith(("/v1/infill", "/v1/generate"))


Handler = Callable[[Request], Awaitable[Response]]


def guarded(server: Server, path: str, handler: Handler) -> Handler:
    """Wraps a route: the bearer token (health routes stay open), one-line errors, metrics, an access log line."""
    open_route, body = path.startswith("/v2/health"), error_body(path)

    async def route(request: Request) -> Response:
        began = time.monotonic()
        try:
            if not open_route and not server.authorized(request.headers.get("authorization", "")):
                raise ClientError(
                    401,
                    "missing or wrong bearer token; send 'Authorization: Bearer <api key>'",
                    {"WWW-Authenticate": "Bearer"},
                )
            response = await handler(request)
        except ClientError as error:
            response = JSONResponse(body(error), status_code=error.status, headers=error.headers)
        except Exception:  # not the client's doing: logged with its traceback here
            logging.getLogger("maria.serve").exception("%s %s failed", request.method, request.url.path)
            failed = ClientError(500, "the server failed on this request; see its log")
            response = JSONResponse(body(failed), status_code=500)
        if isinstance(response, StreamingResponse):  # counted and logged when its stream ends
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
    return Response(
        compress(bytes(response.body), encoding),
        status_code=response.status_code,
        headers={**headers, "content-encoding": encoding, "vary": "Accept-Encoding"},
    )


def record(server: Server, route: str, request: Request, status: int, began: float) -> None:
    """A finished HTTP request: its count and latency in the metrics, its access-log line."""
    logged(
        server,
        route,
        status,
        began,
        method=request.method,
        path=request.url.path,
        client=request.client.host if request.client else None,
    )


async def logged_stream(
    server: Server, path: str, request: Request, began: float, events: AsyncIterable
) -> AsyncIterator:
    """The stream's events; when it ends, the request is recorded with its whole time, as 499 if the client left
    before the last event."""
    status = 499
    try:
        async for event in events:
            yield event
        status = 200
    finally:
        close = getattr(events, "aclose", None)  # an async generator's (every stream here is one)
        if close is not None:
            await close()  # the stream's own cleanup runs now, not when it is collected
        record(server, path, request, status, began)
