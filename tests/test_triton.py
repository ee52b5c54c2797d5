"""`maria triton-repo` for real: the repository served by the `tritonserver` (2.51, Python backend) that the
nvidia-pytriton wheel ships, on 127.0.0.1, called with tritonclient (HTTP and gRPC) like `maria serve`. That wheel
needs numpy < 2, so it lives in its own environment, named by MARIA_TRITON_PYTHON (.ci/run builds one)."""

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.default_model import DEFAULT_MODEL
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.requests import FillRequest
from maria_onnx.serve.triton import write_repository
from maria_onnx.tools.bench_serve import stop
from tests.test_serve import call, server

TRITON_PYTHON = os.environ.get("MARIA_TRITON_PYTHON")
pytestmark = pytest.mark.skipif(
    not TRITON_PYTHON,
    reason="MARIA_TRITON_PYTHON names no Python environment with "
    "nvidia-pytriton 0.7.0, numpy<2, onnxruntime and tokenizers (.ci/run builds one)",
)
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

TEXTS = ["The [MASK] statement is used to [MASK] an exception.", "Use the [MASK] module to read [MASK:2] files."]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tritonserver(workdir: Path) -> tuple[list[str], dict]:
    """The command prefix and environment that run pytriton's tritonserver with the Python backend."""
    probe = (
        "import pathlib, sys, sysconfig, pytriton; print(pathlib.Path(pytriton.__file__).parent); "
        "print(sysconfig.get_config_var('LIBDIR')); print(f'{sys.version_info[0]}.{sys.version_info[1]}')"
    )
    package, libdir, version = subprocess.check_output([TRITON_PYTHON, "-c", probe], text=True).split()
    server = shutil.copytree(
        Path(package) / "tritonserver", workdir / "tritonserver", ignore=shutil.ignore_patterns("python_backend_stubs")
    )
    shutil.copy(
        Path(package) / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub",
        server / "backends" / "python",
    )
    environment = {
        **os.environ,
        # the backend stub takes its site-packages from the first python3 on PATH
        "PATH": f"{Path(TRITON_PYTHON).parent}{os.pathsep}{os.environ['PATH']}",
        # its libraries and, under a pyenv-built Python, libpython
        "LD_LIBRARY_PATH": os.pathsep.join([str(Path(package).parent / "nvidia_pytriton.libs"), libdir]),
    }
    return [str(server / "bin" / "tritonserver"), "--backend-directory", str(server / "backends")], environment


def test_triton_serves_the_repository_like_maria_serve(tmp_path):
    repository = tmp_path / "repo"
    write_repository(DEFAULT_MODEL, repository, kind="cpu", max_queue_delay_us=20_000, max_texts=4)
    assert (repository / "maria" / "1" / "maria_onnx" / "runtime" / "decode.py").is_file()
    assert (repository / "maria" / "1" / "maria_onnx" / "__init__.py").is_file()
    command, environment = tritonserver(tmp_path)
    port, grpc_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            *command,
            "--model-repository",
            str(repository),
            "--http-port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--allow-metrics",
            "false",
        ],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = None
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", concurrency=4)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if client.is_model_ready("maria"):
                    break
            except Exception:  # not listening yet
                pass
            time.sleep(0.25)
        assert process.poll() is None and client.is_model_ready("maria"), "tritonserver did not load the model"
        metadata = client.get_model_metadata("maria")
        assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}]
        reference = Infiller(DEFAULT_MODEL, device="cpu")

        def request(texts, **parameters):
            text = httpclient.InferInput("text", [len(texts), 1], "BYTES")
            text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_), binary_data=True)
            outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in ("text", "result")]
            return client.async_infer("maria", [text], outputs=outputs, parameters=parameters or None)

        result = request(TEXTS, temperature=0.8, seed=5, num_samples=2).get_result(timeout=60)
        want = reference.infill(TEXTS, Sampling(temperature=0.8, seed=5), num_samples=2)
        assert result.as_numpy("text").shape == (2, 2)
        assert [t.decode() for t in result.as_numpy("text").reshape(-1)] == [r.text for r in want]
        got = [json.loads(r) for r in result.as_numpy("result").reshape(-1)]
        for one, other in zip(got, [r.to_dict() for r in want]):  # ONNX Runtime there may be another build
            assert one["fill_logprobs"] == pytest.approx(other.pop("fill_logprobs"), abs=1e-4)
            assert {k: v for k, v in one.items() if k != "fill_logprobs"} == other

        text = httpclient.InferInput("text", [1, 1], "BYTES")  # no outputs named: all
        text.set_data_from_numpy(np.array([[TEXTS[0].encode()]], dtype=np.object_), binary_data=True)
        plain = client.infer("maria", [text], priority=1, timeout=60_000_000)
        assert plain.as_numpy("text")[0, 0].decode() == reference.infill(TEXTS[:1])[0].text

        pending = [request([f"Use the [MASK] module number {i}."]) for i in range(8)]  # dynamic batching
        filled = [p.get_result(timeout=60).as_numpy("text")[0, 0].decode() for p in pending]
        assert filled == [r.text for r in reference.infill([f"Use the [MASK] module number {i}." for i in range(8)])]

        over_grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")  # what maria serve --grpc-port
        try:  # answers (tests/test_grpc.py)
            text = grpcclient.InferInput("text", [len(TEXTS), 1], "BYTES")
            text.set_data_from_numpy(np.array([[t.encode()] for t in TEXTS], dtype=np.object_))
            answer = over_grpc.infer("maria", [text], parameters={"temperature": 0.8, "seed": 5, "num_samples": 2})
            assert [t.decode() for t in answer.as_numpy("text").reshape(-1)] == [r.text for r in want]
        finally:
            over_grpc.close()

        with pytest.raises(Exception, match="asks for 0 tokens"):
            request(["bad [MASK:0]"]).get_result(timeout=60)
        with pytest.raises(Exception, match="parameter 'rerank' must be true or false, got 'false'"):
            request(TEXTS, rerank="false").get_result(timeout=60)  # never read as true
        with pytest.raises(Exception, match="parameter 'num_samples' must be a 64-bit integer, got 2.5"):
            request(TEXTS, num_samples=2.5).get_result(timeout=60)  # never truncated to 2
        with pytest.raises(Exception, match="2 texts x 3 samples is over the limit of 4 per request"):
            request(TEXTS, num_samples=3, temperature=1.0).get_result(timeout=60)
        with pytest.raises(
            Exception,
            match=r"needs 8 decode rows \(texts x samples x span candidates\), over the "
            "limit of 4",
        ):
            request(["Use the [MASK:?] module."]).get_result(timeout=60)
        two = "Use the [MASK:1-2] module to [MASK:1-2] files."  # 2 x 2 combinations x 2 samples: over 4 rows
        searched = json.loads(
            request([two], num_samples=2, temperature=1.0, seed=2).get_result(timeout=60).as_numpy("result")[0, 0]
        )
        want = reference.infill_requests(
            [FillRequest([reference.prepare(two, most=1)], Sampling(temperature=1.0, seed=2), 2)]
        )[0][0]
        assert searched["text"] == want.text and "more decode rows than the request may use" in searched["note"]
        assert (
            request(TEXTS[:1]).get_result(timeout=60).as_numpy("text")[0, 0].decode()
            == reference.infill(TEXTS[:1])[0].text
        )  # and the model still serves
        generate_like_maria_serve(f"http://127.0.0.1:{port}")
    finally:
        if client is not None:
            client.close()
        stop(process)


GENERATE = [
    ("generate", {"text": TEXTS[0]}),
    ("generate", {"text": TEXTS, "parameters": {"temperature": 0.8, "seed": 5, "num_samples": 2}}),
    ("generate", {"text": [[t] for t in TEXTS], "temperature": 0.8, "seed": 5}),  # settings as fields
    ("generate_stream", {"text": TEXTS, "parameters": {"temperature": 0.8, "seed": 5, "num_samples": 2}}),
    ("generate", {"text": "no marker here"}),
]


def generate_like_maria_serve(triton_url: str) -> None:
    """Triton's generate extension on the repository's model, and `maria serve`'s, answer the same requests alike:
    the same object (log-probabilities to 1e-4: ONNX Runtime there may be another build), and a refused request
    a 4xx with the same line."""
    with server("--max-texts", "4") as (url, _):
        for route, payload in GENERATE:
            answers = []
            for base in (triton_url, url):
                status, headers, body = call(base, f"/v2/models/maria/{route}", payload)
                assert status == 200, (base, route, payload, body)
                if route == "generate_stream":
                    assert {k.lower(): v for k, v in headers.items()}[
                        "content-type"
                    ] == "text/event-stream; charset=utf-8"
                    assert body.startswith(b"data: ") and body.rstrip(b"\n").count(b"\n\n") == 0, body
                    body = body[len(b"data: ") :]
                answers.append(json.loads(body))
            triton, ours = answers
            assert {k: v for k, v in triton.items() if k != "result"} == {
                k: v for k, v in ours.items() if k != "result"
            }, payload
            results = [
                [json.loads(r) for r in ([a["result"]] if isinstance(a["result"], str) else a["result"])]
                for a in answers
            ]
            assert len(results[0]) == len(results[1])
            for one, other in zip(*results):
                assert one.pop("fill_logprobs") == pytest.approx(other.pop("fill_logprobs"), abs=1e-4)
                assert one == other
        for payload, line in (
            ({"text": "bad [MASK:0]"}, "'[MASK:0]' asks for 0 tokens"),
            ({"text": TEXTS[0], "id": "x"}, "unknown parameters ['id']"),
        ):
            for base in (triton_url, url):
                status, _, body = call(base, "/v2/models/maria/generate", payload)
                assert 400 <= status < 500 and line in json.loads(body)["error"], (base, payload, body)
