"""Clients that try to stall or crash `maria serve`, counted: what docs/reliability.md records, so the next run can
be compared. Servers on 127.0.0.1, ephemeral ports, stopped by process id; every loop bounded.

    python -m maria_onnx.tools.abuse --out reliability.json [--rounds 3]

slow clients (half a request each, past --max-connections) and the normal requests among them; clients leaving
mid-upload; oversized bodies sent by urllib; numbers too large for their type on every numeric field; a stop
past --grace with long requests in flight, and a drain within it; random JSON on every route, random ModelInfer
messages over gRPC and random `maria` command lines; a queue flood; kills of `maria export --overwrite`; a soak.
"""

import argparse
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from . import run_main, write_json
from .bench_serve import start_server, stop

HUGE = 10**400


LOGS: dict[int, list[str]] = {}  # per server process, the lines of its log read so far


def start(*flags: str, grpc: bool = False) -> tuple[str, str | None, subprocess.Popen]:
    """(base url, gRPC address or None, process) of a `maria serve --device cpu` of the shipped model with these
    flags; its log is kept for stopped()."""
    log: list[str] = []
    url, grpc_address, process = start_server(None, 8, 5.0, "cpu", grpc=grpc, extra=flags, log=log)
    LOGS[process.pid] = log
    return url, grpc_address, process


def stopped(process: subprocess.Popen) -> tuple[int, str]:
    """Stops the server (bench_serve.stop), then (its exit status, its log)."""
    stop(process)
    time.sleep(0.2)  # the reader takes the last lines
    return process.returncode, "".join(LOGS.pop(process.pid, []))


def post(url: str, path: str, payload: object = None, raw: bytes | None = None, timeout: float = 120) -> int:
    """The status of one POST (0 where the connection failed)."""
    data = raw if raw is not None else json.dumps(payload).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=data, method="POST"), timeout=timeout):
            return 200
    except urllib.error.HTTPError as error:
        error.read()
        return error.code
    except OSError:
        return 0


def half_requests(url: str, count: int) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    opened = []
    for _ in range(count):
        connection = socket.create_connection((host, int(port)), timeout=30)
        connection.sendall(b"POST /v1/infill HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        opened.append(connection)
    return opened


def slow_clients(half: int, max_connections: int, normal: int) -> dict:
    url, _, process = start("--max-connections", str(max_connections), "--head-timeout", "2", "--body-timeout", "2")
    began = time.monotonic()
    held = half_requests(url, half)
    times: list[float] = []
    statuses: Counter = Counter()
    for _ in range(normal):
        sent = time.monotonic()
        statuses[post(url, "/v1/infill", {"text": ["a [MASK]"]}, timeout=30)] += 1
        times.append(time.monotonic() - sent)
    time.sleep(3)  # past --body-timeout: the half requests are answered 408
    answers: Counter = Counter()
    for connection in held:
        connection.settimeout(5)
        try:
            answers[connection.recv(64).split(b" ")[1].decode() or "closed"] += 1
        except (OSError, IndexError):
            answers["closed"] += 1
        connection.close()
    after = post(url, "/v1/infill", {"text": ["a [MASK]"]})
    code, log = stopped(process)
    return {
        "half_requests": half,
        "max_connections": max_connections,
        "normal_statuses": dict(statuses),
        "normal_seconds_max": round(max(times), 3),
        "half_request_answers": dict(answers),
        "after_status": after,
        "seconds": round(time.monotonic() - began, 1),
        "exit": code,
        "tracebacks": log.count("Traceback"),
    }


def left_mid_upload(count: int) -> dict:
    url, _, process = start()
    host, port = url.removeprefix("http://").split(":")
    for _ in range(count):
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(b"POST /v1/infill HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    time.sleep(1)
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        metrics = response.read().decode()
    counted = {
        line.split("status=")[1].split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith('maria_requests_total{route="/v1/infill"')
    }
    code, log = stopped(process)
    return {"clients": count, "counted_by_status": counted, "exit": code, "tracebacks": log.count("Traceback")}


def oversized(count: int) -> dict:
    url, _, process = start()
    body = json.dumps({"text": ["a [MASK]" + " x" * (4 << 20)]}).encode()
    statuses = Counter(post(url, "/v1/infill", raw=body) for _ in range(count))
    code, log = stopped(process)
    return {"bodies_8_mib": count, "statuses": dict(statuses), "exit": code, "tracebacks": log.count("Traceback")}


def large_numbers() -> dict:
    url, _, process = start()
    text = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a [MASK]"]}]}
    cases = [
        ("/v1/infill", {"text": ["a [MASK]"], field: value})
        for field in ("temperature", "top_k", "top_p", "seed", "num_samples")
        for value in (HUGE, -HUGE)
    ]
    cases += [
        ("/v1/generate", {"length": 4, field: HUGE})
        for field in (
            "length",
            "steps",
            "anneal_start",
            "anneal_end",
            "fraction_start",
            "temperature",
            "seed",
            "num_samples",
        )
    ]
    cases += [
        ("/v2/models/maria/generate", {"text": "a [MASK]", field: HUGE})
        for field in ("temperature", "top_k", "top_p", "seed")
    ]
    cases += [
        ("/v2/models/maria/infer", {**text, "parameters": {field: HUGE}})
        for field in ("temperature", "top_k", "seed", "timeout")
    ]
    cases += [
        (
            "/v2/models/maria/infer",
            {"inputs": [*text["inputs"], {"name": field, "datatype": kind, "shape": [1], "data": [HUGE]}]},
        )
        for field, kind in (("top_k", "INT32"), ("seed", "INT64"), ("temperature", "FP32"))
    ]
    statuses = Counter(post(url, path, payload) for path, payload in cases)
    code, log = stopped(process)
    return {"requests": len(cases), "statuses": dict(statuses), "exit": code, "tracebacks": log.count("Traceback")}


def stop_in_flight(requests: int, text: str, after_s: float, *flags: str) -> dict:
    """`requests` concurrent requests of `text`, and SIGTERM after_s in: what each got, and how the server ended."""
    url, _, process = start(*flags)
    statuses: Counter = Counter()
    threads = [
        threading.Thread(target=lambda: statuses.update([post(url, "/v1/infill", {"text": [text]})]))
        for _ in range(requests)
    ]
    for thread in threads:
        thread.start()
    time.sleep(after_s)
    code, log = stopped(process)
    for thread in threads:
        thread.join(timeout=120)
    return {"requests": requests, "statuses": dict(statuses), "exit": code, "tracebacks": log.count("Traceback")}


def stop_past_grace(requests: int) -> dict:
    """SIGTERM with requests that outlast --grace: every one still running is answered 503, exit 0."""
    return stop_in_flight(requests, "[MASK:2000]", 1.5, "--grace", "1", "--max-batch-size", "8")


def fuzz(count: int, seed: int = 0) -> dict:
    """Seeded random JSON values of the protocol's fields on every POST route, numbers of every size among them."""
    rng = random.Random(seed)
    atoms: list[object] = [
        None,
        True,
        0,
        -1,
        2.5,
        1e308,
        HUGE,
        -HUGE,
        2**63,
        "",
        "a [MASK]",
        "[MASK:?]",
        "x" * 300,
        [],
        {},
    ]
    fields = ["text", "temperature", "top_k", "top_p", "seed", "num_samples", "rerank", "length", "steps", "prefix"]

    def value(depth: int = 0) -> object:
        if depth > 1 or rng.random() < 0.6:
            return rng.choice(atoms)
        return [value(depth + 1) for _ in range(rng.randint(0, 3))]

    url, _, process = start("--max-texts", "8")
    statuses: Counter = Counter()
    for _ in range(count):
        payload = {rng.choice(fields): value() for _ in range(rng.randint(1, 4))}
        path = rng.choice(["/v1/infill", "/v1/generate", "/v2/models/maria/generate"])
        if rng.random() < 0.3:
            path, payload = (
                "/v2/models/maria/infer",
                {
                    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [value()]}],
                    "parameters": payload,
                },
            )
        statuses[post(url, path, payload, timeout=60)] += 1
    code, log = stopped(process)
    return {"requests": count, "statuses": dict(statuses), "exit": code, "tracebacks": log.count("Traceback")}


def queue_flood(requests: int, max_queue: int) -> dict:
    """More requests at once than the queue holds: the rest are answered 503 at once."""
    url, _, process = start("--max-queue", str(max_queue), "--max-batch-size", "2")
    statuses: Counter = Counter()
    times: list[float] = []

    def one() -> None:
        began = time.monotonic()
        status = post(url, "/v1/infill", {"text": ["a [MASK:200]"]})
        statuses.update([status])
        if status == 503:
            times.append(time.monotonic() - began)

    threads = [threading.Thread(target=one) for _ in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    code, log = stopped(process)
    return {
        "requests": requests,
        "max_queue": max_queue,
        "statuses": dict(statuses),
        "seconds_to_503_max": round(max(times), 3) if times else None,
        "exit": code,
        "tracebacks": log.count("Traceback"),
    }


def drain(requests: int) -> dict:
    """SIGTERM with requests in flight that end well within --grace: every one is answered 200, exit 0."""
    return stop_in_flight(requests, "[MASK:300]", 0.3, "--grace", "60")


def cli_fuzz(count: int, seed: int = 0) -> dict:
    """Seeded random `maria infill` and `maria generate` command lines, each a process: exit codes, and any output
    holding a traceback."""
    rng = random.Random(seed)
    values = ["0", "-1", "1e-310", "nan", "inf", str(HUGE), "2.5", "a\x1b[31m\r", "", "/nowhere", "[MASK]"]
    flags = ["--temperature", "--top-k", "--top-p", "--seed", "--num-samples", "--batch-size", "--length"]
    flags += ["--steps", "--input", "--format", "--model", "--threads", "--decoder", "--prefix"]
    texts = ["a [MASK]", "[MASK:?] b", "[MASK:0]", "x" * 5000 + " [MASK]", "\x01[MASK]", "[MASK:3-1]"]
    codes: Counter = Counter()
    tracebacks = 0
    for _ in range(count):
        command = rng.choice(["infill", "generate"])
        args = [command, *rng.sample(texts, rng.randint(0, 2))] if command == "infill" else [command]
        for _ in range(rng.randint(0, 3)):
            args += [rng.choice(flags), rng.choice(values)]
        run = subprocess.run(
            [sys.executable, "-m", "maria_onnx.cli", *args, "--device", "cpu"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        codes[run.returncode] += 1
        tracebacks += "Traceback" in run.stdout + run.stderr
    return {"commands": count, "exit_codes": dict(codes), "tracebacks": tracebacks, "exit": 0}


def grpc_fuzz(count: int, seed: int = 0) -> dict:
    """Seeded random ModelInfer messages (inputs, datatypes, shapes, parameters of every size): their status codes;
    UNKNOWN or INTERNAL would be the server's own failure."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb  # the protocol's messages, as a client has them

    rng = random.Random(seed)
    _, address, process = start(grpc=True)
    assert address is not None, "a server started with gRPC announces its address"
    codes: Counter = Counter()
    with grpc.insecure_channel(address) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        for _ in range(count):
            message = pb.ModelInferRequest(model_name=rng.choice(["maria", "other", ""]))
            tensor = message.inputs.add(name=rng.choice(["text", "seed", "x"]), datatype=rng.choice(["BYTES", "INT64"]))
            tensor.shape.extend(rng.choice([[1], [2], [], [1, 1], [2**40]]))
            if tensor.datatype == "BYTES":
                tensor.contents.bytes_contents.extend(rng.choice([[b"a [MASK]"], [b"\xff"], [], [b"[MASK:0]"] * 2]))
            else:
                tensor.contents.int64_contents.extend(rng.choice([[1], [-(2**63)], [2**63 - 1], []]))
            for name in rng.sample(["temperature", "seed", "top_k", "timeout", "binary_data_output", "x"], 2):
                parameter = message.parameters[name]
                choice = rng.random()
                if choice < 0.4:
                    parameter.int64_param = rng.choice([0, -1, 2**63 - 1, -(2**63)])
                elif choice < 0.7:
                    parameter.double_param = rng.choice([0.5, 1e308, -1e-310, float("nan")])
                else:
                    parameter.string_param = rng.choice(["", "x" * 1000, "\x00"])
            try:
                infer(message, timeout=60)
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
    code, log = stopped(process)
    return {"messages": count, "codes": dict(codes), "exit": code, "tracebacks": log.count("Traceback")}


def export_kills(kills: int, seed: int = 0) -> dict:
    """`maria export --overwrite` of tiny backbones over a bundle, SIGKILLed at seeded random times: after each
    kill a bundle is at the target or set aside for the next export to restore; then one export runs whole."""
    import tempfile

    from .tiny import make_checkpoint, make_pair

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        checkpoint = make_checkpoint(*make_pair(root / "backbones"), root / "checkpoint")
        command = [sys.executable, "-m", "maria_onnx.cli", "export", str(checkpoint), "--out", str(root / "bundle")]
        subprocess.run(command, check=True, capture_output=True, timeout=600)
        found: Counter = Counter()
        for _ in range(kills):
            process = subprocess.Popen([*command, "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.5, 6.0))
            process.kill()
            process.wait(timeout=60)
            aside = list(root.glob(".bundle.partial-*.old"))
            found[
                "bundle in place" if (root / "bundle" / "maria.json").is_file() else "set aside" if aside else "lost"
            ] += 1
        last = subprocess.run([*command, "--overwrite"], capture_output=True, text=True, timeout=600)
        left = sorted(p.name for p in root.iterdir() if p.name.startswith(".bundle"))
    return {
        "kills": kills,
        "after_each": dict(found),
        "last_export": last.returncode,
        "left_over": left,
        "exit": 0,
        "tracebacks": last.stderr.count("Traceback"),
    }


def soak(seconds: float, clients: int) -> dict:
    """`clients` clients sending requests back to back for `seconds`: the server's resident memory over time."""
    url, _, process = start("--max-batch-size", "8")
    stop_at = time.monotonic() + seconds
    statuses: Counter = Counter()

    def client() -> None:
        while time.monotonic() < stop_at:
            statuses.update([post(url, "/v1/infill", {"text": ["The [MASK] statement is used to [MASK:4] it."]})])

    def resident() -> int:
        status = Path(f"/proc/{process.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) // 1024

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    samples = []
    while time.monotonic() < stop_at:
        samples.append(resident())
        time.sleep(min(2.0, max(0.0, stop_at - time.monotonic())))
    for thread in threads:
        thread.join(timeout=120)
    samples.append(resident())
    code, log = stopped(process)
    return {
        "seconds": seconds,
        "clients": clients,
        "statuses": dict(statuses),
        "rss_mib_first_last_max": [samples[0], samples[-1], max(samples)],
        "exit": code,
        "tracebacks": log.count("Traceback"),
    }


def abuse(out: Path, rounds: int = 1) -> dict:
    report: dict = {"rounds": []}
    for number in range(rounds):
        found = {
            "slow_clients": slow_clients(half=200, max_connections=64, normal=20),
            "left_mid_upload": left_mid_upload(100),
            "oversized_bodies": oversized(15),
            "large_numbers": large_numbers(),
            "stop_past_grace": stop_past_grace(16),
            "fuzz": fuzz(500, seed=number),
            "queue_flood": queue_flood(64, 8),
            "drain": drain(16),
            "cli_fuzz": cli_fuzz(200, seed=number),
            "grpc_fuzz": grpc_fuzz(300, seed=number),
            "export_kills": export_kills(8, seed=number),
            "soak": soak(60, 16),
        }
        report["rounds"].append(found)
        print(f"round {number + 1}: {json.dumps(found)}", flush=True)
    write_json(Path(out), report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    abuse(args.out, args.rounds)


if __name__ == "__main__":
    run_main(main)
