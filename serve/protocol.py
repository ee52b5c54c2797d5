"""The Open Inference Protocol (KServe v2) for MARIA: request parsing and response building, JSON and binary.

An infer request carries the tensor `text` (BYTES [n, 1] as Triton's batching wants it, or [n]) and optional
sampling settings, as request `parameters` or as tensors (temperature FP32, top_k INT32, top_p FP32, seed INT64,
num_samples INT32). The response carries `text` (BYTES [n, num_samples], the filled texts) and `result` (BYTES
[n, num_samples], the JSON object `maria infill --json` prints). A Triton model repository written by
`maria triton-repo` declares the same tensors.

Binary tensor data extension: the body is a JSON header of `Inference-Header-Content-Length` bytes, then the
raw tensors in order; a BYTES element is a 4-byte little-endian length followed by its bytes.
"""

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from maria_onnx.runtime.readers import RefusedJson, loads_json
from maria_onnx.runtime.text import quoted

INPUTS = {
    "text": "BYTES",
    "temperature": "FP32",
    "top_k": "INT32",
    "top_p": "FP32",
    "seed": "INT64",
    "num_samples": "INT32",
}
OUTPUTS = {"text": "BYTES", "result": "BYTES"}
VERSION = "1"  # the one model version a server serves
# Triton's own request parameters, which tritonclient sends: binary_data_output (all outputs binary), priority
# (taken and ignored: one queue), timeout (microseconds: the request's deadline where shorter than the server's)
PROTOCOL_PARAMETERS = ("binary_data_output", "priority", "timeout", "sequence_id", "sequence_start", "sequence_end")
SEQUENCE_PARAMETERS = PROTOCOL_PARAMETERS[3:]
NUMERIC = {
    "FP32": "<f4",
    "FP64": "<f8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
}


MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # safe in a URL path and in config.pbtxt


def check_model_name(name: str) -> str:
    """The name a model is served under, or ValueError where a URL or Triton's config.pbtxt could not carry it."""
    if not MODEL_NAME.fullmatch(name or ""):
        raise ValueError(
            f"--model-name takes letters, digits, '_', '-' and '.' (not first), got {name!r}; it names "
            "the model in URLs and in Triton's config.pbtxt"
        )
    return name


class BadRequest(ValueError):
    """A request the protocol cannot read (HTTP 400)."""


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    texts: list[str]
    settings: dict  # the sampling settings given, as read_settings (runtime/requests.py) takes them
    binary_outputs: set  # output names asked for as binary data
    outputs: tuple = tuple(OUTPUTS)  # the outputs asked for (all where the request names none)
    timeout_s: float | None = None  # the request's own deadline, where it gave one


def metadata(model_name: str, platform: str = "maria_onnx") -> dict:
    """Model metadata: the tensors' names, datatypes and shapes (-1: any length)."""
    return {
        "name": model_name,
        "versions": [VERSION],
        "platform": platform,
        "inputs": [
            {"name": name, "datatype": kind, "shape": [-1, 1] if name == "text" else [1]}
            for name, kind in INPUTS.items()
        ],
        "outputs": [{"name": name, "datatype": kind, "shape": [-1, -1]} for name, kind in OUTPUTS.items()],
    }


def model_config(model_name: str, max_batch_size: int, platform: str = "maria_onnx") -> dict:
    """The model configuration in Triton's JSON form (its model-configuration extension, what tritonclient's
    get_model_config reads): the same tensors as the metadata, the batch dimension left out of dims as Triton
    does for a model with max_batch_size > 0."""
    triton_types = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64"}
    return {
        "name": model_name,
        "platform": platform,
        "backend": platform,
        "max_batch_size": max_batch_size,
        "input": [
            {"name": name, "data_type": triton_types[kind], "dims": [1], "optional": name != "text"}
            for name, kind in INPUTS.items()
        ],
        "output": [{"name": name, "data_type": triton_types[kind], "dims": [-1]} for name, kind in OUTPUTS.items()],
    }


def bytes_elements(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor's raw data (the inverse of bytes_tensor); BadRequest where it is cut short."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest("a BYTES tensor's binary data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + length > len(raw):
            raise BadRequest("a BYTES tensor's binary data is shorter than its element lengths say")
        elements.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return elements


def _decode_text(element: str | bytes) -> str:
    if isinstance(element, str):
        return element
    try:
        return element.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRequest(f"a text is not valid UTF-8 (byte {error.start})") from None


def parameters(part: dict, what: str) -> dict:
    """The 'parameters' object of a request, an input or an output ({} where there is none)."""
    found = part.get("parameters")
    if found is None:
        return {}
    if not isinstance(found, dict):
        raise BadRequest(f"'parameters' of {what} must be a JSON object, got {type(found).__name__}")
    return found


def _element_count(spec: dict) -> int:
    """The number of elements an input's shape says it holds."""
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest(
            f"input {quoted(spec.get('name'))} needs a 'shape', a list of non-negative integers "
            f"([n] or [n, 1] for n texts, [1] for a setting), got {quoted(shape)}"
        )
    return math.prod(shape)


def _tensor_values(spec: dict, binary: bytes | None, offset: int) -> tuple[list, int]:
    """The flat values of one input tensor, and the offset of the next tensor's binary data."""
    kind, name = str(spec.get("datatype")), str(spec.get("name"))
    size = parameters(spec, f"input '{name}'").get("binary_data_size")
    if size is not None:
        if binary is None or type(size) is not int or size < 0 or offset + size > len(binary):
            raise BadRequest(f"input '{name}' says binary_data_size {size}, but the binary data is shorter")
        raw, offset = binary[offset : offset + size], offset + size
        if kind == "BYTES":
            return bytes_elements(raw), offset
        if kind not in NUMERIC:
            raise BadRequest(f"input '{name}' has datatype {quoted(kind)}; expected {INPUTS.get(name, 'a number')}")
        width = np.dtype(NUMERIC[kind]).itemsize
        if size % width:
            raise BadRequest(
                f"input '{name}' has {size} bytes of binary data, not a whole number of {kind} values "
                f"({width} bytes each)"
            )
        return np.frombuffer(raw, dtype=NUMERIC[kind]).tolist(), offset
    data = spec.get("data")
    if not isinstance(data, list):
        raise BadRequest(f"input '{name}' has neither 'data' nor binary data")
    values = list(np.asarray(data, dtype=object).reshape(-1)) if data and isinstance(data[0], list) else data
    if kind in NUMERIC:
        _check_range(name, kind, values)
    return values, offset


def _check_range(name: str, kind: str, values: list) -> None:
    """JSON numbers must fit the input's datatype, as its binary data would (INT32 3000000000 or FP32 1e39 do not);
    other values are left to the settings' own checks."""
    integer = kind[0] in "IU"
    limits = np.iinfo(NUMERIC[kind]) if integer else np.finfo(NUMERIC[kind])
    low, high = (int if integer else float)(limits.min), (int if integer else float)(limits.max)
    for value in values:
        number = isinstance(value, int) or isinstance(value, float) and math.isfinite(value)  # ints are exact
        if number and not isinstance(value, bool) and not low <= value <= high:
            raise BadRequest(
                f"input '{name}' is {kind} but holds {quoted(value)}, outside {kind}'s range {low} to "
                f"{high}; send a value in range or declare a wider datatype"
            )


def parse_infer(body: bytes, header_length: int | None) -> InferRequest:
    """Reads an infer request (JSON, or JSON header + binary data); raises BadRequest naming what is wrong."""
    if header_length is not None and not 0 <= header_length <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes")
    head, binary = (body, None) if header_length is None else (body[:header_length], body[header_length:])
    return read_infer(request_json(head), binary)


def text_list(texts: object) -> list:
    """The texts of a JSON request's "text" field: a string is one text, a list holds them (each checked later);
    BadRequest for anything else."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, list):
        raise BadRequest(f'"text" must be a string or a list of strings, got {type(texts).__name__}')
    return texts


def request_json(body: bytes) -> Any:
    """A request body's JSON value (the infer request's header, or /v1/infill's object); BadRequest where it is not
    JSON, not UTF-8, gives a key twice or nests too deeply."""
    try:
        return loads_json(body)
    except RefusedJson as error:
        raise BadRequest(f"the request {error}") from None
    except ValueError as error:  # and UnicodeDecodeError, one of them
        raise BadRequest(f"the request is not valid JSON ({error})") from None


def read_infer(request: object, binary: bytes | None) -> InferRequest:
    """Reads an infer request in its JSON form, with the binary data its inputs' binary_data_size point into
    (the gRPC form reaches here too, serve/grpc_service.py); raises BadRequest naming what is wrong."""
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest('the request must be a JSON object with an "inputs" list')
    if not isinstance(request.get("id", ""), str):
        raise BadRequest(
            f"the request's 'id' must be a string, got {type(request['id']).__name__}; send it as a JSON string"
        )
    given = parameters(request, "the request")
    if any(given.get(name) for name in SEQUENCE_PARAMETERS):
        raise BadRequest(f"this model is not a sequence model; leave out {', '.join(SEQUENCE_PARAMETERS)}")
    timeout = given.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout < 0):
        raise BadRequest(f"parameter 'timeout' is in microseconds, a non-negative integer; got {quoted(timeout)}")
    if timeout is not None and timeout >= 2**63:
        raise BadRequest(f"parameter 'timeout' is in microseconds, at most 2^63 - 1; got {quoted(timeout)}")
    settings = {name: value for name, value in given.items() if name not in PROTOCOL_PARAMETERS}
    texts, offset, seen = None, 0, set()
    for spec in request["inputs"]:
        if not isinstance(spec, dict) or spec.get("name") not in INPUTS:
            raise BadRequest(
                f"unknown input {quoted(spec.get('name') if isinstance(spec, dict) else spec)}; "
                f"inputs are {', '.join(INPUTS)}"
            )
        name, kind = spec["name"], spec.get("datatype")
        if name in seen:
            raise BadRequest(f"input '{name}' is given twice; send each input once")
        if name in settings:
            raise BadRequest(f"'{name}' is given both as a request parameter and as an input; give it once")
        seen.add(name)
        if (name == "text") != (kind == "BYTES") or (name != "text" and kind not in NUMERIC):
            raise BadRequest(f"input '{name}' has datatype {quoted(kind)}; expected {INPUTS[name]}")
        count = _element_count(spec)
        values, offset = _tensor_values(spec, binary, offset)
        if len(values) != count:
            raise BadRequest(
                f"input '{name}' has shape {quoted(spec['shape'])} ({count} elements) but holds "
                f"{len(values)}; make the shape match the data"
            )
        if name == "text":
            texts = [_decode_text(v) if isinstance(v, (bytes, str)) else _not_text(v) for v in values]
        elif len(values) != 1:
            raise BadRequest(f"input '{name}' must hold one value, got {len(values)}")
        else:
            settings[name] = values[0]
    if texts is None:
        raise BadRequest("the request has no 'text' input (BYTES, one element per text)")
    if binary is not None and offset != len(binary):
        raise BadRequest(
            f"the body holds {len(binary) - offset} bytes after the inputs' binary data; each input's "
            "binary_data_size must cover its bytes"
        )
    asked = request.get("outputs") or []
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise BadRequest(f"'outputs' must be a list of {{\"name\": ...}} objects; outputs are {', '.join(OUTPUTS)}")
    unknown = [o.get("name") for o in asked if o.get("name") not in OUTPUTS]
    if unknown:
        raise BadRequest(f"no output {quoted(unknown[0], json.dumps)}; this model's outputs are {', '.join(OUTPUTS)}")
    binary_outputs = {
        o["name"]
        for o in asked
        if _flag(parameters(o, f"output '{o['name']}'"), "binary_data", f"output '{o['name']}'")
    }
    if _flag(given, "binary_data_output", "the request"):
        binary_outputs |= set(OUTPUTS)
    outputs = tuple(dict.fromkeys(o["name"] for o in asked)) or tuple(OUTPUTS)
    return InferRequest(
        id=request.get("id"),
        texts=texts,
        settings=settings,
        binary_outputs=binary_outputs,
        outputs=outputs,
        timeout_s=None if timeout is None else timeout / 1e6,
    )


def _flag(given: dict, name: str, what: str) -> bool:
    """A true/false parameter (absent: false); a string such as "no" would otherwise count as true."""
    value = given.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter '{name}' of {what} must be true or false, got {quoted(value, json.dumps)}")
    return value


def _not_text(value: object) -> NoReturn:
    raise BadRequest(f"the 'text' input holds {type(value).__name__} elements; send strings")


def output_values(results: list, names: Sequence[str] = tuple(OUTPUTS)) -> list[tuple[str, list[str]]]:
    """(name, values) of each output named: the filled texts, or each result's JSON object."""
    return [
        (
            name,
            [r.text for r in results]
            if name == "text"
            else [json.dumps(r.to_dict(), ensure_ascii=False) for r in results],
        )
        for name in names
    ]


def output_tensors(request: InferRequest, results: list) -> list[tuple[str, list[int], list[str]]]:
    """(name, shape, values) of each output asked for (all where none were named), [texts, samples]."""
    shape = [len(request.texts), len(results) // len(request.texts)]
    return [(name, shape, values) for name, values in output_values(results, request.outputs)]


def bytes_tensor(elements: list[str]) -> bytes:
    """A BYTES tensor's raw data: each element a 4-byte little-endian length, then its UTF-8 bytes."""
    return b"".join(struct.pack("<I", len(e.encode("utf-8"))) + e.encode("utf-8") for e in elements)


def infer_response(model_name: str, request: InferRequest, results: list) -> tuple[bytes, dict]:
    """The response body and extra headers: the outputs asked for, as JSON data or as binary data where the client
    asked."""
    outputs, blobs = [], []
    for name, shape, values in output_tensors(request, results):
        output: dict[str, object] = {"name": name, "datatype": OUTPUTS[name], "shape": shape}
        if name in request.binary_outputs:
            blob = bytes_tensor(values)
            output["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            output["data"] = values
        outputs.append(output)
    head = {"model_name": model_name, "model_version": VERSION, "outputs": outputs}
    if request.id is not None:
        head["id"] = request.id
    head_bytes = json.dumps(head, ensure_ascii=False).encode("utf-8")
    if not blobs:
        return head_bytes, {"content-type": "application/json"}
    return head_bytes + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(head_bytes)),
    }
