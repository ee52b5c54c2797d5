"""Triton's generate extension (HTTP only), as Triton serves it for the model of `maria triton-repo`:

    POST /v2/models/{name}/generate          {"text": "The [MASK] ..." or [...], "parameters": {"seed": 1, ...}}
      -> {"model_name": ..., "model_version": "1", "text": ..., "result": ...}
    POST /v2/models/{name}/generate_stream   the same object as one server-sent event ("data: {...}")

Triton reads the body's keys that name a model input as that input (here `text`: a string, or a list of them) and
every other key, like those of the `parameters` object, as a request parameter (the sampling settings). Each output
becomes a key: its one element as a value, or its elements, [texts x samples] flattened, as a list. The model fills
a request at once, so the stream carries one event; /v1/infill/stream sends each fill as it is chosen.
"""

import json

from maria_onnx.runtime.text import quoted

from .protocol import VERSION, BadRequest, output_values, parameters, text_list

SSE_TYPE = "text/event-stream; charset=utf-8"


def read_generate(request: object) -> tuple[list, dict]:
    """(texts, settings) of a generate request's JSON value; BadRequest naming what is wrong."""
    if not isinstance(request, dict):
        raise BadRequest(f'send a JSON object {{"text": "...", "parameters": {{...}}}}, got {type(request).__name__}')
    if "text" not in request:
        raise BadRequest(
            f'the request has no "text" field (it has {quoted(sorted(request))}); this model\'s input is '
            '"text": send {"text": "A [MASK] ...", "parameters": {...}}'
        )
    settings = dict(parameters(request, "the request"))
    for key, value in request.items():
        if key in ("text", "parameters"):
            continue
        if key in settings:
            raise BadRequest(f"'{key}' is given both as a field and in 'parameters'; give it once")
        settings[key] = value
    texts = request["text"]
    if isinstance(texts, list) and texts and all(isinstance(row, list) for row in texts):
        texts = [text for row in texts for text in row]  # [n, 1], as Triton's batched input is shaped
    return text_list(texts), settings


def generate_response(model_name: str, results: list) -> dict:
    """The response object: each output's one value, or its values as a list (texts x samples, text-major)."""
    response: dict[str, object] = {"model_name": model_name, "model_version": VERSION}
    for name, values in output_values(results):
        response[name] = values[0] if len(values) == 1 else values
    return response


def event(payload: dict) -> str:
    """One server-sent event carrying `payload`."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
