"""The Open Inference Protocol over gRPC (KServe v2's `inference.GRPCInferenceService`), beside the HTTP routes
and over the same Server (serve/app.py): one batcher, one set of bounds, metrics and statistics.

    ServerLive, ServerReady              open, like /v2/health/*
    ServerMetadata, ModelMetadata, ModelReady
    ModelConfig, ModelStatistics         Triton's extensions, as GET .../config and .../stats
    ModelInfer                           text (BYTES) -> text, result (BYTES), as POST .../infer

A request's inputs come as typed `contents` or as `raw_input_contents` (what tritonclient.grpc sends); both are
read by the HTTP route's reader (serve/protocol.py), so the checks and their messages are the same. Outputs go
back as `raw_output_contents`. Errors carry the HTTP route's one line with the matching gRPC status code; the
metrics count each call under its method path with the HTTP status the same outcome gets. A client that cancels,
or whose deadline passes, has its rows leave the decode engine at the next step. Triton's other methods (streaming,
the repository, shared memory, trace and log settings) are not served: such a call gets UNIMPLEMENTED.
"""

import asyncio
import logging
import time
from importlib.metadata import version

import grpc
from google.protobuf.json_format import ParseDict
from google.protobuf.message import DecodeError

from . import oip_pb2 as pb
from .app import ClientError, Server, logged
from .protocol import (OUTPUTS, VERSION, BadRequest, InferRequest, bytes_tensor, metadata, model_config,
                       output_tensors, read_infer)

SERVICE = "inference.GRPCInferenceService"
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
         413: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT, 499: grpc.StatusCode.CANCELLED,
         503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED, 500: grpc.StatusCode.INTERNAL}
CONTENTS = {"BYTES": "bytes_contents", "BOOL": "bool_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
            "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
            "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents"}


def parameter_values(parameters) -> dict:
    """A protocol parameter map as plain values."""
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in parameters.items()
            if value.WhichOneof("parameter_choice") is not None}


def read_infer_message(message: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest in the JSON form the HTTP route reads (raw contents as its binary data)."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise BadRequest(f"raw_input_contents holds {len(raw)} entries for {len(message.inputs)} inputs; give one per "
                         "input, in order, or none and each input's contents")
    inputs = []
    for number, tensor in enumerate(message.inputs):
        spec = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape),
                "parameters": parameter_values(tensor.parameters)}
        if raw:
            spec["parameters"]["binary_data_size"] = len(raw[number])
        else:
            spec["data"] = list(getattr(tensor.contents, CONTENTS.get(tensor.datatype, "bytes_contents")))
        inputs.append(spec)
    request = {"inputs": inputs, "parameters": parameter_values(message.parameters),
               "outputs": [{"name": output.name} for output in message.outputs]}
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

    def __init__(self, server: Server):
        self.server = server

    async def server_live(self, message, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, message, context):
        return pb.ServerReadyResponse(ready=self.server.ready)

    async def server_metadata(self, message, context):
        return pb.ServerMetadataResponse(name="maria-onnx", version=version("maria-onnx"),
                                         extensions=["model_configuration", "statistics"])

    async def model_metadata(self, message, context):
        described = metadata(self.server.model_named(message.name, message.version))
        response = pb.ModelMetadataResponse(name=described["name"], versions=described["versions"],
                                            platform=described["platform"])
        for kind in ("inputs", "outputs"):
            for tensor in described[kind]:
                getattr(response, kind).add(**tensor)
        return response

    async def model_ready(self, message, context):
        self.server.model_named(message.name, message.version)
        return pb.ModelReadyResponse(ready=self.server.ready)

    async def model_config(self, message, context):
        name = self.server.model_named(message.name, message.version)
        return ParseDict({"config": model_config(name, self.server.settings.max_batch_size)}, pb.ModelConfigResponse())

    async def model_statistics(self, message, context):
        return ParseDict(self.server.statistics(message.name, message.version), pb.ModelStatisticsResponse())

    async def model_infer(self, message, context):
        began, server = time.monotonic(), self.server
        name = server.model_named(message.model_name, message.model_version)
        try:
            parsed = read_infer_message(message)
        except BadRequest as error:
            raise ClientError(400, str(error)) from None
        job = server.job(parsed.texts, parsed.settings, began)
        deadlines = [t for t in (parsed.timeout_s, context.time_remaining()) if t is not None]   # request's, call's
        return infer_message(name, parsed, await server.run(job, None, min(deadlines, default=None)))


def method(server: Server, name: str, handler, request_type, response_type, open_method: bool = False):
    """One unary method: the bearer token (unless open), one-line errors with their gRPC code, metrics and an access
    log line."""
    path = f"/{SERVICE}/{name}"

    async def call(raw: bytes, context):
        began, status = time.monotonic(), 499           # 499 unless it ends otherwise: the client cancelled
        try:
            token = dict(context.invocation_metadata() or ()).get("authorization", "")
            if not open_method and not server.authorized(token):
                raise ClientError(401, "missing or wrong bearer token; send the metadata "
                                       "'authorization: Bearer <api key>'")
            response, status = await handler(parsed(raw), context), 200
            return response
        except ClientError as error:
            status = error.status
            await context.abort(CODES.get(error.status, grpc.StatusCode.UNKNOWN), str(error))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:                               # not the client's doing: logged with its traceback here
            status = 500
            logging.getLogger("maria.serve").exception("gRPC %s failed", name)
            await context.abort(grpc.StatusCode.INTERNAL, "the server failed on this request; see its log")
        finally:
            logged(server, path, status, began, method="gRPC", path=path, client=context.peer())

    def parsed(raw: bytes):
        """The request message; bytes that are not one get a one-line INVALID_ARGUMENT (gRPC's own deserializer
        answered UNKNOWN and logged a traceback)."""
        try:
            return request_type.FromString(raw)
        except DecodeError:
            raise ClientError(400, f"the message is not a valid {request_type.DESCRIPTOR.name}; send the Open "
                                   f"Inference Protocol's {name} request") from None

    return grpc.unary_unary_rpc_method_handler(call, response_serializer=response_type.SerializeToString)


def grpc_server(server: Server) -> grpc.aio.Server:
    """An asyncio gRPC server with the service's methods over `server` (no port yet; add one and start it on the
    running event loop). Messages are bounded by --max-body-bytes like HTTP bodies."""
    service = InferenceService(server)
    handlers = {"ServerLive": service.server_live, "ServerReady": service.server_ready,
                "ServerMetadata": service.server_metadata, "ModelMetadata": service.model_metadata,
                "ModelReady": service.model_ready, "ModelConfig": service.model_config,
                "ModelStatistics": service.model_statistics, "ModelInfer": service.model_infer}
    methods = {name: method(server, name, handler, getattr(pb, f"{name}Request"), getattr(pb, f"{name}Response"),
                            open_method=name in ("ServerLive", "ServerReady"))
               for name, handler in handlers.items()}
    endpoint = grpc.aio.server(options=[("grpc.max_receive_message_length", server.settings.max_body_bytes),
                                        ("grpc.so_reuseport", 0)])      # a port in use is refused, not shared
    endpoint.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),
                                       Unserved(server, list(methods))))
    return endpoint


class Unserved(grpc.GenericRpcHandler):
    """Any other method (Triton's streaming, repository, shared memory...): UNIMPLEMENTED with one line naming what
    is served."""

    def __init__(self, server: Server, served: list[str]):
        self.server, self.served = server, served

    def service(self, handler_call_details):
        path, server = handler_call_details.method, self.server

        async def unserved(message, context):
            logged(server, "(unserved)", 501, time.monotonic(), method="gRPC", path=path, client=context.peer())
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"{path} is not served here; this server's gRPC serves {SERVICE}'s "
                                f"{', '.join(self.served)}")
        return grpc.unary_unary_rpc_method_handler(unserved)
