"""`maria serve --grpc-port` for real: the Open Inference Protocol over gRPC on 127.0.0.1 (ephemeral ports), driven
by tritonclient.grpc and by a bare gRPC channel with typed contents. Every request loop is bounded; each test stops
the server it started, by its process id."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

grpc = pytest.importorskip("grpc", reason="the grpc extra (grpcio, protobuf) is not installed")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

from tritonclient.grpc import model_config_pb2, service_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from maria_onnx.runtime.choose import Sampling  # noqa: E402
from maria_onnx.runtime.default_model import DEFAULT_MODEL  # noqa: E402
from maria_onnx.runtime.infiller import Infiller  # noqa: E402
from maria_onnx.serve import oip_pb2 as pb  # noqa: E402
from maria_onnx.serve.protocol import bytes_elements  # noqa: E402
from tests.test_serve import ROOT, TEXTS, call, engine_steps, server  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def grpc_address(process) -> str:
    return re.search(r"gRPC on (127\.0\.0\.1:\d+)", process.announced).group(1)


@pytest.fixture(scope="module")
def running():
    with server("--grpc-port", "0", "--max-batch-size", "16", "--max-texts", "8", "--max-body-bytes", "100000") as (
        url,
        process,
    ):
        yield url, grpc_address(process)


@pytest.fixture(scope="module")
def reference():
    return Infiller(DEFAULT_MODEL, device="cpu")


def text_input(texts: list[str]):
    text = grpcclient.InferInput("text", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=np.object_))
    return text


def bare_infer(address: str, request: pb.ModelInferRequest, timeout: float = 60) -> pb.ModelInferResponse:
    """One ModelInfer through a plain channel (what a KServe client sends: typed contents where it likes)."""
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary(
            METHOD,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        return infer(request, timeout=timeout)


def test_the_messages_are_the_protocols():
    """Every field of every message here has the number, type and cardinality of tritonclient's copy, and every
    enum value its number."""

    def fields(descriptor):
        return {
            f.name: (f.number, f.type, f.label, (f.message_type or f.enum_type or f).name) for f in descriptor.fields
        }

    def compare(ours, theirs, path):
        assert fields(ours).items() <= fields(theirs).items(), path
        for nested in ours.nested_types:
            compare(nested, theirs.nested_types_by_name[nested.name], f"{path}.{nested.name}")

    theirs = {**service_pb2.DESCRIPTOR.message_types_by_name, **model_config_pb2.DESCRIPTOR.message_types_by_name}
    assert len(pb.DESCRIPTOR.message_types_by_name) == 26
    for name, descriptor in pb.DESCRIPTOR.message_types_by_name.items():
        compare(descriptor, theirs[name], name)
    data_types = model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"].values_by_name
    assert {v.name: v.number for v in pb.DESCRIPTOR.enum_types_by_name["DataType"].values} == {
        name: value.number for name, value in data_types.items()
    }


RUNTIME_CHECK = """
import google.protobuf
from google.protobuf.json_format import MessageToDict, ParseDict
from maria_onnx.serve import oip_pb2 as pb
request = pb.ModelInferRequest(model_name="maria", raw_input_contents=[b"a [MASK] b"])
text = request.inputs.add(name="text", datatype="BYTES", shape=[1, 1])
text.parameters["binary_data_size"].int64_param = 10
request.parameters["temperature"].double_param = 0.5
assert pb.ModelInferRequest.FromString(request.SerializeToString()) == request
config = ParseDict({"config": {"name": "maria", "input": [{"name": "text", "data_type": "TYPE_STRING"}]}},
                   pb.ModelConfigResponse())
assert MessageToDict(config)["config"]["input"][0]["dataType"] == "TYPE_STRING"
print(google.protobuf.__version__)
"""


def test_the_messages_load_under_each_protobuf_runtime():
    """serve/oip_pb2.py (protoc 4.25's output, which carries no runtime version check) builds, serializes and
    parses its messages under every protobuf that .ci/run installs beside the suite's own (the grpc extra's
    range: 3.20.3 to 7.36), each in a Python that sees only that protobuf and this repository."""
    targets = [t for t in os.environ.get("MARIA_PROTOBUF_TARGETS", "").split(os.pathsep) if t]
    if not targets:
        pytest.skip("MARIA_PROTOBUF_TARGETS names no folders of other protobuf versions (.ci/run installs them)")
    for target in targets:
        installed = [
            info.name.removeprefix("protobuf-").removesuffix(".dist-info")
            for info in Path(target).glob("protobuf-*.dist-info")
        ]
        run = subprocess.run(
            [sys.executable, "-S", "-c", RUNTIME_CHECK],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([target, str(ROOT)])},
        )
        assert run.returncode == 0, f"{target}: {run.stderr.strip().splitlines()[-1:]}"
        assert [run.stdout.strip()] == installed


def test_tritonclient_grpc_health_metadata_and_infer(running, reference):
    url, address = running
    client = grpcclient.InferenceServerClient(address)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("maria")
        assert client.is_model_ready("maria", model_version="1")
        assert client.get_server_metadata(as_json=True)["name"] == "maria-onnx"
        meta = client.get_model_metadata("maria", as_json=True)
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]][:2] == [("text", "BYTES"), ("temperature", "FP32")]
        assert [t["name"] for t in meta["outputs"]] == ["text", "result"]
        config = client.get_model_config("maria", as_json=True)["config"]  # Triton's configuration form
        assert (config["name"], config["platform"], config["max_batch_size"]) == ("maria", "maria_onnx", 16)
        assert [i["name"] for i in config["input"] if not i.get("optional")] == ["text"]
        assert [(i["name"], i["data_type"]) for i in config["input"]][:2] == [
            ("text", "TYPE_STRING"),
            ("temperature", "TYPE_FP32"),
        ]
        assert [(o["name"], o["dims"]) for o in config["output"]] == [("text", ["-1"]), ("result", ["-1"])]
        before = client.get_inference_statistics("maria", as_json=True)["model_stats"][0]
        seed = grpcclient.InferInput("seed", [1], "INT64")
        seed.set_data_from_numpy(np.array([5], dtype=np.int64))
        temperature = grpcclient.InferInput("temperature", [1], "FP32")
        temperature.set_data_from_numpy(np.array([0.8], dtype=np.float32))
        want = reference.infill(TEXTS, Sampling(temperature=0.8, seed=5))
        result = client.infer("maria", [text_input(TEXTS), seed, temperature], request_id="r1")
        assert result.get_response().id == "r1" and result.as_numpy("text").shape == (2, 1)
        assert [t.decode() for t in result.as_numpy("text").reshape(-1)] == [r.text for r in want]
        assert [json.loads(r) for r in result.as_numpy("result").reshape(-1)] == [r.to_dict() for r in want]
        sampled = client.infer(
            "maria",
            [text_input(TEXTS)],
            parameters={"temperature": 1.0, "seed": 11, "num_samples": 2},
            outputs=[grpcclient.InferRequestedOutput("text")],
        )
        assert [o.name for o in sampled.get_response().outputs] == ["text"]  # the output asked for, alone
        want = reference.infill(TEXTS, Sampling(temperature=1.0, seed=11), num_samples=2)
        assert sampled.as_numpy("text").shape == (2, 2)
        assert [t.decode() for t in sampled.as_numpy("text").reshape(-1)] == [r.text for r in want]
        after = client.get_inference_statistics("maria", as_json=True)["model_stats"][0]
        assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 4  # 2 calls, 2 texts
        assert (
            int(after["inference_stats"]["success"]["count"])
            - int(before.get("inference_stats", {}).get("success", {}).get("count", 0))
            == 2
        )
        http = json.loads(call(url, "/v2/models/maria/stats")[2])["model_stats"][0]
        assert int(after["inference_count"]) == http["inference_count"]  # one set of statistics
        assert client.get_inference_statistics(as_json=True)["model_stats"][0]["name"] == "maria"
    finally:
        client.close()
    metrics = call(url, "/metrics")[2].decode()
    assert re.search(rf'^maria_requests_total\{{route="{METHOD}",status="200"\}} [1-9]', metrics, re.M)


def test_concurrent_async_infer_forms_batches_and_keeps_each_result(running, reference):
    url, address = running
    texts = [f"Use the [MASK] module to [MASK:2] file number {i}." for i in range(16)]
    alone = [reference.infill([t], Sampling(temperature=1.0, seed=3))[0].text for t in texts]
    before = engine_steps(url), call(url, "/metrics")[2].decode()
    client, answers = grpcclient.InferenceServerClient(address), {}
    try:
        for number, text in enumerate(texts):
            client.async_infer(
                "maria",
                [text_input([text])],
                parameters={"temperature": 1.0, "seed": 3},
                callback=lambda result, error, number=number: answers.update({number: (result, error)}),
            )
        deadline = time.monotonic() + 60
        while len(answers) < len(texts) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.close()
    assert sorted(answers) == list(range(16)) and all(error is None for _, error in answers.values())
    assert [answers[n][0].as_numpy("text")[0, 0].decode() for n in range(16)] == alone
    rows = float(re.search(r"^maria_batch_size_sum (\S+)", call(url, "/metrics")[2].decode(), re.M).group(1))
    rows_before = float(re.search(r"^maria_batch_size_sum (\S+)", before[1], re.M).group(1))
    assert (rows - rows_before) / (engine_steps(url) - before[0]) > 1  # steps held several requests' texts


def test_typed_contents_and_parameters_from_a_bare_channel(running, reference):
    _, address = running
    request = pb.ModelInferRequest(model_name="maria", id="typed")
    request.inputs.add(
        name="text",
        datatype="BYTES",
        shape=[2],
        contents=pb.InferTensorContents(bytes_contents=[t.encode() for t in TEXTS]),
    )
    request.inputs.add(name="top_k", datatype="INT32", shape=[1], contents=pb.InferTensorContents(int_contents=[5]))
    request.parameters["temperature"].double_param = 0.7
    request.parameters["seed"].int64_param = 2
    response = bare_infer(address, request)
    want = reference.infill(TEXTS, Sampling(temperature=0.7, top_k=5, seed=2))
    assert response.id == "typed" and [o.name for o in response.outputs] == ["text", "result"]
    assert list(response.outputs[0].shape) == [2, 1] and len(response.raw_output_contents) == 2
    assert [t.decode() for t in bytes_elements(response.raw_output_contents[0])] == [r.text for r in want]


def stream(client, requests: list[dict], headers: dict | None = None, seconds: float = 60) -> list:
    """Sends each request (async_stream_infer's arguments) on one tritonclient stream; the (result, error) of each
    answer, in the order they came, once all came or `seconds` passed. A stream the server ended (a wrong token)
    takes no more requests; its error is the callback's."""
    answers = []
    client.start_stream(lambda result, error: answers.append((result, error)), headers=headers)
    try:
        for request in requests:
            try:
                client.async_stream_infer("maria", **request)
            except InferenceServerException as error:
                assert "The stream is no longer in valid state" in str(error)
                break
        deadline = time.monotonic() + seconds
        while len(answers) < len(requests) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.stop_stream()
    return answers


def test_a_stream_answers_each_request_and_an_error_ends_no_stream(running, reference):
    """tritonclient's streaming API: every request on the stream gets its own answer (matched by id), equal to the
    reference's; a bad request gets its one line and the stream goes on; Triton's empty-final-response flag is
    taken and the one answer says it is the final one."""
    url, address = running
    texts = [f"Use the [MASK] module to [MASK:2] file number {i}." for i in range(6)]
    requests = [
        {"inputs": [text_input([t])], "request_id": f"r{i}", "parameters": {"temperature": 1.0, "seed": i}}
        for i, t in enumerate(texts)
    ]
    requests.insert(3, {"inputs": [text_input(["a [MASK:0] b"])], "request_id": "bad"})
    requests[0]["enable_empty_final_response"] = True
    client = grpcclient.InferenceServerClient(address)
    try:
        answers = stream(client, requests)
    finally:
        client.close()
    assert len(answers) == 7
    errors = [str(error) for result, error in answers if error is not None]
    assert errors == ["text 0: '[MASK:0]' asks for 0 tokens; ask for 1 to 2046 (the bundle's maximum length)"]
    filled = {result.get_response().id: result for result, error in answers if error is None}
    assert sorted(filled) == [f"r{i}" for i in range(6)]
    for i, text in enumerate(texts):
        want = reference.infill([text], Sampling(temperature=1.0, seed=i))[0]
        assert filled[f"r{i}"].as_numpy("text")[0, 0].decode() == want.text
        got = json.loads(filled[f"r{i}"].as_numpy("result")[0, 0])  # batched with others: same fills
        assert got["fills"] == want.fills and np.allclose(got["fill_logprobs"], want.fill_logprobs, atol=1e-4)
    assert [i for i, r in filled.items() if r.get_response().parameters["triton_final_response"].bool_param] == ["r0"]
    metrics = call(url, "/metrics")[2].decode()
    assert re.search(rf'^maria_requests_total\{{route="{STREAM}",status="200"\}} [6-9]', metrics, re.M)
    assert re.search(rf'^maria_requests_total\{{route="{STREAM}",status="422"\}} [1-9]', metrics, re.M)


def test_a_streams_errors_carry_their_request_id(running):
    """From a bare channel: an error's answer names its request's id (tritonclient hands on only the line), and
    bytes that are no request get the one-line error too, on the same stream as a good request."""
    _, address = running
    good = pb.ModelInferRequest(model_name="maria", id="good")
    wrong = pb.ModelInferRequest(model_name="nope", id="wrong")
    for request in (good, wrong):
        request.inputs.add(
            name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"a [MASK]"])
        )
    with grpc.insecure_channel(address) as channel:
        call_stream = channel.stream_stream(
            STREAM, request_serializer=bytes, response_deserializer=pb.ModelStreamInferResponse.FromString
        )
        answers = list(
            call_stream(iter([b"\xff\xff\xff", wrong.SerializeToString(), good.SerializeToString()]), timeout=60)
        )
    by_id = {a.infer_response.id: a for a in answers}
    assert sorted(by_id) == ["", "good", "wrong"]
    assert by_id[""].error_message == (
        "the message is not a valid ModelInferRequest; send the Open Inference Protocol's ModelStreamInfer request"
    )
    assert by_id["wrong"].error_message == "no model 'nope' here; this server serves 'maria'"
    assert by_id["good"].error_message == "" and [o.name for o in by_id["good"].infer_response.outputs] == [
        "text",
        "result",
    ]


def test_a_stream_holds_back_beyond_the_queue_instead_of_refusing():
    """A stream with more requests than --max-queue: the server reads it no faster than it answers, so every
    request is filled and none gets 'queue full' (sent one by one, the same burst fills the queue)."""
    with server("--grpc-port", "0", "--max-batch-size", "1", "--max-queue", "2") as (_, process):
        client = grpcclient.InferenceServerClient(grpc_address(process))
        try:
            answers = stream(
                client, [{"inputs": [text_input(["The [MASK:30] end."])], "request_id": str(i)} for i in range(8)]
            )
        finally:
            client.close()
        assert len(answers) == 8 and [str(e) for _, e in answers if e is not None] == []
        assert sorted(int(r.get_response().id) for r, _ in answers) == list(range(8))


def expect(code, message: str, call_it):
    with pytest.raises(grpc.RpcError) as caught:
        call_it()
    assert caught.value.code() == code and message in caught.value.details(), (
        caught.value.code(),
        caught.value.details(),
    )
    assert "\n" not in caught.value.details()


def test_each_bad_request_gets_its_code_and_one_line(running):
    _, address = running
    request = pb.ModelInferRequest(model_name="maria")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.extend([b"x", b"y"])
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents holds 2 entries for 1 inputs",
        lambda: bare_infer(address, request),
    )
    request = pb.ModelInferRequest(model_name="maria")
    request.inputs.add(
        name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"a [MASK]"])
    )
    request.inputs.add(name="seed", datatype="INT64", shape=[1], contents=pb.InferTensorContents(int64_contents=[1]))
    request.parameters["seed"].int64_param = 2
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "'seed' is given both as a request parameter and as an input",
        lambda: bare_infer(address, request),
    )
    cases = [
        ("nope", [b"a [MASK]"], "TEXT", grpc.StatusCode.NOT_FOUND, "no model 'nope' here; this server serves 'maria'"),
        ("maria", [b"a [MASK:0]"], "BYTES", grpc.StatusCode.INVALID_ARGUMENT, "text 0: '[MASK:0]' asks for 0 tokens"),
        ("maria", [b"a [MASK]"], "FP32", grpc.StatusCode.INVALID_ARGUMENT, "input 'text' has datatype 'FP32'"),
        ("maria", [b"\xff [MASK]"], "BYTES", grpc.StatusCode.INVALID_ARGUMENT, "a text is not valid UTF-8 (byte 0)"),
        ("maria", [b"a [MASK]"] * 9, "BYTES", grpc.StatusCode.INVALID_ARGUMENT, "over the limit of 8 per request"),
        ("maria", [b"a [MASK]" * 20_000], "BYTES", grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    ]
    for model, texts, datatype, code, message in cases:
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(
            name="text", datatype=datatype, shape=[len(texts)], contents=pb.InferTensorContents(bytes_contents=texts)
        )
        expect(code, message, lambda request=request: bare_infer(address, request))
    with grpc.insecure_channel(address) as channel:  # bytes that are no ModelInferRequest
        raw = channel.unary_unary(METHOD, request_serializer=bytes, response_deserializer=bytes)
        expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            "the message is not a valid ModelInferRequest; send the Open Inference Protocol's ModelInfer request",
            lambda: raw(b"\xff\xff\xff", timeout=60),
        )
    client = grpcclient.InferenceServerClient(address)
    try:
        with pytest.raises(
            Exception,
            match=r"UNIMPLEMENTED\] /inference.GRPCInferenceService/RepositoryIndex is not "
            r"served here; this server's gRPC serves .*ModelStatistics, ModelInfer",
        ):
            client.get_model_repository_index()
        with pytest.raises(Exception, match=r"NOT_FOUND\] no version '2' of model 'maria' here"):
            client.is_model_ready("maria", model_version="2")
    finally:
        client.close()


def test_the_bearer_token_guards_all_but_health():
    with server("--grpc-port", "0", "--api-key", "sesame") as (_, process):
        client = grpcclient.InferenceServerClient(grpc_address(process))
        try:
            assert client.is_server_live() and client.is_server_ready()
            with pytest.raises(Exception, match=r"UNAUTHENTICATED\] missing or wrong bearer token"):
                client.infer("maria", [text_input(TEXTS[:1])])
            result = client.infer("maria", [text_input(TEXTS[:1])], headers={"authorization": "Bearer sesame"})
            assert result.as_numpy("text")[0, 0].decode().startswith("The ")
            ((result, error),) = stream(client, [{"inputs": [text_input(TEXTS[:1])]}])
            assert result is None and "UNAUTHENTICATED] missing or wrong bearer token" in str(error)
            ((result, error),) = stream(
                client, [{"inputs": [text_input(TEXTS[:1])]}], headers={"authorization": "Bearer sesame"}
            )
            assert error is None and result.as_numpy("text")[0, 0].decode().startswith("The ")
        finally:
            client.close()


def test_a_deadline_ends_the_call_and_its_rows_leave_the_engine():
    with server("--grpc-port", "0", "--max-batch-size", "1") as (url, process):
        address, long_text = grpc_address(process), "[MASK:2000]"  # 2,000 steps if run to the end
        client = grpcclient.InferenceServerClient(address)
        try:
            with pytest.raises(Exception, match=r"DEADLINE_EXCEEDED\]"):
                client.infer("maria", [text_input([long_text])], client_timeout=0.5)  # the client's own
            with pytest.raises(Exception, match=r"DEADLINE_EXCEEDED\] no answer within the deadline of 0.3 s"):
                client.infer("maria", [text_input([long_text])], timeout=300_000)  # the request's, µs
        finally:
            client.close()
        steps, still = engine_steps(url), False
        for _ in range(30):  # the engine stops stepping once both have left: a step in
            time.sleep(1.0)  # flight ends, and no other follows
            still, steps = engine_steps(url) == steps, engine_steps(url)
            if still:
                break
        assert still and steps < 2000, steps


def test_a_cancelled_stream_has_its_rows_leave_the_engine():
    with server("--grpc-port", "0", "--max-batch-size", "1") as (url, process):
        client, answers = grpcclient.InferenceServerClient(grpc_address(process)), []
        try:
            client.start_stream(lambda result, error: answers.append((result, error)))
            client.async_stream_infer("maria", [text_input(["[MASK:2000]"])])  # 2,000 steps if run to the end
            deadline = time.monotonic() + 60
            while engine_steps(url) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            client.stop_stream(cancel_requests=True)
        finally:
            client.close()
        steps, still = engine_steps(url), False
        for _ in range(30):
            time.sleep(1.0)
            still, steps = engine_steps(url) == steps, engine_steps(url)
            if still:
                break
        assert still and steps < 2000 and all(result is None for result, _ in answers), steps
        metrics = call(url, "/metrics")[2].decode()
        assert re.search(rf'^maria_requests_total\{{route="{STREAM}",status="499"\}} 1', metrics, re.M)


def closed(url: str, seconds: float = 30) -> bool:
    """Whether the server stopped accepting HTTP connections (it does so first on SIGTERM) within `seconds`."""
    host, port = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_lets_grpc_calls_in_flight_finish_and_ends_streams_once_answered():
    """Two calls and a stream's request in flight when SIGTERM comes are answered; a request sent on the stream
    after it gets a one-line refusal; then the server ends the stream (UNAVAILABLE) and exits 0 while the client
    still holds the stream open, long before the grace period of 600 s. A stream whose client had closed its side
    ends as usual (OK) with its answer."""
    with (
        server("--grpc-port", "0", "--max-batch-size", "3", "--grace", "600") as (url, process),
        grpc.insecure_channel(grpc_address(process)) as channel,
    ):
        client, answers = grpcclient.InferenceServerClient(grpc_address(process)), []
        streaming = grpcclient.InferenceServerClient(grpc_address(process))
        sent = pb.ModelInferRequest(model_name="maria", id="sent")
        sent.inputs.add(
            name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[b"[MASK:1000]"])
        )
        try:
            for _ in range(2):
                client.async_infer(
                    "maria",
                    [text_input(["[MASK:300]"])],
                    callback=lambda result, error: answers.append((result, error)),
                )
            half_closed = channel.stream_stream(
                STREAM,
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelStreamInferResponse.FromString,
            )(iter([sent]), timeout=120)
            streaming.start_stream(lambda result, error: answers.append((result, error)))
            streaming.async_stream_infer("maria", [text_input(["[MASK:2000]"])], request_id="long")
            time.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            assert closed(url)
            time.sleep(0.2)
            streaming.async_stream_infer("maria", [text_input(["a [MASK] b"])], request_id="late")
            assert process.wait(timeout=120) == 0
            deadline = time.monotonic() + 10
            while len(answers) < 5 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            streaming.stop_stream()
            streaming.close()
            client.close()
        filled = [result for result, error in answers if error is None]
        assert len(filled) == 3 and {result.get_response().id for result in filled} == {"", "long"}
        errors = [(error.status(), error.message()) for _, error in answers if error is not None]
        assert errors == [
            (None, "the server is shutting down; send this request on a new stream (to another server)"),
            (
                "StatusCode.UNAVAILABLE",
                "the server is shutting down and ended the stream; open a new one (to another server)",
            ),
        ], answers
        (answer,) = list(half_closed)  # status OK, or this raises grpc.RpcError
        assert answer.infer_response.id == "sent" and not answer.error_message


def test_a_grpc_port_in_use_is_one_line_and_exit_2():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), "serve", "--port", "0", "--device", "cpu", "--grpc-port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        taken.close()
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another --grpc-port or --host"
    )


def test_without_the_grpc_extra_the_flag_names_it(monkeypatch):
    from typer.testing import CliRunner

    from maria_onnx.cli import app

    monkeypatch.setitem(sys.modules, "grpc", None)  # as if grpcio were not installed
    monkeypatch.delitem(sys.modules, "maria_onnx.serve.grpc_service", raising=False)
    result = CliRunner().invoke(app, ["serve", "--grpc-port", "0", "--device", "cpu"])
    assert result.exit_code == 2
    assert (
        result.output.strip() == "error: grpc: --grpc-port needs the grpc extra; pip install 'maria-onnx[serve,grpc]'"
    )
