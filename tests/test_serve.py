"""`maria serve` for real: a server process on 127.0.0.1 (ephemeral port) with the shipped model, driven by
urllib, curl-like JSON, binary tensors and tritonclient. Every request loop is bounded; each test stops the server
it started, by its process id."""

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.default_model import DEFAULT_MODEL
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.requests import FillRequest
from maria_onnx.tools.bench_serve import stop
from tests.fuzz import random_json

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn, prometheus-client) is not installed")

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["The [MASK] statement is used to [MASK] an exception.", "Use the [MASK] module to read [MASK:2] files."]
SLOW = "[MASK:300]"  # 300 AR steps: long enough to still be running when we act


@contextmanager
def server(*args, seconds: float = 60, device: str = "cpu", python: str = sys.executable):
    """Starts `maria serve --port 0` (with `python`), yields (base url, process); stops it by pid with SIGTERM (then
    SIGKILL). process.announced is the line the server printed when it started listening."""
    process = subprocess.Popen(
        [python, str(ROOT / "cli.py"), "serve", "--port", "0", "--device", device, *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, url = time.monotonic() + seconds, None
        while url is None and time.monotonic() < deadline and process.poll() is None:
            process.announced = process.stderr.readline()
            match = re.search(r"\(warmed up in \d+ ms\), listening on (http://127\.0\.0\.1:\d+)", process.announced)
            url = match.group(1) if match else None
        assert url, f"the server did not start: {process.stderr.read() if process.poll() is not None else ''}"
        yield url, process
    finally:
        stop(process)


def call(url, path, payload=None, headers=None, raw: bytes | None = None, timeout: float = 60):
    """(status, headers, body bytes) of one request."""
    data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else None)
    request = urllib.request.Request(
        url + path, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def oip(texts, **parameters):
    return {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}],
        "parameters": parameters,
    }


@pytest.fixture(scope="module")
def running():
    with server("--max-batch-delay-ms", "50", "--max-batch-size", "16") as (url, process):
        yield url


@pytest.fixture(scope="module")
def reference():
    return Infiller(DEFAULT_MODEL, device="cpu")


def test_health_and_metadata(running):
    assert call(running, "/v2/health/live")[0] == 200
    assert json.loads(call(running, "/v2/health/ready")[2]) == {"ready": True}
    assert call(running, "/v2/models/maria/ready")[0] == 200
    meta = json.loads(call(running, "/v2/models/maria")[2])
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} >= {("text", "BYTES"), ("seed", "INT64")}
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [("text", "BYTES"), ("result", "BYTES")]
    assert "binary_tensor_data" in json.loads(call(running, "/v2")[2])["extensions"]


def test_infer_in_json_fills_like_maria_infill(running, reference):
    sampling = Sampling(temperature=1.0, seed=11)
    want = reference.infill(TEXTS, sampling, num_samples=2)
    status, _, body = call(running, "/v2/models/maria/infer", oip(TEXTS, temperature=1.0, seed=11, num_samples=2))
    assert status == 200
    outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert outputs["text"]["data"] == [r.text for r in want]
    assert [json.loads(r) for r in outputs["result"]["data"]] == [r.to_dict() for r in want]
    status, _, body = call(running, "/v1/infill", {"text": TEXTS, "temperature": 1.0, "seed": 11, "num_samples": 2})
    assert status == 200 and json.loads(body)["results"] == [r.to_dict() for r in want]


def test_span_lengths_searched_gap_by_gap_fill_like_maria_infill(running, reference):
    """Three [MASK:?] (512 combinations): each gap's round of rows joins the running engine in turn."""
    texts = ["The [MASK:?] statement is used to [MASK:?] an [MASK:?].", TEXTS[1]]
    want = reference.infill(texts, Sampling(temperature=1.0, seed=2), num_samples=2)
    assert all("searched gap by gap" in r.note for r in want[:2])
    status, _, body = call(running, "/v1/infill", {"text": texts, "temperature": 1.0, "seed": 2, "num_samples": 2})
    assert status == 200 and json.loads(body)["results"] == [r.to_dict() for r in want]


def test_triton_generate_extension_fills_like_infer(running, reference):
    """POST .../generate (and _stream), as Triton serves it for this model: the body's "text" is the input, its
    other keys and "parameters" the settings; each output one value, or a list over texts x samples."""
    want = reference.infill([TEXTS[0]])[0]
    status, headers, body = call(running, "/v2/models/maria/generate", {"text": TEXTS[0]})
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "model_name": "maria",
        "model_version": "1",
        "text": want.text,
        "result": json.dumps(want.to_dict(), ensure_ascii=False),
    }
    want = reference.infill(TEXTS, Sampling(temperature=1.0, seed=11), num_samples=2)
    for path in ("/v2/models/maria/generate", "/v2/models/maria/versions/1/generate_stream"):
        status, headers, body = call(
            running,
            path,
            {"text": [[t] for t in TEXTS], "seed": 11, "parameters": {"temperature": 1.0, "num_samples": 2}},
        )
        assert status == 200, body
        if path.endswith("_stream"):  # one server-sent event carrying the same object
            assert headers["content-type"] == "text/event-stream; charset=utf-8"
            assert body.startswith(b"data: ") and body.endswith(b"\n\n") and body.count(b"\n\n") == 1
            body = body[len(b"data: ") :]
        answer = json.loads(body)
        assert answer["text"] == [r.text for r in want]
        assert [json.loads(r) for r in answer["result"]] == [r.to_dict() for r in want]


def test_infer_with_binary_tensors(running, reference):
    texts = [t.encode() for t in TEXTS]
    blob = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    head = json.dumps(
        {
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(blob)}}
            ],
            "outputs": [{"name": "text", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, body = call(
        running, "/v2/models/maria/infer", raw=head + blob, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    assert status == 200
    length = int({k.lower(): v for k, v in headers.items()}["inference-header-content-length"])
    outputs = json.loads(body[:length])["outputs"]
    assert [o["name"] for o in outputs] == ["text"]  # the output asked for, alone
    text_output = outputs[0]
    raw, filled = body[length : length + text_output["parameters"]["binary_data_size"]], []
    while raw:
        (size,) = struct.unpack_from("<I", raw)
        filled.append(raw[4 : 4 + size].decode())
        raw = raw[4 + size :]
    assert filled == [r.text for r in reference.infill(TEXTS)]


def test_tritonclient_binary_infer(running, reference):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    client = httpclient.InferenceServerClient(running.removeprefix("http://"), concurrency=2)
    try:
        assert client.is_server_live() and client.is_model_ready("maria")
        text = httpclient.InferInput("text", [2, 1], "BYTES")  # Triton's [batch, 1]
        text.set_data_from_numpy(np.array([[t.encode()] for t in TEXTS], dtype=np.object_), binary_data=True)
        seed = httpclient.InferInput("seed", [1], "INT64")
        seed.set_data_from_numpy(np.array([5], dtype=np.int64))
        temperature = httpclient.InferInput("temperature", [1], "FP32")
        temperature.set_data_from_numpy(np.array([0.8], dtype=np.float32))
        outputs = [
            httpclient.InferRequestedOutput("text", binary_data=True),
            httpclient.InferRequestedOutput("result", binary_data=False),
        ]
        result = client.async_infer("maria", [text, seed, temperature], outputs=outputs).get_result(timeout=60)
        want = reference.infill(TEXTS, Sampling(temperature=0.8, seed=5))
        assert result.as_numpy("text").shape == (2, 1)
        assert [t.decode() for t in result.as_numpy("text").reshape(-1)] == [r.text for r in want]
        assert [json.loads(r)["fills"] for r in result.as_numpy("result").reshape(-1)] == [r.fills for r in want]
        assert client.is_model_ready("maria", model_version="1")  # /v2/models/maria/versions/1/...
        assert client.get_model_metadata("maria", model_version="1")["versions"] == ["1"]
        config = client.get_model_config("maria")  # Triton's configuration form
        assert config == client.get_model_config("maria", model_version="1")
        assert config["max_batch_size"] == 16 and [i["name"] for i in config["input"] if not i["optional"]] == ["text"]
        assert [(o["name"], o["data_type"]) for o in config["output"]] == [
            ("text", "TYPE_STRING"),
            ("result", "TYPE_STRING"),
        ]
        pinned = client.infer("maria", [text, seed, temperature], model_version="1", outputs=outputs)
        assert [t.decode() for t in pinned.as_numpy("text").reshape(-1)] == [r.text for r in want]
        with pytest.raises(Exception, match="no version '2' of model 'maria' here; it has version 1"):
            client.infer("maria", [text], model_version="2")
        plain = client.infer("maria", [text, seed, temperature], priority=1, timeout=60_000_000)  # no outputs named
        assert [t.decode() for t in plain.as_numpy("text").reshape(-1)] == [r.text for r in want]
        assert [json.loads(r)["fills"] for r in plain.as_numpy("result").reshape(-1)] == [r.fills for r in want]
        slow = httpclient.InferInput("text", [1, 1], "BYTES")
        slow.set_data_from_numpy(np.array([[SLOW.encode()]], dtype=np.object_))
        with pytest.raises(Exception, match=r"\[504\] no answer within the deadline of 0.001 s"):
            client.infer("maria", [slow], timeout=1000)  # the request's own, in µs
        for request, response in (("gzip", "deflate"), ("deflate", "gzip")):  # compressed both ways
            packed = client.infer(
                "maria",
                [text, seed, temperature],
                outputs=outputs,
                request_compression_algorithm=request,
                response_compression_algorithm=response,
            )
            assert [t.decode() for t in packed.as_numpy("text").reshape(-1)] == [r.text for r in want]
    finally:
        client.close()


def stream(url: str, texts: list[str], **settings) -> tuple[list[str], list]:
    """The kinds and data of the events /v1/infill/stream answers."""
    body = json.dumps({"text": texts, **settings}).encode()
    request = urllib.request.Request(url + "/v1/infill/stream", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [block for block in response.read().decode().split("\n\n") if block.strip()]
    return (
        [block.split("\n")[0].removeprefix("event: ") for block in events],
        [json.loads(block.split("\n")[1].removeprefix("data: ")) for block in events],
    )


def test_the_stream_sends_each_fill_then_the_result(running, reference):
    kinds, data = stream(running, [TEXTS[0]])
    want = reference.infill([TEXTS[0]])[0]
    assert kinds == ["token"] * len(want.fills) + ["result"]
    assert [d["piece"] for d in data[:-1]] == want.fills and data[-1]["results"] == [want.to_dict()]
    kinds, data = stream(running, ["Use the [MASK:1-3] module.", TEXTS[0]])  # a span text: its result only
    want = reference.infill(["Use the [MASK:1-3] module.", TEXTS[0]])
    assert kinds == ["token"] * len(want[1].fills) + ["result"] and {d["text"] for d in data[:-1]} == {1}
    assert data[-1]["results"] == [r.to_dict() for r in want]


def test_span_lengths_are_searched_where_every_combination_would_not_fit(running, reference):
    """Two [MASK:?] make 64 combinations: one sample takes all 64 decode rows the request may use; two samples
    would take 128, so each text's lengths are searched gap by gap, a round's 8 rows per sample at a time."""
    text = "Use the [MASK:?] module to [MASK:?] files."
    status, _, body = call(running, "/v1/infill", {"text": [text]})
    assert status == 200 and len(json.loads(body)["results"][0]["candidates"]) == 64
    settings = {"temperature": 1.0, "seed": 4, "num_samples": 2}
    status, _, body = call(running, "/v1/infill", {"text": [text], **settings})
    searched = FillRequest([reference.prepare(text, most=1)], Sampling(temperature=1.0, seed=4), num_samples=2)
    want = reference.infill_requests([searched])[0]
    assert status == 200 and json.loads(body)["results"] == [r.to_dict() for r in want]
    assert all(len(r.candidates) < 64 and "more decode rows than the request may use" in r.note for r in want)
    status, _, body = call(running, "/v1/infill", {"text": [text] * 9})  # 9 x 8 rows even searched
    assert status == 413 and "needs 72 decode rows" in json.loads(body)["error"]


def test_the_streams_pieces_are_whole_characters(running, reference):
    """A token that holds part of a character streams the piece "", the one that completes it the character."""
    texts, settings = ["\U0001f642[MASK:3]\U0001f643"], {"temperature": 3.0, "seed": 0, "num_samples": 16}
    _, data = stream(running, texts, **settings)
    want = reference.infill(texts, Sampling(temperature=3.0, seed=0), num_samples=16)
    assert data[-1]["results"] == [r.to_dict() for r in want] and any("" in r.fills for r in want)
    for sample, result in enumerate(want):
        assert [d["piece"] for d in data[:-1] if d["sample"] == sample] == result.fills
        assert "".join(result.fills) == result.text.removeprefix("\U0001f642").removesuffix("\U0001f643")


def test_concurrent_requests_form_batches_and_do_not_change_results(running, reference):
    texts = [f"Use the [MASK] module to [MASK:2] file number {i}." for i in range(32)]
    want = reference.infill(texts, Sampling(temperature=1.0, seed=3))
    before = batches(running)
    with ThreadPoolExecutor(32) as pool:
        answers = list(
            pool.map(lambda text: call(running, "/v1/infill", {"text": [text], "temperature": 1.0, "seed": 3}), texts)
        )
    assert all(status == 200 for status, _, _ in answers)
    # each request holds one text (index 0): its samples match a one-text run with the same seed
    alone = [reference.infill([t], Sampling(temperature=1.0, seed=3))[0] for t in texts]
    assert [json.loads(body)["results"][0]["text"] for _, _, body in answers] == [r.text for r in alone]
    assert len(want) == 32
    after = batches(running)
    steps, rows = after[0] - before[0], after[1] - before[1]
    assert rows / steps > 1  # engine steps held several texts at once


def test_a_request_joins_the_running_batch_and_leaves_before_a_longer_one():
    """Continuous batching: a short request sent while a long one decodes is answered first."""
    with server("--max-batch-size", "4") as (url, _):
        finished = []

        def send(text, name, delay):
            time.sleep(delay)
            status, _, _ = call(url, "/v1/infill", {"text": [text]})
            finished.append((name, status))

        with ThreadPoolExecutor(2) as pool:
            pool.submit(send, "A long gap: " + "[MASK:400]" + " ends here.", "long", 0)
            pool.submit(send, "The [MASK] statement.", "short", 0.2)
        assert finished == [("short", 200), ("long", 200)]


def test_the_concat_decoder_batches_a_batch_at_a_time(bundles):
    with server(
        "--model", str(bundles["olmo"]), "--decoder", "concat", "--max-batch-delay-ms", "200", "--max-batch-size", "16"
    ) as (url, _):
        before = batches(url)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: call(url, "/v1/infill", {"text": [f"a [MASK] b {i}"]}), range(8)))
        assert all(status == 200 for status, _, _ in answers)
        after = batches(url)
        assert after[0] - before[0] < 8 and after[1] - before[1] == 8  # fewer batches than requests
        text = "a [MASK:?] b [MASK:?] c [MASK:?]"  # lengths searched gap by gap, batch by batch
        want = Infiller(bundles["olmo"], device="cpu", decoder="concat").infill([text])
        before = batches(url)
        status, _, body = call(url, "/v1/infill", {"text": [text]})
        assert status == 200 and json.loads(body)["results"] == [r.to_dict() for r in want]
        after = batches(url)  # one batch per round, each round's rows
        assert after[0] - before[0] > 1 and after[1] - before[1] == len(want[0].candidates)


def batches(url) -> tuple[float, float]:
    metrics = call(url, "/metrics")[2].decode()
    count = float(re.search(r"^maria_batch_size_count (\S+)$", metrics, re.M).group(1))
    total = float(re.search(r"^maria_batch_size_sum (\S+)$", metrics, re.M).group(1))
    return count, total


def test_metrics_in_prometheus_format(running):
    call(running, "/v1/infill", {"text": ["a [MASK] b"]})
    metrics = call(running, "/metrics")[2].decode()
    for name in (
        "maria_requests_total",
        "maria_queue_depth",
        "maria_batch_size_bucket",
        "maria_request_latency_seconds_bucket",
        "maria_tokens_filled_total",
        "maria_queue_seconds_bucket",
        "maria_infer_seconds_bucket",
    ):
        assert re.search(rf"^{name}", metrics, re.M), name
    assert re.search(r'^maria_requests_total\{route="/v1/infill",status="200"\} [1-9]', metrics, re.M)
    assert re.search(r"^maria_infer_seconds_count [1-9]", metrics, re.M)


BOUNDS = [
    ("/v1/infill", None, b"{not json", 400, "not valid JSON"),
    ("/v1/infill", {"texts": ["a"]}, None, 400, "the request has no \"text\" field (it has ['texts']); send"),
    ("/v1/infill", ["a [MASK]"], None, 400, 'send a JSON object {"text": [...], ...}, got list'),
    ("/v1/infill", {"text": ["a [MASK:0] b"]}, None, 422, "text 0: '[MASK:0]' asks for 0 tokens"),
    ("/v1/infill", {"text": ["word " * 2100 + "[MASK]"]}, None, 422, "over the bundle's maximum"),
    ("/v1/infill", {"text": ["a [MASK:x]"]}, None, 422, "is not a marker"),
    ("/v1/infill", {"text": ["a [MASK]"], "temperature": "hot"}, None, 400, "parameter 'temperature' must be"),
    ("/v1/infill", {"text": ["a [MASK]"], "top_p": 3}, None, 422, "top-p must be in (0, 1]"),
    ("/v1/infill", {"text": ["a [MASK]"], "seed": 1e30}, None, 400, "parameter 'seed' must be a 64-bit integer"),
    (
        "/v1/infill",
        {"text": ["a [MASK]"], "seed": float("inf")},  # json.dumps writes Infinity, which is not JSON
        None,
        400,
        "the request holds Infinity, which is not JSON",
    ),
    ("/v1/infill", {"text": ["a [MASK]"] * 9}, None, 413, "over the limit of 8 per request"),
    ("/v1/infill", {"text": ["a [MASK]" + " x" * 10000]}, None, 413, "over the limit of 16384"),
    (
        "/v2/models/maria/infer",
        {"inputs": [{"name": "text", "datatype": "INT32", "shape": [1], "data": [1]}]},
        None,
        400,
        "input 'text' has datatype 'INT32'; expected BYTES",
    ),
    (
        "/v2/models/maria/infer",
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a [MASK]"]}]},
        None,
        400,
        "input 'text' has shape [3] (3 elements) but holds 1",
    ),
    (
        "/v2/models/maria/infer",
        {**oip(["a [MASK]"]), "parameters": {"tempx": 1}},
        None,
        400,
        "unknown parameters ['tempx']; parameters are temperature, top_k",
    ),
    ("/v2/models/maria/infer", None, b'{"inputs": []}xx', 400, "not valid JSON"),
    ("/v2/models/other/infer", oip(["a [MASK]"]), None, 404, "no model 'other' here"),
    (
        "/v1/infill",
        None,
        b'{"text": ["a [MASK]"], "text": ["b [MASK]"]}',
        400,
        "the request repeats the key 'text' in one object; give each key once",
    ),
    (
        "/v2/models/maria/infer",
        {"inputs": oip(["a [MASK]"])["inputs"] * 2},
        None,
        400,
        "input 'text' is given twice; send each input once",
    ),
    (
        "/v1/infill",
        None,
        b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        400,
        "the request nests arrays or objects more than 128 deep; send flatter JSON",
    ),
    ("/v2/models/maria/infer", None, b"[" * 200 + b"]" * 200, 400, "the request nests arrays or objects more than 128"),
    (
        "/v2/models/maria/generate",
        {"text_input": "a [MASK]"},
        None,
        400,
        'the request has no "text" field (it has [\'text_input\']); this model\'s input is "text"',
    ),
    (
        "/v2/models/maria/generate",
        {"text": "a [MASK]", "seed": 1, "parameters": {"seed": 2}},
        None,
        400,
        "'seed' is given both as a field and in 'parameters'; give it once",
    ),
    ("/v2/models/maria/generate", {"text": 5}, None, 400, '"text" must be a string or a list of strings, got int'),
    (
        "/v2/models/maria/generate",
        {"text": "a [MASK]", "parameters": [1]},
        None,
        400,
        "'parameters' of the request must be a JSON object, got list",
    ),
    ("/v2/models/maria/generate", {"text": "a [MASK]", "id": "x"}, None, 400, "unknown parameters ['id']"),
    ("/v2/models/maria/generate_stream", {"text": "a [MASK:0]"}, None, 422, "text 0: '[MASK:0]' asks for 0 tokens"),
    ("/v2/models/maria/generate_stream", {"text": ["a [MASK]"] * 9}, None, 413, "over the limit of 8 per request"),
    ("/v2/models/other/generate", {"text": "a [MASK]"}, None, 404, "no model 'other' here"),
    (
        "/v1/infill",
        {"text": ["a [MASK]"], "k" * 2000: 1},
        None,
        400,
        "unknown fields ['kkkkkkkkkk",
    ),  # a client's names and values are quoted cut short
    ("/v1/infill", {"text": ["a [MASK]"], "k" * 2000: 1}, None, 400, "... (2,004 characters); fields are text, "),
    ("/v2/models/maria/generate", {"k" * 2000: 1}, None, 400, "... (2,004 characters)); this model's input is"),
]


def test_each_bound_gives_its_status_and_one_line():
    with server("--max-body-bytes", "16384", "--max-texts", "8", "--api-key", "secret") as (url, _):
        auth = {"Authorization": "Bearer secret"}
        status, headers, body = call(url, "/v1/infill", {"text": ["a [MASK]"]})
        assert status == 401 and "bearer token" in json.loads(body)["error"]
        assert call(url, "/v2/health/ready")[0] == 200  # health stays open
        assert call(url, "/v1/infill", {"text": ["a [MASK]"]}, headers=auth)[0] == 200
        for scheme, token, status in (("bearer", "secret", 200), ("BEARER", "secret", 200), ("Basic", "secret", 401)):
            headers = {"Authorization": f"{scheme} {token}"}  # the scheme's name is case-insensitive
            assert call(url, "/v1/infill", {"text": ["a [MASK]"]}, headers=headers)[0] == status, scheme
        assert call(url, "/v1/infill", {"text": ["a [MASK]"]}, headers={"Authorization": "Bearer Secret"})[0] == 401
        for path, payload, raw, status, message in BOUNDS:
            got, _, body = call(url, path, payload, headers=auth, raw=raw)
            assert got == status and message in json.loads(body)["error"], (path, payload, body)
            assert "\n" not in json.loads(body)["error"] and "Traceback" not in body.decode()


def test_tritonclient_reads_the_statistics_of_each_request():
    """Triton's statistics extension: texts and requests counted, a request's phases adding up to its whole time,
    the engine's steps by batch size, a request past its deadline as a failure; a route the server lacks answers
    one line that tritonclient reads."""
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    with server("--max-batch-size", "4") as (url, _):
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        try:
            empty = client.get_inference_statistics("maria")["model_stats"][0]
            assert (empty["inference_count"], empty["execution_count"], empty["batch_stats"]) == (0, 0, [])
            text = httpclient.InferInput("text", [2, 1], "BYTES")
            text.set_data_from_numpy(np.array([[t.encode()] for t in TEXTS], dtype=np.object_))
            before = time.time() * 1000
            client.infer("maria", [text])
            assert call(url, "/v1/infill", {"text": ["a [MASK] b"]})[0] == 200
            after = time.time() * 1000
            slow = httpclient.InferInput("text", [1, 1], "BYTES")
            slow.set_data_from_numpy(np.array([[SLOW.encode()]], dtype=np.object_))
            with pytest.raises(Exception, match="deadline"):
                client.infer("maria", [slow], timeout=1000)
            stats = client.get_inference_statistics("maria", model_version="1")["model_stats"][0]
            every = client.get_inference_statistics()["model_stats"]  # /v2/models/stats
            assert [(m["name"], m["inference_stats"]) for m in every] == [("maria", stats["inference_stats"])]
            phases = stats["inference_stats"]
            assert stats["inference_count"] == 3 and phases["success"]["count"] == 2 and phases["fail"]["count"] == 1
            assert before <= stats["last_inference"] <= after
            parts = ("compute_input", "queue", "compute_infer", "compute_output")
            assert all(phases[p]["count"] == 2 for p in parts)
            assert sum(phases[p]["ns"] for p in parts) == phases["success"]["ns"] > 0
            steps = stats["batch_stats"]
            assert stats["execution_count"] == sum(b["compute_infer"]["count"] for b in steps) > 0
            assert {b["batch_size"] for b in steps} <= {1, 2} and all(b["compute_infer"]["ns"] > 0 for b in steps)
            with pytest.raises(Exception, match="no route /v2/repository/models/maria/load"):
                client.load_model("maria")
        finally:
            client.close()
        status, headers, body = call(url, "/v2/models/maria/infer")  # GET, not POST
        assert status == 405 and json.loads(body) == {"error": "/v2/models/maria/infer takes POST, not GET"}
        status, _, body = call(url, "/v2/models/maria/infer/", oip(TEXTS))  # no redirect with no body
        assert (status, json.loads(body)) == (
            404,
            {"error": "no route /v2/models/maria/infer/; leave out the trailing slash: /v2/models/maria/infer"},
        )
        status, _, body = call(url, "/v2/nothing/")
        assert (status, json.loads(body)["error"]) == (
            404,
            "no route /v2/nothing/; the routes are /v2/..., /v1/infill, /v1/infill/stream, /v1/generate, "
            "/v1/completions, /v1/models and /metrics",
        )


def test_a_full_queue_gives_503_and_a_deadline_504():
    with server("--max-queue", "1", "--max-batch-size", "1", "--timeout", "30") as (url, _):
        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(lambda _: call(url, "/v1/infill", {"text": [SLOW]})[:2], range(12)))
        busy = [headers for status, headers in statuses if status == 503]
        assert (
            busy
            and all({k.lower(): v for k, v in h.items()}.get("retry-after") == "1" for h in busy)
            and any(s == 200 for s, _ in statuses)
        )
    with server("--timeout", "0.05") as (url, _):
        status, _, body = call(url, "/v1/infill", {"text": [SLOW]})
        assert status == 504 and "deadline of 0.05 s" in json.loads(body)["error"]


def engine_steps(url) -> int:
    return int(float(re.search(r"^maria_batch_size_count (\S+)", call(url, "/metrics")[2].decode(), re.M).group(1)))


def test_a_client_that_leaves_frees_its_slot():
    """A client that disconnects before its answer (plain or streaming) is logged as 499 or ends its stream, and its
    rows leave the engine at once instead of being filled for nobody."""
    long_text = "[MASK:2000]"  # 2,000 steps each if they were run to the end
    with server("--max-batch-size", "1") as (url, _):
        host, port = url.removeprefix("http://").split(":")
        for path in ("/v1/infill", "/v1/infill/stream"):
            before, body = engine_steps(url), json.dumps({"text": [long_text]}).encode()
            client = socket.create_connection((host, int(port)), timeout=60)
            client.sendall(
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            if path.endswith("stream"):  # its first token: its rows are in the engine
                received = b""
                while b"event: token" not in received and len(received) < 65536:
                    received += client.recv(4096)
            else:
                for _ in range(400):  # the engine steps: its rows are in
                    if engine_steps(url) > before:
                        break
                    time.sleep(0.025)
            client.close()
        for _ in range(400):  # both are logged as 499 (the stream when it notices)
            metrics = call(url, "/metrics")[2].decode()
            if all(f'{path}",status="499"}} 1.0' in metrics for path in ("/v1/infill", "/v1/infill/stream")):
                break
            time.sleep(0.025)
        steps = engine_steps(url)
        for _ in range(50):  # the stream's rows leave at its next token's failed send
            time.sleep(0.2)
            if engine_steps(url) == steps:
                break
            steps = engine_steps(url)
        time.sleep(1.0)  # an engine still filling for them would step on meanwhile
        assert engine_steps(url) == steps < 2000, steps
        status, _, body = call(url, "/v1/infill", {"text": ["a [MASK] b"]})
        assert status == 200 and json.loads(body)["results"][0]["text"].startswith("a")
        metrics = call(url, "/metrics")[2].decode()
        for path in ("/v1/infill", "/v1/infill/stream"):
            assert re.search(rf'^maria_requests_total\{{route="{path}",status="499"\}} 1', metrics, re.M), path


def test_sigterm_lets_requests_in_flight_finish():
    with server("--max-batch-size", "4", "--grace", "60") as (url, process):
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(call, url, "/v1/infill", {"text": [SLOW]}) for _ in range(4)]
            time.sleep(0.5)
            os.kill(process.pid, signal.SIGTERM)
            statuses = [future.result(timeout=120)[0] for future in futures]
        assert statuses == [200] * 4
        assert process.wait(timeout=60) == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-batch-delay-ms", "inf"], "--max-batch-delay-ms takes a finite number of milliseconds, got inf"),
        (["--timeout", "inf"], "--timeout takes a finite number of seconds, got inf"),
        (["--grace", "inf"], "--grace takes a finite number of seconds, got inf"),
        (
            ["--api-key", ""],
            "--api-key (or MARIA_API_KEY) must be a bearer token: printable ASCII, no spaces, not empty",
        ),
        (["--api-key", "two words"], "--api-key (or MARIA_API_KEY) must be a bearer token"),
        (["--api-key", "key\r"], "--api-key (or MARIA_API_KEY) must be a bearer token"),
        (
            ["--port", "8123", "--grpc-port", "8123"],
            "--port and --grpc-port are both 8123; HTTP and gRPC each need a port of their own",
        ),
    ],
)
def test_settings_no_server_can_honour_are_one_line(monkeypatch, args, message):
    """A delay or timeout of inf waits forever; an empty key or one no client can send in a header locks out
    every client or none; one port cannot take both HTTP and gRPC: refused before the model loads (the server's
    start is replaced, so nothing binds)."""
    from typer.testing import CliRunner

    from maria_onnx.cli import app
    from maria_onnx.serve import run as serve_run

    monkeypatch.setattr(serve_run, "serve", lambda *args, **kwargs: pytest.fail("the server started"))
    result = CliRunner().invoke(app, ["serve", "--device", "cpu", *args])
    assert result.exit_code == 2 and result.output.startswith(f"error: {message}"), result.output
    assert result.output.count("\n") == 1


def test_listening_beyond_loopback_without_a_key_is_warned(monkeypatch):
    """Nothing is bound here: the server's start is replaced, so only the warning before it is seen."""
    from typer.testing import CliRunner

    from maria_onnx.cli import app
    from maria_onnx.console.serving import is_loopback
    from maria_onnx.serve import run as serve_run

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    started = []
    monkeypatch.setattr(serve_run, "serve", lambda *args, **kwargs: started.append(kwargs["host"]))
    open_host = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--device", "cpu"])
    assert open_host.exit_code == 0 and started == ["0.0.0.0"]
    assert "warning: --host 0.0.0.0 takes requests from other machines and no --api-key is set" in open_host.output
    keyed = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--device", "cpu", "--api-key", "k"])
    local = CliRunner().invoke(app, ["serve", "--device", "cpu"])
    assert keyed.exit_code == local.exit_code == 0 and "warning" not in keyed.output + local.output


def test_compressed_bodies_are_read_within_the_limit_and_answers_compressed_where_accepted():
    import gzip
    import zlib

    with server("--max-body-bytes", "16384") as (url, _):
        body = json.dumps({"text": ["a [MASK] b"]}).encode()
        status, headers, answer = call(
            url, "/v1/infill", raw=gzip.compress(body), headers={"Content-Encoding": "gzip", "Accept-Encoding": "gzip"}
        )
        headers = {k.lower(): v for k, v in headers.items()}
        assert status == 200 and headers["content-encoding"] == "gzip"
        plain = json.loads(call(url, "/v1/infill", {"text": ["a [MASK] b"]})[2])
        assert json.loads(gzip.decompress(answer)) == plain
        status, headers, answer = call(
            url,
            "/v1/infill",
            raw=zlib.compress(body),
            headers={"Content-Encoding": "deflate", "Accept-Encoding": "br, gzip;q=0"},
        )
        assert status == 200 and "content-encoding" not in {k.lower() for k in headers}
        assert json.loads(answer) == plain
        bomb = gzip.compress(json.dumps({"text": ["a [MASK] " + "x " * 20000]}).encode())
        for raw, encoding, want, message in (
            (bomb, "gzip", 413, "over the limit of 16384 bytes once decompressed"),
            (body, "gzip", 400, "the body is not valid gzip data"),
            (gzip.compress(body)[:-12], "gzip", 400, "the gzip body ends before its data does"),
            (body, "br", 415, "Content-Encoding 'br' is not supported; send gzip, deflate or none"),
        ):
            assert len(raw) < 16384
            status, _, answer = call(url, "/v1/infill", raw=raw, headers={"Content-Encoding": encoding})
            assert status == want and message in json.loads(answer)["error"], (encoding, answer)


def test_fuzzed_requests_get_an_answer_or_one_line_never_a_5xx():
    """300 seeded random requests (nested JSON of the protocol's keys, truncated compressed bodies, binary headers
    that do not add up): each is filled or refused with a 4xx and one line."""
    import gzip
    import random

    rng = random.Random(0)
    atoms = [None, True, False, 0, -1, 2.5, 1e300, "", "a [MASK]", "[MASK:?]", "[MASK:0]", [], {}]
    keys = [
        "text",
        "inputs",
        "name",
        "datatype",
        "shape",
        "data",
        "parameters",
        "seed",
        "temperature",
        "outputs",
        "binary_data_size",
        "timeout",
        "sequence_id",
    ]

    def rand():
        return random_json(rng, atoms, keys)

    with server("--max-texts", "8") as (url, _):
        for _ in range(300):
            kind, headers = rng.random(), {}
            if kind < 0.2:
                path, raw = "/v1/infill", json.dumps({"text": rand(), "seed": rand()}).encode()
            elif kind < 0.3:
                path = rng.choice(["/v2/models/maria/generate", "/v2/models/maria/generate_stream"])
                raw = json.dumps(
                    rng.choice([{"text": rand(), "parameters": rand(), rng.choice(keys): rand()}, rand()])
                ).encode()
            elif kind < 0.75:
                spec = {
                    "name": rng.choice(["text", "seed", "x"]),
                    "datatype": rng.choice(["BYTES", "FP32", None]),
                    "shape": rng.choice([[1], [2], [1, 1], None]),
                    "data": rand(),
                    "parameters": rand(),
                }
                path = "/v2/models/maria/infer"
                raw = json.dumps(
                    {"inputs": rng.choice([[spec], spec, rand()]), "outputs": rand(), "parameters": rand()}
                ).encode()
            elif kind < 0.85:
                path, headers = "/v1/infill", {"Content-Encoding": rng.choice(["gzip", "deflate", "zstd"])}
                raw = gzip.compress(json.dumps({"text": [rand()]}).encode())[: rng.randint(0, 60)]
            else:
                head = json.dumps(
                    {
                        "inputs": [
                            {
                                "name": "text",
                                "datatype": "BYTES",
                                "shape": [1],
                                "parameters": {"binary_data_size": rng.choice([0, 4, 12, -1])},
                            }
                        ]
                    }
                ).encode()
                path, raw = (
                    "/v2/models/maria/infer",
                    head + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 20))),
                )
                headers = {"Inference-Header-Content-Length": str(len(head) + rng.choice([0, -1, 5]))}
            status, _, body = call(url, path, raw=raw, headers=headers)
            assert 200 <= status < 500, (path, raw[:200], body[:200])
            if status >= 400:
                error = json.loads(body)["error"]
                assert error and "\n" not in error, (path, raw[:200], error)


def test_the_warm_up_runs_every_graph_a_request_runs(monkeypatch):
    """Before it listens, the server fills one text with span candidates in an engine of its slots: the MLM, the
    step, the fusion head and the AR's LM head (the whole-text score) each run once ahead of the first request."""
    from maria_onnx.serve.run import warm_up

    infiller = Infiller(DEFAULT_MODEL, device="cpu")
    ran, slots = [], []
    for name in ("mlm_hidden", "cache_step", "fuse", "ar_logits", "new_cache"):
        original = getattr(infiller.backend, name)

        def recorded(*args, name=name, original=original, **kwargs):
            ran.append(name)
            if name == "new_cache":
                slots.append(args[0] if args else kwargs["slots"])
            return original(*args, **kwargs)

        monkeypatch.setattr(infiller.backend, name, recorded)
    assert warm_up(infiller, 5) > 0
    assert set(ran) == {"mlm_hidden", "cache_step", "fuse", "ar_logits", "new_cache"} and slots[0] == 5


def test_a_model_that_cannot_fill_is_refused_before_the_server_listens(monkeypatch):
    """An ONNX Runtime failure in the warm-up (on a GPU, say, device memory) is one line and exit 2, and no port is
    bound, instead of a server whose every request fails."""
    from typer.testing import CliRunner

    from maria_onnx.cli import app
    from maria_onnx.serve import run as serve_run

    def fails(self, slots):  # where the warm-up's fill first runs the model
        raise RuntimeError(
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
            "running MatMul node.\n  at a C++ frame"
        )

    monkeypatch.setattr(Infiller, "new_decoder", fails)
    monkeypatch.setattr(serve_run, "bound", lambda *args: pytest.fail("the server bound a port"))
    result = CliRunner().invoke(app, ["serve", "--device", "cpu", "--port", "0"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith(
        "error: the model could not fill a text on cpu before serving (RuntimeError: "
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned "
        "while running MatMul node.); check the bundle and device"
    ), result.output


HUGE = 10**400  # a JSON integer no float64 or 64-bit integer holds


@pytest.mark.parametrize(
    "path, payload, field",
    [
        ("/v1/infill", {"text": ["a [MASK]"], "temperature": HUGE}, "temperature"),
        ("/v1/infill", {"text": ["a [MASK]"], "top_k": HUGE}, "top_k"),
        ("/v1/generate", {"length": 4, "anneal_start": HUGE}, "anneal_start"),
        ("/v1/generate", {"length": HUGE}, "length"),
        ("/v2/models/maria/generate", {"text": "a [MASK]", "top_p": HUGE}, "top_p"),
        ("/v2/models/maria/infer", oip(["a [MASK]"], seed=HUGE), "seed"),
        ("/v2/models/maria/infer", oip(["a [MASK]"], timeout=HUGE), "timeout"),
        (
            "/v2/models/maria/infer",
            {
                "inputs": [
                    {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a [MASK]"]},
                    {"name": "top_k", "datatype": "INT32", "shape": [1], "data": [HUGE]},
                ]
            },
            "top_k",
        ),
    ],
)
def test_numbers_too_large_for_their_type_are_one_line_naming_the_field(running, path, payload, field):
    """A 401-digit integer where a number goes was a 500 (float() overflowed); now a 4xx naming the field, with the
    value cut short."""
    status, _, body = call(running, path, payload)
    message = json.loads(body)["error"]
    assert 400 <= status < 500, (status, message)
    assert field in message and "\n" not in message and len(message) < 300, message


def test_a_client_that_leaves_mid_upload_is_a_499_not_a_server_error():
    """Headers of POST /v1/infill with Content-Length: 100 and one byte, then the connection closed: logged and
    counted as the client's leaving (499), with no traceback and no 500 in the metrics."""
    import socket

    with server() as (url, process):
        host, port = url.removeprefix("http://").split(":")
        for _ in range(5):
            with socket.create_connection((host, int(port)), timeout=10) as connection:
                connection.sendall(
                    b"POST /v1/infill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{"
                )
        deadline, metrics = time.monotonic() + 30, ""
        while time.monotonic() < deadline and 'route="/v1/infill",status="499"} 5.0' not in metrics:
            time.sleep(0.1)
            metrics = call(url, "/metrics")[2].decode()
        assert 'route="/v1/infill",status="499"} 5.0' in metrics
        assert 'status="500"' not in metrics
        stop(process)
        assert "Traceback" not in process.stderr.read()


def test_what_a_client_sent_comes_back_cut_short_in_errors_and_the_log():
    """A 100 KB path in a 404 or 405, a long model name or version: each quoted to 80 characters with its length
    named, in the answer and in the access log."""
    long = "a" * 100_000
    with server() as (url, process):
        for path, payload in (
            (f"/{long}", None),  # no route
            (f"/v1/infill/{long}", None),
            (f"/v2/models/{long}", None),  # no such model
            (f"/v2/models/maria/versions/{long}", None),
        ):
            status, _, body = call(url, path, payload)
            message = json.loads(body)["error"]
            assert status == 404 and len(message) < 300 and "(100,0" in message, (status, message[:200])
        status, _, body = call(url, "/v1/infill")  # a GET where only POST goes: 405
        assert status == 405 and len(json.loads(body)["error"]) < 200
        stop(process)
        log = process.stderr.read()
    assert '"path": "/aaaa' in log and "(100,001 characters)" in log  # the access log has the requests
    assert max(map(len, log.splitlines())) < 1000, "an access-log line carried the whole path"


def test_python_clients_read_the_413_of_a_body_over_the_limit():
    """The server answered 413 before reading an oversized body and closed: the unread bytes reset the connection
    and urllib saw only that (15 of 15 times). It now reads and drops the rest (up to a bound) first."""
    body = json.dumps({"text": ["a [MASK]" + " x" * (4 << 20)]}).encode()  # 8 MiB, over the 1 MiB default
    with server() as (url, _):
        for headers in ({}, {"Transfer-Encoding": "chunked"}):  # declared in Content-Length, or found reading
            for _ in range(3):
                if headers:
                    request = urllib.request.Request(url + "/v1/infill", data=iter([body]), method="POST")
                    request.add_header("Transfer-Encoding", "chunked")
                    try:
                        with urllib.request.urlopen(request, timeout=60) as response:
                            status, answer = response.status, response.read()
                    except urllib.error.HTTPError as error:
                        status, answer = error.code, error.read()
                else:
                    status, _, answer = call(url, "/v1/infill", raw=body)
                assert status == 413 and "over the limit of 1048576" in json.loads(answer)["error"]
        assert call(url, "/v1/infill", {"text": ["a [MASK]"]})[0] == 200  # and the server goes on


def read_answer(connection, seconds: float = 10) -> bytes:
    """What the server sends on a raw connection until it closes it (at most `seconds`)."""
    connection.settimeout(seconds)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := connection.recv(65536):
            data += chunk
    return data


def test_slow_and_idle_clients_are_bounded_and_timed_out():
    """1,100 connections sending half a request locked everyone out: a connection over --max-connections is
    answered 503 as it opens, one without a whole request head within --head-timeout 408, a body slower than
    --body-timeout 408; then the server serves again."""
    import socket

    args = ("--max-connections", "4", "--head-timeout", "1", "--body-timeout", "1")
    with server(*args) as (url, process):
        host, port = url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
        try:
            with socket.create_connection((host, int(port)), timeout=10) as over:
                began = time.monotonic()
                refused = read_answer(over)
                assert refused.startswith(b"HTTP/1.1 503") and b"limit of 4 open connections" in refused
                assert time.monotonic() - began < 1  # at once, not after a timeout
            late = [read_answer(connection) for connection in idle]  # each closed after --head-timeout
            assert all(answer.startswith(b"HTTP/1.1 408") and b"no whole request head" in answer for answer in late)
        finally:
            for connection in idle:
                connection.close()
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            slow.sendall(b"POST /v1/infill HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            answer = read_answer(slow)
            assert answer.startswith(b"HTTP/1.1 408") and b"body did not come whole within 1 s" in answer
        assert call(url, "/v1/infill", {"text": ["a [MASK]"]})[0] == 200
        stop(process)
        assert "Traceback" not in process.stderr.read()


def test_a_stop_past_the_grace_period_answers_every_request_in_its_protocol_and_exits_cleanly():
    """SIGTERM with long requests in flight and --grace 1: the stop used to cancel the requests' tasks (plain-text
    500s, a traceback each, streams cut, at times an abort of the process). Now each still running gets the
    server's 503 line (HTTP), an error event (SSE) or UNAVAILABLE (gRPC), the decode worker stops between steps,
    and the process exits 0."""
    import threading

    grpc = pytest.importorskip("grpc", reason="grpcio is not installed")
    from maria_onnx.serve import oip_pb2 as pb

    answers, streamed, called = [], [], []
    with server("--grace", "1", "--max-batch-size", "4", "--grpc-port", "0") as (url, process):
        grpc_address = re.search(r"gRPC on (\S+)", process.announced).group(1)

        def infill():
            answers.append(call(url, "/v1/infill", {"text": ["[MASK:2000]"]}, timeout=120))

        def stream():
            request = urllib.request.Request(
                url + "/v1/infill/stream", data=json.dumps({"text": ["[MASK:2000]"]}).encode(), method="POST"
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                streamed.append(response.read().decode())

        def infer():
            message = pb.ModelInferRequest(model_name="maria")
            message.inputs.add(
                name="text",
                datatype="BYTES",
                shape=[1],
                contents=pb.InferTensorContents(bytes_contents=[b"[MASK:2000]"]),
            )
            with grpc.insecure_channel(grpc_address) as channel:
                method = channel.unary_unary(
                    "/inference.GRPCInferenceService/ModelInfer",
                    request_serializer=pb.ModelInferRequest.SerializeToString,
                    response_deserializer=pb.ModelInferResponse.FromString,
                )
                try:
                    method(message, timeout=120)
                    called.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    called.append((error.code(), error.details()))

        threads = [threading.Thread(target=target) for target in (infill,) * 6 + (stream, infer)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # every request is in: queued or in the engine
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=120)
        assert process.wait(timeout=120) == 0
        log = process.stderr.read()
    stopped = "the server stopped before this request was answered"
    assert len(answers) == 6 and all(
        status == 503 and stopped in json.loads(body)["error"] for status, _, body in answers
    )
    (events,) = streamed
    assert "event: error" in events and '"status": 503' in events and stopped in events
    ((code, details),) = called
    assert code == grpc.StatusCode.UNAVAILABLE and stopped in details
    assert "Traceback" not in log and "Internal Server Error" not in log
