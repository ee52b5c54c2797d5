"""The Open Inference Protocol over gRPC (KServe v2's `inference.GRPCInferenceService`), beside the HTTP routes
and over the same Server (serve/core.py): one batcher, one set of bounds, metrics and statistics.

    ServerLive, ServerReady              open, like /v2/health/*
    ServerMetadata, ModelMetadata, ModelReady
    ModelConfig, ModelStatistics         Triton's extensions, as GET .../config and .../stats
    ModelInfer                           text (BYTES) -> text, result (BYTES), as POST .../infer
    ModelStreamInfer                     ModelInfer's requests on one stream, each answered as it finishes

A request's inputs come as typed `contents` or as `raw_input_contents` (what tritonclient.grpc sends); both are
read by the HTTP route's reader (serve/protocol.py), so the checks and their messages are the same. Outputs go
back as `raw_output_contents`. Errors carry the HTTP route's one line with the matching gRPC status code; the
metrics count each call under its method path with the HTTP status the same outcome gets. A client that cancels,
or whose deadline passes, has its rows leave the decode engine at the next step. On a stream, each request gets one
ModelStreamInferResponse: its response, or its error's line in error_message, and the stream goes on; once the
server is stopping, a stream ends (UNAVAILABLE) as soon as its requests in flight are answered. Triton's
other methods (the repository, shared memory, trace and log settings) are not served: such a call gets
UNIMPLEMENTED.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from importlib.metadata import version
from typing import Any, TypeAlias

import grpc
from google.protobuf.json_format import ParseDict
from google.protobuf.message import DecodeError

from . import oip_pb2 as pb
from .core import ClientError, Server, logged
from .protocol import (
    OUTPUTS,
    VERSION,
    BadRequest,
    InferRequest,
    bytes_tensor,
    metadata,
    model_config,
    output_tensors,
    read_infer,
)

Context: TypeAlias = grpc.aio.ServicerContext  # (grpc has no type stubs: Any to mypy)
Handler = Callable[[Any, Context], Awaitable[Any]]  # (request, context) -> response; messages are oip_pb2's


SERVICE = "inference.GRPCInferenceService"
FINAL_FLAG = "triton_enable_empty_final_response"  # a stream's request parameter (see stream_method)
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    500: grpc.StatusCode.INTERNAL,
}
CONTENTS = {
    "BYTES": "bytes_contents",
    "BOOL": "bool_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
}


def parameter_values(parameters: Any) -> dict:
    """A protocol parameter map as plain values."""
    return {
        key: getattr(value, value.WhichOneof("parameter_choice"))
        for key, value in parameters.items()
        if value.WhichOneof("parameter_choice") is not None
    }


def read_infer_message(message: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest in the JSON form the HTTP route reads (raw contents as its binary data)."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise BadRequest(
            f"raw_input_contents holds {len(raw)} entries for {len(message.inputs)} inputs; give one per "
            "input, in order, or none and each input's contents"
        )
    inputs = []
    for number, tensor in enumerate(message.inputs):
        spec = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
            "parameters": parameter_values(tensor.parameters),
        }
        if raw:
            spec["parameters"]["binary_data_size"] = len(raw[number])
        else:
            spec["data"] = list(getattr(tensor.contents, CONTENTS.get(tensor.datatype, "bytes_contents")))
        inputs.append(spec)
    request = {
        "inputs": inputs,
        "parameters": parameter_values(message.parameters),
        "outputs": [{"name": output.name} for output in message.outputs],
    }
    if message.id:
        request["id"] = message.id
    return read_infer(request, b"".join(raw) if raw else None)


def infer_message(model_name: str, request: InferRequest, results: list) -> pb.ModelInferResponse:
    """The outputs asked for, as raw contents."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=VERSION, id=request.id or "")
    for name, shape, values in output_tensors(request, results):
        response.outputs.add(name=name, datatype=OUTPUTS[name], shape=shape)
        response.raw_output_contents.append(bytes_tensor(values))
    return response


class InferenceService:
    """The service's methods over one Server."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def server_live(self, message: Any, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, message: Any, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=self.server.ready)

    async def server_metadata(self, message: Any, context: Context) -> Any:
        return pb.ServerMetadataResponse(
            name="maria-onnx", version=version("maria-onnx"), extensions=["model_configuration", "statistics"]
        )

    async def model_metadata(self, message: Any, context: Context) -> Any:
        described = metadata(self.server.model_named(message.name, message.version))
        response = pb.ModelMetadataResponse(
            name=described["name"], versions=described["versions"], platform=described["platform"]
        )
        for kind in ("inputs", "outputs"):
            for tensor in described[kind]:
                getattr(response, kind).add(**tensor)
        return response

    async def model_ready(self, message: Any, context: Context) -> Any:
        self.server.model_named(message.name, message.version)
        return pb.ModelReadyResponse(ready=self.server.ready)

    async def model_config(self, message: Any, context: Context) -> Any:
        name = self.server.model_named(message.name, message.version)
        return ParseDict({"config": model_config(name, self.server.settings.max_batch_size)}, pb.ModelConfigResponse())

    async def model_statistics(self, message: Any, context: Context) -> Any:
        return ParseDict(self.server.statistics(message.name, message.version), pb.ModelStatisticsResponse())

    async def model_infer(self, message: Any, context: Context) -> Any:
        began, server = time.monotonic(), self.server
        name = server.model_named(message.model_name, message.model_version)
        try:
            parsed = read_infer_message(message)
        except BadRequest as error:
            raise ClientError(400, str(error)) from None
        job = server.job(parsed.texts, parsed.settings, began)
        deadlines = [t for t in (parsed.timeout_s, context.time_remaining()) if t is not None]  # request's, call's
        return infer_message(name, parsed, await server.run(job, None, min(deadlines, default=None)))


def method(
    server: Server, name: str, handler: Handler, request_type: Any, response_type: Any, open_method: bool = False
) -> grpc.RpcMethodHandler:
    """One unary method: the bearer token (unless open), one-line errors with their gRPC code, metrics and an access
    log line."""
    path = f"/{SERVICE}/{name}"

    async def call(raw: bytes, context: Context) -> Any:
        began, status = time.monotonic(), 499  # 499 unless it ends otherwise: the client cancelled
        try:
            if not open_method:
                check_token(server, context)
            response, status = await handler(parsed(raw, request_type, name), context), 200
            return response
        except ClientError as error:
            status = error.status
            await context.abort(CODES.get(error.status, grpc.StatusCode.UNKNOWN), str(error))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:  # not the client's doing: logged with its traceback here
            status = 500
            logging.getLogger("maria.serve").exception("gRPC %s failed", name)
            await context.abort(grpc.StatusCode.INTERNAL, "the server failed on this request; see its log")
        finally:
            logged(server, path, status, began, method="gRPC", path=path, client=context.peer())

    return grpc.unary_unary_rpc_method_handler(call, response_serializer=response_type.SerializeToString)


def check_token(server: Server, context: Context) -> None:
    """ClientError 401 unless the call's metadata carries the bearer token (any passes without --api-key)."""
    if not server.authorized(dict(context.invocation_metadata() or ()).get("authorization", "")):
        raise ClientError(401, "missing or wrong bearer token; send the metadata 'authorization: Bearer <api key>'")


def parsed(raw: bytes, request_type: Any, name: str) -> Any:
    """The request message; bytes that are not one get a one-line ClientError 400 (gRPC's own deserializer
    answered UNKNOWN and logged a traceback)."""
    try:
        return request_type.FromString(raw)
    except DecodeError:
        raise ClientError(
            400,
            f"the message is not a valid {request_type.DESCRIPTOR.name}; send the Open "
            f"Inference Protocol's {name} request",
        ) from None


STOPPING = "the server is shutting down and ended the stream; open a new one (to another server)"
REFUSED = "the server is shutting down; send this request on a new stream (to another server)"


def stream_method(server: Server, service: InferenceService, stopping: asyncio.Event) -> grpc.RpcMethodHandler:
    """ModelStreamInfer: the requests on a stream run at once, each answered when it finishes (match them by
    id) with its ModelInferResponse or its error's one line; an error ends no stream. At most --max-queue of a
    stream's requests are unanswered at a time: beyond, the stream reads no more until one is answered. The
    bearer token is checked once, for the stream. Each request is counted, timed and logged like a ModelInfer.
    Triton's `triton_enable_empty_final_response` is taken: every answer is its request's final one and says so
    (`triton_final_response`), and no empty one follows. Once `stopping` is set, a request read gets a 503 answer
    and the stream ends with UNAVAILABLE when none is left unanswered (as usual, OK, where the client had closed its
    side), instead of holding the server's stop until its grace period ends."""
    path = f"/{SERVICE}/ModelStreamInfer"

    async def answer(raw: bytes, context: Context, peer: str) -> pb.ModelStreamInferResponse:
        began, status, message = time.monotonic(), 499, pb.ModelInferRequest()  # 499 unless: the client left
        try:
            message = parsed(raw, pb.ModelInferRequest, "ModelStreamInfer")
            if stopping.is_set():
                raise ClientError(503, REFUSED)
            final = FINAL_FLAG in message.parameters and message.parameters[FINAL_FLAG].bool_param
            if FINAL_FLAG in message.parameters:
                del message.parameters[FINAL_FLAG]
            response = pb.ModelStreamInferResponse(infer_response=await service.model_infer(message, context))
            if final:
                response.infer_response.parameters["triton_final_response"].bool_param = True
            status = 200
            return response
        except ClientError as error:
            status, line = error.status, str(error)
        except Exception:  # not the client's doing: logged with its traceback here
            status, line = 500, "the server failed on this request; see its log"
            logging.getLogger("maria.serve").exception("gRPC ModelStreamInfer failed")
        finally:
            logged(server, path, status, began, method="gRPC", path=path, client=peer)
        return pb.ModelStreamInferResponse(
            error_message=line,
            infer_response=pb.ModelInferResponse(  # its id
                model_name=message.model_name, model_version=message.model_version, id=message.id
            ),
        )

    async def call(requests: AsyncIterable[bytes], context: Context) -> AsyncIterator[Any]:
        peer = context.peer()  # read now: the call's context must not be touched once it has ended
        try:
            check_token(server, context)
        except ClientError as error:
            logged(server, path, error.status, time.monotonic(), method="gRPC", path=path, client=peer)
            await context.abort(CODES[error.status], str(error))
        answers: asyncio.Queue = asyncio.Queue()
        room, running = asyncio.Semaphore(server.settings.max_queue), set()
        unanswered, sent_all = 0, False

        async def one(raw: bytes) -> None:
            await answers.put(await answer(raw, context, peer))

        async def read() -> None:  # the stream's requests, then None once all are answered
            nonlocal unanswered, sent_all
            try:
                async for raw in requests:
                    unanswered += 1
                    await room.acquire()
                    task = asyncio.create_task(one(raw))
                    running.add(task)
                    task.add_done_callback(running.discard)
                sent_all = True  # the client closed its side: the stream ends as usual
                await asyncio.gather(*running)
            finally:
                await answers.put(None)

        async def stop() -> None:  # wakes the loop below when the server stops
            await stopping.wait()
            await answers.put(STOPPING)

        reader, watcher = asyncio.create_task(read()), asyncio.create_task(stop())
        try:
            while (response := await answers.get()) is not None:
                if response is not STOPPING:
                    unanswered -= 1
                    room.release()
                    yield response
                if stopping.is_set() and not unanswered and not sent_all:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, STOPPING)
            await reader  # a failed read of the stream fails the call
        finally:  # the client left: its requests leave the engine, before the call ends
            tasks = [reader, watcher, *running]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return grpc.stream_stream_rpc_method_handler(
        call, response_serializer=pb.ModelStreamInferResponse.SerializeToString
    )


def grpc_server(server: Server, stopping: asyncio.Event) -> grpc.aio.Server:
    """An asyncio gRPC server with the service's methods over `server` (no port yet; add one and start it on the
    running event loop). Messages are bounded by --max-body-bytes like HTTP bodies. Set `stopping` before stopping
    it: open streams then end once answered (stream_method)."""
    service = InferenceService(server)
    handlers = {
        "ServerLive": service.server_live,
        "ServerReady": service.server_ready,
        "ServerMetadata": service.server_metadata,
        "ModelMetadata": service.model_metadata,
        "ModelReady": service.model_ready,
        "ModelConfig": service.model_config,
        "ModelStatistics": service.model_statistics,
        "ModelInfer": service.model_infer,
    }
    methods = {
        name: method(
            server,
            name,
            handler,
            getattr(pb, f"{name}Request"),
            getattr(pb, f"{name}Response"),
            open_method=name in ("ServerLive", "ServerReady"),
        )
        for name, handler in handlers.items()
    }
    methods["ModelStreamInfer"] = stream_method(server, service, stopping)
    endpoint = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", server.settings.max_body_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is refused, not shared
            ("grpc.max_concurrent_streams", server.settings.max_connections),
            ("grpc.max_connection_idle_ms", int(1000 * server.settings.keep_alive_s)),
        ]
    )
    endpoint.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, methods), Unserved(server, list(methods)))
    )
    return endpoint


class Unserved(grpc.GenericRpcHandler):
    """Any other method (Triton's repository, shared memory...): UNIMPLEMENTED with one line naming what
    is served."""

    def __init__(self, server: Server, served: list[str]) -> None:
        self.server, self.served = server, served

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        path, server = handler_call_details.method, self.server

        async def unserved(message: Any, context: Context) -> None:
            logged(server, "(unserved)", 501, time.monotonic(), method="gRPC", path=path, client=context.peer())
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{path} is not served here; this server's gRPC serves {SERVICE}'s {', '.join(self.served)}",
            )

        return grpc.unary_unary_rpc_method_handler(unserved)
