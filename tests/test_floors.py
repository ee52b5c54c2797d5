"""pyproject.toml's lowest versions, for real: in an environment holding exactly the floors of the runtime and the
serve and grpc extras (tools/floors.py; .ci/run builds it and names its python in MARIA_FLOORS_PYTHON), `maria
infill` and `maria serve` (HTTP and gRPC) give the fills this environment gives, and a gRPC stream left open ends
when the server stops. Each server is stopped by pid."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from maria_onnx.runtime.default_model import DEFAULT_MODEL
from maria_onnx.runtime.infiller import Infiller
from tests.test_serve import ROOT, TEXTS, call, oip, server

FLOORS_PYTHON = os.environ.get("MARIA_FLOORS_PYTHON")
pytestmark = pytest.mark.skipif(
    not FLOORS_PYTHON,
    reason="MARIA_FLOORS_PYTHON names no environment with "
    "pyproject.toml's lowest versions (.ci/run builds one with tools/floors.py)",
)


@pytest.fixture(scope="module")
def reference():
    return [r.to_dict() for r in Infiller(DEFAULT_MODEL, device="cpu").infill(TEXTS)]


def same_fills(got: list[dict], want: list[dict]) -> bool:
    """The same texts and fills, log-probabilities within 1e-4 (another onnxruntime rounds differently)."""
    return [(g["text"], g["fills"]) for g in got] == [(w["text"], w["fills"]) for w in want] and all(
        np.allclose(g["fill_logprobs"], w["fill_logprobs"], atol=1e-4) for g, w in zip(got, want)
    )


def test_the_environment_holds_the_floors():
    from packaging.version import Version

    from maria_onnx.tools.floors import floors

    wanted = floors()
    script = "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    run = subprocess.run([FLOORS_PYTHON, "-c", script, *wanted], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    installed = json.loads(run.stdout)
    assert {name: Version(v) for name, v in installed.items()} == {name: Version(v) for name, v in wanted.items()}


def infill_at_the_floors(*args: str) -> list[dict]:
    """`maria infill --json ARGS` run by the floors' python: each result's object."""
    command = [FLOORS_PYTHON, str(ROOT / "cli.py"), "infill", "--device", "cpu", "--json", *args]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_infill_at_the_floors(reference):
    assert same_fills(infill_at_the_floors(*TEXTS), reference)


def test_serve_http_and_grpc_at_the_floors(reference):
    pytest.importorskip("grpc", reason="the grpc extra (grpcio, protobuf) is not installed")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    from maria_onnx.serve.protocol import bytes_elements
    from tests.test_grpc import bare_infer, grpc_address, grpcclient, pb, stream, text_input

    with server("--grpc-port", "0", "--grace", "600", python=FLOORS_PYTHON) as (url, process):
        status, _, body = call(url, "/v2/models/maria/infer", oip(TEXTS))
        assert status == 200, body
        results = {o["name"]: o["data"] for o in json.loads(body)["outputs"]}["result"]
        assert same_fills([json.loads(r) for r in results], reference)
        for route in ("generate", "generate_stream"):  # Triton's generate extension
            status, _, body = call(url, f"/v2/models/maria/{route}", {"text": TEXTS})
            assert status == 200, body
            answer = json.loads(body.removeprefix(b"data: "))
            assert same_fills([json.loads(r) for r in answer["result"]], reference)

        request = pb.ModelInferRequest(model_name="maria")
        request.inputs.add(
            name="text",
            datatype="BYTES",
            shape=[len(TEXTS), 1],
            contents=pb.InferTensorContents(bytes_contents=[t.encode() for t in TEXTS]),
        )
        response = bare_infer(grpc_address(process), request)
        result = response.raw_output_contents[[o.name for o in response.outputs].index("result")]
        assert same_fills([json.loads(r) for r in bytes_elements(result)], reference)

        client = grpcclient.InferenceServerClient(grpc_address(process))  # the same on a stream
        try:
            ((streamed, error),) = stream(client, [{"inputs": [text_input(TEXTS)]}])
        finally:
            client.close()
        assert error is None and same_fills([json.loads(r) for r in streamed.as_numpy("result").reshape(-1)], reference)

        client, answers = grpcclient.InferenceServerClient(grpc_address(process)), []  # a stream left open
        try:
            client.start_stream(lambda result, error: answers.append(error))
            client.async_stream_infer("maria", [text_input(TEXTS[:1])])
            deadline = time.monotonic() + 60
            while not answers and time.monotonic() < deadline:
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0  # ended by the server, long before --grace
            while len(answers) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            client.stop_stream()
            client.close()
        assert len(answers) == 2 and answers[0] is None and answers[1].status() == "StatusCode.UNAVAILABLE", answers


def test_a_fused_attention_bundle_fills_alike_at_the_floors(checkpoints, tmp_path):
    """ONNX Runtime 1.20 misread an attention bias broadcast over the heads (wrong fills at batch > 1, no error):
    the fused step graph feeds it a bias per head, so a batch of texts fills there as here."""
    from maria_onnx.export.bundle import export_bundle
    from maria_onnx.tools.tiny import corpus

    export_bundle(checkpoints["olmo"], tmp_path / "fused", attention="fused", concat_decoder=False)
    texts = [" ".join(w[:2] + ["[MASK]"] + w[3:-2] + ["[MASK:2]"]) for w in (t.split() for t in corpus(6, seed=9))]
    want = [r.to_dict() for r in Infiller(tmp_path / "fused", device="cpu").infill(texts, batch_size=6)]
    assert same_fills(infill_at_the_floors("--model", str(tmp_path / "fused"), "--batch-size", "6", *texts), want)
