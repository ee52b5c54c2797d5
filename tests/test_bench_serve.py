"""`maria bench-serve` drives a real server and reports what it measured (no timing is asserted)."""

import json
import re

import pytest
from typer.testing import CliRunner

from maria_onnx.cli import app

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn, prometheus-client) is not installed")


def test_bench_serve_reports_both_settings(tmp_path):
    args = "--clients 4 --requests 8 --max-batch-sizes 1,8 --delay-ms 20".split()
    result = CliRunner().invoke(app, ["bench-serve", "--out", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench-serve.json").read_text())
    runs = {run["max_batch_size"]: run for run in report["runs"]}
    assert set(runs) == {1, 8}
    for run in runs.values():
        assert run["requests"] == 8 and run["ok"] == 8 and run["errors"] == 0
        assert run["p50_ms"] <= run["p99_ms"] and run["requests_per_s"] > 0
        assert run["queue_ms"] >= 0 and run["infer_ms"] > 0  # the server's own split of a request's time
        assert run["queue_ms"] + run["infer_ms"] < run["p99_ms"]
    assert runs[1]["mean_batch_size"] == 1.0  # without batching every step holds one text
    # the engine takes one step per masked token: the 8 requests' texts hold 20 masked tokens in all
    from maria_onnx.tools.bench_serve import TEXTS

    masked = [sum(int(n or 1) for n in re.findall(r"\[MASK(?::(\d+))?\]", text)) for text in TEXTS]
    assert runs[1]["batches"] == sum(masked[(client + i) % len(TEXTS)] for client in range(4) for i in range(2)) == 20


def test_bench_serve_names_a_bad_texts_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    for path, message in ((tmp_path / "none.txt", "cannot be read"), (tmp_path / "empty.txt", "holds no text")):
        result = CliRunner().invoke(app, ["bench-serve", "--out", str(tmp_path), "--texts", str(path)])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["bench-serve", "--out", str(tmp_path), "--decoders", "fast"])
    assert result.exit_code == 2 and "--decoders takes" in result.output
    (tmp_path / "bad.txt").write_text("a [MASK] b\na [MASK:0] b\n")
    (tmp_path / "plain.txt").write_text("a [MASK] b\nno marker here\n")
    for path, message in (
        (tmp_path / "bad.txt", "the server refuses the text 'a [MASK:0] b' (422: "),
        (tmp_path / "plain.txt", "the text 'no marker here' has no [MASK] marker"),
    ):
        result = CliRunner().invoke(
            app,
            [
                "bench-serve",
                "--out",
                str(tmp_path / "out"),
                "--texts",
                str(path),
                "--clients",
                "1",
                "--requests",
                "2",
                "--max-batch-sizes",
                "1",
            ],
        )
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "out" / "bench-serve.json").exists()


def test_a_server_that_does_not_start_is_named_with_its_reason(tmp_path):
    result = CliRunner().invoke(app, ["bench-serve", "--out", str(tmp_path), "--model", str(tmp_path / "none")])
    assert result.exit_code == 2 and result.output.strip().endswith(
        f"error: the server did not start (bundle {tmp_path / 'none'} does not exist; pass a folder written by "
        "`maria export`)"
    ), result.output
    assert not (tmp_path / "bench-serve.json").exists()


def test_bench_serve_compares_http_grpc_and_grpc_stream_clients(tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    pytest.importorskip("grpc", reason="the grpc extra (grpcio, protobuf) is not installed")
    args = "--clients 4 --requests 8 --max-batch-sizes 8 --protocols http,grpc,grpc-stream".split()
    result = CliRunner().invoke(app, ["bench-serve", "--out", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    runs = {run["protocol"]: run for run in json.loads((tmp_path / "bench-serve.json").read_text())["runs"]}
    assert set(runs) == {"http", "grpc", "grpc-stream"}
    for run in runs.values():
        assert run["ok"] == 8 and run["errors"] == 0 and run["infer_ms"] > 0
    # the same texts in the same order: the same masked tokens filled, so the same rows stepped in all
    rows = {protocol: run["batches"] * run["mean_batch_size"] for protocol, run in runs.items()}
    assert rows["grpc"] == pytest.approx(rows["http"]) and rows["grpc-stream"] == pytest.approx(rows["http"])
    result = CliRunner().invoke(app, ["bench-serve", "--out", str(tmp_path), "--protocols", "websocket"])
    assert (
        result.exit_code == 2 and "--protocols takes a comma-separated list of http, grpc, grpc-stream" in result.output
    )
