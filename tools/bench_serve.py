"""`maria bench-serve`: load on a real `maria serve` process, with and without batching, side by side.

For each --max-batch-size setting (1 = no batching), --decoder (engine: continuous batching; concat: batch at a
time) and protocol a server starts on 127.0.0.1 (ephemeral ports); N clients, each starting a little after the last
(staggered), send a fixed number of requests of one text each, one after another: POST /v1/infill (http),
ModelInfer through tritonclient.grpc (grpc; the server with --grpc-port), or ModelStreamInfer, each client's
requests on one stream of its own (grpc-stream); the run reports throughput, p50/p99 latency, errors, and
from the server's own statistics (GET /v2/models/stats) the batch sizes it formed and where a request's time went:
waiting for a slot (queue) or being filled (infer). The server is stopped by its process id after each run.
"""

import contextlib
import functools
import itertools
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from . import write_json

TEXTS = [
    "The [MASK] statement is used to [MASK] an exception.",
    "Use the [MASK] module to read [MASK:2] files.",
    "A [MASK:3] is a function defined inside a class.",
    "The [MASK] keyword defines a [MASK].",
]


def start_server(
    model,
    max_batch_size: int,
    delay_ms: float,
    device: str,
    seconds: float = 120,
    decoder: str = "auto",
    grpc: bool = False,
    extra: tuple[str, ...] = (),
    log: list[str] | None = None,
):
    """(base url, gRPC address or None, process) of a `maria serve` started on ephemeral ports; `extra` flags go
    last (a flag given twice takes its last value). Its log is read as it comes, or a full pipe would stall the
    server: into `log` where given, else dropped."""
    args = [
        sys.executable,
        "-m",
        "maria_onnx.cli",
        "serve",
        "--port",
        "0",
        "--device",
        device,
        "--max-batch-size",
        str(max_batch_size),
        "--max-batch-delay-ms",
        str(delay_ms),
        "--max-queue",
        "4096",
        "--decoder",
        decoder,
    ]
    process = subprocess.Popen(
        args + (["--model", str(model)] if model else []) + (["--grpc-port", "0"] * grpc) + list(extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, said, stderr = time.monotonic() + seconds, "", process.stderr
    assert stderr is not None, "stderr is a pipe"
    while time.monotonic() < deadline and process.poll() is None:
        line = stderr.readline()
        said = line.strip() or said
        match = re.search(r"listening on (http://[^\s,]+)", line)
        if match:
            address = re.search(r"gRPC on (\S+)", line)
            keep = stderr.read if log is None else functools.partial(log.extend, stderr)
            threading.Thread(target=keep, daemon=True).start()
            return match.group(1), address.group(1) if address else None, process
    stop(process)
    said = said or stderr.read().strip().rpartition("\n")[2]
    raise ValueError(f"the server did not start ({said.removeprefix('error: ') or f'nothing said in {seconds:g} s'})")


def stop(process) -> None:
    """Stops a server by its process id: SIGTERM (a graceful stop), then SIGKILL if it has not gone in 60 s."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def infill_request(url: str, text: str) -> urllib.request.Request:
    """POST /v1/infill with one text."""
    return urllib.request.Request(url + "/v1/infill", data=json.dumps({"text": [text]}).encode(), method="POST")


def post(url: str, text: str, timeout: float) -> tuple[int, float]:
    """(status, seconds) of one /v1/infill request."""
    began = time.perf_counter()
    try:
        with urllib.request.urlopen(infill_request(url, text), timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = 0
    return status, time.perf_counter() - began


def warm_up(url: str, texts: list[str], timeout: float) -> None:
    """One request per text, not counted; a text the server refuses, or one without a marker (nothing to fill, so
    nothing measured), stops the bench in one line instead of counting as errors or as free requests."""
    for text in texts:
        try:
            with urllib.request.urlopen(infill_request(url, text), timeout=timeout) as response:
                (result,) = json.loads(response.read())["results"]
        except urllib.error.HTTPError as error:
            reason = json.loads(error.read() or b"{}").get("error", error.reason)
            raise ValueError(
                f"the server refuses the text {text[:60]!r} ({error.code}: {reason}); fix it or leave it out of --texts"
            ) from None
        if not result["masked_positions"]:
            raise ValueError(
                f"the text {text[:60]!r} has no [MASK] marker, so it would measure nothing; give each "
                "text of --texts a marker"
            )


@contextlib.contextmanager
def http_sender(url: str, address: str | None):
    """A function sending one text as POST /v1/infill, returning (status, seconds)."""
    yield lambda text, timeout: post(url, text, timeout)


def text_tensor(text: str):
    import numpy as np
    from tritonclient.grpc import InferInput

    tensor = InferInput("text", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
    return tensor


@contextlib.contextmanager
def grpc_sender(url: str, address: str | None):
    """A function sending one text as a ModelInfer through tritonclient.grpc, returning (status, seconds): the HTTP
    status the same outcome gets (200, or 0 for any error)."""
    from tritonclient.grpc import InferenceServerClient

    assert address is not None, "gRPC clients need the server's gRPC address"
    client = InferenceServerClient(address)

    def send(text: str, timeout: float) -> tuple[int, float]:
        began = time.perf_counter()
        try:
            client.infer("maria", [text_tensor(text)], client_timeout=timeout)
            status = 200
        except Exception:  # tritonclient's InferenceServerException: counted as an error
            status = 0
        return status, time.perf_counter() - began

    try:
        yield send
    finally:
        client.close()


@contextlib.contextmanager
def grpc_stream_sender(url: str, address: str | None):
    """A function sending one text on this client's ModelStreamInfer stream (tritonclient.grpc) and waiting for its
    answer, returning (status, seconds) as grpc_sender; the stream is closed when the client is done."""
    from tritonclient.grpc import InferenceServerClient

    assert address is not None, "gRPC clients need the server's gRPC address"
    client, answers = InferenceServerClient(address), queue.Queue[object]()
    client.start_stream(lambda result, error: answers.put(error))

    def send(text: str, timeout: float) -> tuple[int, float]:
        began = time.perf_counter()
        try:
            client.async_stream_infer("maria", [text_tensor(text)])
            status = 200 if answers.get(timeout=timeout) is None else 0
        except Exception:  # a closed stream, or no answer within the timeout
            status = 0
        return status, time.perf_counter() - began

    try:
        yield send
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


SENDERS = {"http": http_sender, "grpc": grpc_sender, "grpc-stream": grpc_stream_sender}


def server_stats(url: str) -> dict:
    """The server's counts so far (Triton's statistics extension): engine steps or batches, the rows they held,
    requests answered and their queue and infer nanoseconds."""
    with urllib.request.urlopen(url + "/v2/models/stats", timeout=30) as response:
        (stats,) = json.loads(response.read())["model_stats"]
    phases = stats["inference_stats"]
    return {
        "batches": stats["execution_count"],
        "rows": sum(b["batch_size"] * b["compute_infer"]["count"] for b in stats["batch_stats"]),
        "answered": phases["success"]["count"],
        "queue_ns": phases["queue"]["ns"],
        "infer_ns": phases["compute_infer"]["ns"],
    }


def load(
    url: str,
    clients: int,
    requests: int,
    stagger_s: float,
    timeout: float,
    texts: list[str] = TEXTS,
    grpc_address: str | None = None,
    protocol: str = "http",
) -> list[tuple[int, float]]:
    """Each client sends its share of the requests one after another, starting stagger_s after the last; client c's
    i-th request is texts[(c + i) % len(texts)]. Over gRPC a channel per client (and with grpc-stream a stream)."""
    shares = [requests // clients + (c < requests % clients) for c in range(clients)]

    def client(number: int):
        with SENDERS[protocol](url, grpc_address) as send:
            time.sleep(number * stagger_s)
            return [send(texts[(number + i) % len(texts)], timeout) for i in range(shares[number])]

    with ThreadPoolExecutor(clients) as pool:
        return [answer for answers in pool.map(client, range(clients)) for answer in answers]


def run_one(
    model,
    max_batch_size: int,
    delay_ms: float,
    device: str,
    clients: int,
    requests: int,
    stagger_s: float,
    timeout: float,
    decoder: str = "auto",
    texts: list[str] = TEXTS,
    protocol: str = "http",
) -> dict:
    url, grpc_address, process = start_server(
        model, max_batch_size, delay_ms, device, decoder=decoder, grpc=protocol != "http"
    )
    try:
        warm_up(url, texts, timeout)
        before = server_stats(url)
        began = time.perf_counter()
        answers = load(url, clients, requests, stagger_s, timeout, texts, grpc_address, protocol)
        wall = time.perf_counter() - began
        after = server_stats(url)
    finally:
        stop(process)
    latencies = sorted(seconds for status, seconds in answers if status == 200)
    served = {key: after[key] - before[key] for key in after}
    batches, answered = served["batches"], served["answered"]
    return {
        "protocol": protocol,
        "decoder": decoder,
        "max_batch_size": max_batch_size,
        "max_batch_delay_ms": delay_ms,
        "clients": clients,
        "requests": len(answers),
        "ok": len(latencies),
        "errors": len(answers) - len(latencies),
        "seconds": wall,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
        "batches": batches,
        "mean_batch_size": served["rows"] / batches if batches else None,
        "queue_ms": served["queue_ns"] / answered / 1e6 if answered else None,
        "infer_ms": served["infer_ns"] / answered / 1e6 if answered else None,
    }


def bench_serve(
    out: Path,
    model=None,
    clients: int = 32,
    requests: int = 256,
    max_batch_sizes=(1, 16),
    delay_ms: float = 5.0,
    stagger_ms: float = 10.0,
    repeats: int = 1,
    device: str = "cpu",
    timeout: float = 120.0,
    console: Console | None = None,
    decoders=("auto",),
    texts: list[str] = TEXTS,
    protocols=("http",),
) -> dict:
    """Runs the load once per setting and repeat (settings interleaved); writes out/bench-serve.json."""
    console = console or Console(stderr=True)
    if clients < 1:
        raise ValueError(f"--clients must be at least 1, got {clients}")
    if requests < clients:
        raise ValueError(
            f"--requests must be at least --clients (each client sends one or more), got {requests} "
            f"requests for {clients} clients"
        )
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    for option, value in (("--delay-ms", delay_ms), ("--stagger-ms", stagger_ms)):
        if not 0 <= value < float("inf"):
            raise ValueError(f"{option} takes a finite number of milliseconds, at least 0; got {value}")
    if not max_batch_sizes or min(max_batch_sizes) < 1:
        raise ValueError(f"--max-batch-sizes takes batch sizes of at least 1, got {list(max_batch_sizes)}")
    if not protocols or set(protocols) - set(SENDERS):
        raise ValueError(f"--protocols takes a comma-separated list of {', '.join(SENDERS)}; got {','.join(protocols)}")
    if set(protocols) - {"http"}:
        try:
            import grpc  # noqa: F401
            import tritonclient.grpc  # noqa: F401
        except ImportError as error:
            raise ValueError(
                f"{error.name}: --protocols grpc and grpc-stream need tritonclient[grpc] and the grpc "
                "extra; pip install 'maria-onnx[serve,grpc]' 'tritonclient[grpc]'"
            ) from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; --out names the folder for bench-serve.json")
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for repeat in range(repeats):
        for decoder, size, protocol in itertools.product(decoders, max_batch_sizes, protocols):
            console.print(
                f"repeat {repeat + 1}: --decoder {decoder} --max-batch-size {size}, {clients} {protocol} "
                f"clients, {requests} requests"
            )
            runs.append(
                {
                    "repeat": repeat,
                    **run_one(
                        model,
                        size,
                        delay_ms,
                        device,
                        clients,
                        requests,
                        stagger_ms / 1000,
                        timeout,
                        decoder,
                        texts,
                        protocol,
                    ),
                }
            )
    report = {
        "model": str(model) if model else "default",
        "device": device,
        "clients": clients,
        "requests": requests,
        "stagger_ms": stagger_ms,
        "texts": texts,
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }
    write_json(out / "bench-serve.json", report)
    console.print(table(runs))
    console.print(f"wrote {out / 'bench-serve.json'}")
    return report


def table(runs: list[dict]) -> Table:
    out = Table(
        title="maria serve under load (one text per request; times in ms, queue and infer: the server's mean "
        "per request)",
        box=box.SIMPLE_HEAD,
    )
    for column in ("run", "decoder via", "max batch", "req/s", "p50", "p99", "queue", "infer", "mean batch", "errors"):
        out.add_column(
            column,
            justify="right",
            min_width=max(map(len, column.split())),  # no word cut
            no_wrap=column == "decoder via",
        )
    for r in runs:
        shown = lambda key, form, r=r: form.format(r[key]) if r[key] is not None else "-"
        out.add_row(
            str(r["repeat"] + 1),
            f"{r['decoder']} {r['protocol']}",
            str(r["max_batch_size"]),
            f"{r['requests_per_s']:.1f}",
            shown("p50_ms", "{:.0f}"),
            shown("p99_ms", "{:.0f}"),
            shown("queue_ms", "{:.1f}"),
            shown("infer_ms", "{:.1f}"),
            shown("mean_batch_size", "{:.2f}"),
            str(r["errors"]),
        )
    return out
