"""A Triton Inference Server Python-backend model that fills masked text with a MARIA bundle.

`maria triton-repo` copies this file as `<repo>/<name>/1/model.py`, beside a copy of the package root and its
runtime (`maria_onnx/`) and the bundle (`bundle/`). ONNX Runtime runs inside the backend, so the decode loop keeps
its KV cache on the device between steps. With dynamic batching Triton hands several requests to one `execute` call;
they are filled in one decode batch, each with its own seed (request parameters: temperature, top_k, top_p, seed,
num_samples). A request over `max_texts` decode rows (texts x samples x span candidates; a parameter of
config.pbtxt) is refused.

Tensors, as `maria serve` declares them: input `text` BYTES [batch, 1]; outputs `text` and `result` (the JSON of
`maria infill --json`) BYTES [batch, num_samples].
"""

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # maria_onnx (its root and runtime) copied beside this file

from maria_onnx.runtime.cpus import shared_threads  # noqa: E402
from maria_onnx.runtime.infiller import FillRequest, Infiller  # noqa: E402
from maria_onnx.runtime.requests import bounded_request, read_settings  # noqa: E402


def instance_threads(config: dict, kind: str | None) -> int | None:
    """The `threads` parameter where it is a number. auto: with several CPU instances (each a process of its own),
    each gets an equal share of the CPUs Triton may use, so N instances do not each start pools of every core; one
    CPU instance, and GPU instances (whose work is on the GPU), get the runtime's default (runtime/cpus.py)."""
    threads = config.get("parameters", {}).get("threads", {}).get("string_value", "auto")
    if threads != "auto":
        return int(threads)
    if kind != "CPU":
        return None
    instances = sum(
        int(group.get("count", 1)) for group in config.get("instance_group", []) if group.get("kind") == "KIND_CPU"
    )
    return shared_threads(instances) if instances > 1 else None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        device = parameters.get("device", {}).get("string_value", "auto")
        kind = args.get("model_instance_kind")
        if kind == "CPU":
            device = "cpu"
        elif kind == "GPU" and device == "cuda":  # Triton places a group of instances on every visible GPU
            device = f"cuda:{args['model_instance_device_id']}"
        self.max_texts = int(parameters.get("max_texts", {}).get("string_value", "64"))
        speculate = int(parameters.get("speculate", {}).get("string_value", "0"))
        self.infiller = Infiller(
            HERE / "bundle", device=device, threads=instance_threads(config, kind), speculate=speculate
        )

    def read(self, request: Any) -> FillRequest:  # a pb_utils.InferenceRequest
        texts = [
            t.decode("utf-8") if isinstance(t, bytes) else str(t)
            for t in pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
        ]
        sampling, num_samples, rerank = read_settings(json.loads(request.parameters() or "{}"))
        return bounded_request(self.prepare, texts, sampling, num_samples, rerank, self.max_texts)

    def prepare(self, texts: list, rerank: bool, most: int) -> list:
        return [self.infiller.prepare(text, rerank, most) for text in texts]

    def execute(self, requests: list) -> list:
        responses, readable = [None] * len(requests), []
        for number, request in enumerate(requests):
            try:
                readable.append((number, self.read(request)))
            except (ValueError, UnicodeDecodeError) as error:
                responses[number] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
                )  # HTTP 400
        results = self.infiller.infill_requests([fill for _, fill in readable]) if readable else []
        for (number, fill), filled in zip(readable, results):
            shape = (len(fill.texts), fill.num_samples)  # [batch, num_samples]
            texts = np.array([r.text.encode() for r in filled], dtype=np.object_).reshape(shape)
            objects = np.array(
                [json.dumps(r.to_dict(), ensure_ascii=False).encode() for r in filled], dtype=np.object_
            ).reshape(shape)
            responses[number] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("text", texts), pb_utils.Tensor("result", objects)]
            )
        return responses
