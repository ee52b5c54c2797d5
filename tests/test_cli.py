"""`maria infill` and `maria export` through the CLI: output formats and one-line errors for bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from maria_onnx.cli import app

runner = CliRunner()


def infill(*args, input=None):
    return runner.invoke(app, ["infill", *map(str, args)], input=input)


def test_infill_json_output(bundles):
    result = infill("The [MASK] is [MASK:2].", "plain text", "--model", bundles["olmo"], "--json")
    assert result.exit_code == 0, result.output
    first, second = [json.loads(line) for line in result.stdout.splitlines()]
    assert first["masked_positions"] and len(first["fills"]) == len(first["fill_logprobs"]) == 3
    assert all(p < 0 for p in first["fill_logprobs"])
    assert second["text"] == "plain text" and "unchanged" in second["note"]


def test_infill_reads_files_and_stdin(bundles, tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a [MASK] b"}\n{"text": "c [MASK:2]"}\n')
    result = infill("--input", tmp_path / "in.jsonl", "--model", bundles["olmo"])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2
    result = infill("--input", "-", "--model", bundles["olmo"], "--batch-size", "1", input="x [MASK]\n\ny [MASK]\n")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2


def test_infill_json_keeps_each_input_lines_number_and_fields(bundles, tmp_path):
    (tmp_path / "in.jsonl").write_text(
        '{"text": "a [MASK] b", "id": "x1", "tags": [1]}\n\n{"txt": "no"}\n{"id": 2, "text": "c [MASK:2]"}\n'
    )
    result = infill("--input", tmp_path / "in.jsonl", "--model", bundles["olmo"], "--json", "--skip-invalid")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(row["line"], row["id"], row["input"]) for row in rows] == [(1, "x1", "a [MASK] b"), (4, 2, "c [MASK:2]")]
    assert rows[0]["tags"] == [1] and list(rows[0])[:3] == ["line", "id", "tags"] and len(rows[1]["fills"]) == 2
    result = infill(
        "--input",
        "-",
        "--model",
        bundles["olmo"],
        "--json",
        "--num-samples",
        "2",
        "--temperature",
        "1",
        input="x [MASK]\n\ny [MASK]\n",
    )
    assert [json.loads(line)["line"] for line in result.stdout.splitlines()] == [1, 1, 3, 3]
    result = infill("x [MASK]", "--model", bundles["olmo"], "--json")  # arguments: no line numbers
    assert "line" not in json.loads(result.stdout)
    (tmp_path / "clash.jsonl").write_text('{"text": "a [MASK]", "id": 1}\n{"text": "b [MASK]", "score": 0.5}\n')
    result = infill("--input", tmp_path / "clash.jsonl", "--model", bundles["olmo"], "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert "clash.jsonl:2 has the field 'score', which --json writes with the result; rename it" in result.output
    result = infill("--input", tmp_path / "clash.jsonl", "--model", bundles["olmo"])  # plain output: no clash
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2


def test_export_then_infill_from_the_cli(checkpoints, tmp_path):
    result = runner.invoke(app, ["export", str(checkpoints["olmo2"]), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "maria.json").is_file()
    if sys.platform == "linux":  # each stage's time and peak resident memory
        peaks = re.findall(
            r"validating every graph against PyTorch \(\d+\.\ds, peak (\d+\.\d\d) GB\)", " ".join(result.output.split())
        )
        assert len(peaks) == 1 and 0 < float(peaks[0]) < 64
    result = infill("Fill [MASK] here.", "--model", tmp_path / "b", "--device", "cpu")
    assert result.exit_code == 0 and result.stdout.startswith("Fill") and result.stdout.rstrip().endswith("here.")


def broken(bundles, tmp_path, how):
    folder = shutil.copytree(bundles["olmo"], tmp_path / "bundle")
    if how == "incomplete":
        (folder / "ar_decoder.onnx").unlink()
    if how == "checksum":
        data = bytearray((folder / "mlm.onnx").read_bytes())
        data[100] ^= 1
        (folder / "mlm.onnx").write_bytes(bytes(data))
    if how == "newer":
        manifest = json.loads((folder / "maria.json").read_text())
        (folder / "maria.json").write_text(json.dumps({**manifest, "schema_version": 7}))
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["   "], "the text is empty"),
        (["word " * 600 + "[MASK]"], "over the bundle's maximum of 510"),
        (
            ["word " * 20_000 + "[MASK]"],
            "the text is far over the bundle's maximum of 510 tokens (its first 16,320 characters alone make",
        ),
        (["[MASK:500] " * 3], "over the bundle's maximum of 510 tokens: 1000 to the end of its marker at character 11"),
        (["a [MASK:0] b"], "'[MASK:0]' asks for 0 tokens"),
        (["a [MASK:100000] b"], "asks for 100000 tokens; ask for 1 to 510"),
        (["a [MASK:1-" + "9" * 5000 + "] b"], "'[MASK:1-999999999999999999999"),  # int() refuses 4,301 digits
        (["a [MASK:1-" + "9" * 5000 + "] b"], "asks for a 5,000-digit number of tokens; ask for 1 to 510"),
        (["a [MASK:1-" + "9" * 30 + "] b"], "asks for a 30-digit number of tokens"),
        (["a [MASK]", "--temperature", "-1"], "temperature must be"),
        (["a [MASK]", "--top-k", "-3"], "top-k must be"),
        (["a [MASK]", "--top-p", "1.5"], "top-p must be in (0, 1]"),
        (["a [MASK]", "--device", "tpu"], "--device must be one of"),
        (["--input", "/no/such/file.txt"], "cannot read --input /no/such/file.txt"),
        ([], "no text given"),
    ],
)
def test_bad_infill_input_is_one_clear_line(bundles, args, message):
    result = infill(*args, "--model", bundles["olmo"])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "how, message",
    [
        ("incomplete", "ar_decoder.onnx is missing"),
        ("checksum", "mlm.onnx fails its sha256 check"),
        ("newer", "schema 7, newer than the 4 this maria-onnx reads"),
    ],
)
def test_bad_bundles_are_refused(bundles, tmp_path, how, message):
    result = infill("a [MASK]", "--model", broken(bundles, tmp_path, how))
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_missing_bundle_and_bad_utf8(tmp_path, bundles):
    result = infill("a [MASK]", "--model", tmp_path / "none")
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "bad.txt").write_bytes(b"ok [MASK]\n\xff\xfe\n")
    result = infill("--input", tmp_path / "bad.txt", "--model", bundles["olmo"])
    assert result.exit_code == 2 and "is not valid UTF-8 (byte 10)" in result.output


def test_the_decoder_switch_from_the_cli(bundles):
    engine = infill("a [MASK] b [MASK:2] c", "--model", bundles["llama"], "--json")
    concat = infill("a [MASK] b [MASK:2] c", "--model", bundles["llama"], "--json", "--decoder", "concat")
    assert engine.exit_code == concat.exit_code == 0
    a, b = json.loads(engine.stdout), json.loads(concat.stdout)
    np.testing.assert_allclose(a.pop("fill_logprobs"), b.pop("fill_logprobs"), atol=1e-4)
    assert a == b
    result = infill("a [MASK]", "--decoder", "concat")  # the shipped model carries the engine's graph only
    assert result.exit_code == 2 and "needs ar_decoder.onnx" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_reader_that_leaves_early_stops_the_fill_quietly(bundles, tmp_path):
    """`maria infill ... | head -1`: no error line, and the status a shell gives a tool stopped by SIGPIPE."""
    (tmp_path / "in.txt").write_text("".join(f"Text {i} with a [MASK] in it.\n" for i in range(400)))
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cli import app; app()",
            "infill",
            "--json",
            "--input",
            str(tmp_path / "in.txt"),
            "--model",
            str(bundles["olmo"]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    assert json.loads(process.stdout.readline())["input"] == "Text 0 with a [MASK] in it."
    process.stdout.close()  # 400 JSON lines are more than a pipe holds
    assert process.wait(timeout=300) == 141 and process.stderr.read().decode() == ""


def test_results_are_printed_chunk_by_chunk_as_they_are_filled(bundles, tmp_path, monkeypatch, capsys):
    """A long input's first results are out before the rest is filled, and chunking changes no result."""
    from maria_onnx.console.fill import CHUNK_BATCHES
    from maria_onnx.runtime.infiller import Infiller

    lines = "".join(f"Line {i} has a [MASK] to fill.\n" for i in range(3 * CHUNK_BATCHES + 1))
    (tmp_path / "in.txt").write_text(lines)
    whole = infill(
        "--input",
        tmp_path / "in.txt",
        "--model",
        bundles["olmo"],
        "--batch-size",
        "64",
        "--temperature",
        "1",
        "--seed",
        "4",
    )
    assert whole.exit_code == 0 and len(whole.stdout.splitlines()) == 3 * CHUNK_BATCHES + 1
    calls, printed, fill = [], [], Infiller.infill_requests

    def counted(self, requests, *args, **kwargs):
        printed.append(capsys.readouterr().out)  # what was out before this chunk was filled
        calls.append((len(requests[0].texts), len(printed[-1].splitlines())))
        return fill(self, requests, *args, **kwargs)

    monkeypatch.setattr(Infiller, "infill_requests", counted)
    with pytest.raises(SystemExit) as ended:
        app(
            [
                "infill",
                "--input",
                str(tmp_path / "in.txt"),
                "--model",
                str(bundles["olmo"]),
                "--batch-size",
                "1",
                "--temperature",
                "1",
                "--seed",
                "4",
            ]
        )
    assert ended.value.code == 0
    chunk = CHUNK_BATCHES  # texts per chunk at batch size 1
    assert calls == [(chunk, 0), (chunk, chunk), (chunk, chunk), (1, chunk)]
    assert "".join(printed) + capsys.readouterr().out == whole.stdout


def line_within(stream, seconds: float = 120) -> str:
    """The next line the process writes, or a failure once `seconds` pass without one."""
    import select

    assert select.select([stream], [], [], seconds)[0], f"no output within {seconds} s"
    return stream.readline().decode()


def test_a_stream_is_filled_as_its_lines_come(bundles, tmp_path):
    """From stdin (or a FIFO), each line is filled while the writer still holds the input open: its result comes
    before the next line is written. A bad line stops the run with one line saying what was written before it."""
    command = [
        sys.executable,
        "-c",
        "from cli import app; app()",
        "infill",
        "--json",
        "--model",
        str(bundles["olmo"]),
        "--device",
        "cpu",
    ]
    process = subprocess.Popen(
        [*command, "--input", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    try:
        for number, text in enumerate(["a [MASK] b", "c [MASK:2] d"], 1):
            process.stdin.write(f"{text}\n".encode())
            process.stdin.flush()
            result = json.loads(line_within(process.stdout))
            assert (result["line"], result["input"]) == (number, text)
        process.stdin.write(b"e [MASK:0] f\ng [MASK]\n")
        process.stdin.close()
        assert process.wait(timeout=120) == 2 and process.stdout.read() == b""
        error = process.stderr.read().decode()
        assert error.startswith("error: stdin:3: '[MASK:0]' asks for 0 tokens") and error.count("\n") == 1
        assert error.endswith(
            "(--skip-invalid fills the other lines); the output holds only what was filled before it (2 results)\n"
        )
    finally:
        process.kill()
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    process = subprocess.Popen(
        [*command, "--input", str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    try:
        with open(fifo, "w") as writer:  # a FIFO is read once, as it comes, never twice
            writer.write("h [MASK] i\n")
            writer.flush()
            assert json.loads(line_within(process.stdout))["input"] == "h [MASK] i"
            writer.write("j [MASK]\n")
        assert process.wait(timeout=120) == 0, process.stderr.read()
        assert json.loads(process.stdout.read())["line"] == 2
    finally:
        process.kill()


def test_input_is_read_a_piece_at_a_time_as_whole_text_would_be():
    """runtime.readers.StreamLines, whatever the size of the pieces it reads, gives the lines that splitting the
    whole decoded input gives (blank lines, a byte order mark, carriage returns, JSONL errors), and names the
    first invalid byte by its offset in the input, as decoding the whole would."""
    import io
    import random

    from maria_onnx.runtime.readers import StreamLines, decode_utf8, read_lines

    pieces = ["a", " ", "\n", "\r", "\u00e9", "\U0001f600", "\u2028", "{", "}", '"text"', ":", '"x"', "\x0c"]
    rng = random.Random(0)
    for _ in range(400):
        data = b"\xef\xbb\xbf" * (rng.random() < 0.3) + "".join(rng.choices(pieces, k=rng.randint(0, 30))).encode()
        if rng.random() < 0.3:
            at = rng.randint(0, len(data))
            data = data[:at] + b"\xff" + data[at:]
        jsonl = rng.random() < 0.5
        try:
            want = read_lines(decode_utf8(data, "in"), "in", jsonl)
        except ValueError as error:
            want = str(error)
        for size in (1, 3, 1 << 16):
            stream = StreamLines(io.BytesIO(data), "in", jsonl)
            stream.PIECE = size
            try:
                got = list(stream)
            except ValueError as error:
                got = str(error)
            assert got == want, (data, size)


def test_many_samples_of_a_text_are_filled_and_printed_a_chunk_at_a_time(bundles, monkeypatch, capsys):
    """More samples of one text than a chunk holds go through the model a chunk at a time, each printed before
    the next is filled (memory stays bounded whatever --num-samples asks), with the results of one piece; with
    --rerank a text's samples are printed once its last piece is filled, ordered by score as when all are
    filled at once."""
    from maria_onnx.console.fill import CHUNK_BATCHES
    from maria_onnx.runtime.infiller import Infiller

    samples, args = 2 * CHUNK_BATCHES + 3, ["--model", str(bundles["olmo"]), "--temperature", "1", "--seed", "4"]
    texts = ["a [MASK] b", "The [MASK:2] c"]
    whole = infill(*texts, "--num-samples", samples, "--batch-size", "64", *args)
    lines = whole.stdout.split("\n")  # a random model's fills may hold a form feed
    assert whole.exit_code == 0 and len(lines) == 2 * samples + 1
    ranked = infill(*texts, "--num-samples", samples, "--batch-size", "64", "--rerank", "--json", *args)
    assert ranked.exit_code == 0
    calls, printed, fill = [], [], Infiller.infill_requests

    def counted(self, requests, *rest, **kwargs):
        printed.append(capsys.readouterr().out)  # what was out before this piece was filled
        calls.append(
            (len(requests[0].texts), requests[0].first_sample, requests[0].num_samples, printed[-1].count("\n"))
        )
        return fill(self, requests, *rest, **kwargs)

    monkeypatch.setattr(Infiller, "infill_requests", counted)
    chunk = CHUNK_BATCHES  # samples per piece at batch size 1
    for rerank in ([], ["--rerank", "--json"]):
        calls.clear(), printed.clear()
        with pytest.raises(SystemExit) as ended:
            app(["infill", *texts, "--num-samples", str(samples), "--batch-size", "1", *args, *rerank])
        assert ended.value.code == 0
        out = "".join(printed) + capsys.readouterr().out
        if rerank:
            pieces = [(1, 0, chunk, 0), (1, chunk, chunk, 0), (1, 2 * chunk, 3, 0)]
            assert calls == [*pieces, *[(t, f, n, samples * (f == 0)) for t, f, n, _ in pieces]]
            got, want = [[json.loads(row) for row in text.splitlines()] for text in (out, ranked.stdout)]
            assert [(r["input"], r["text"]) for r in got] == [(r["input"], r["text"]) for r in want]
            np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], atol=1e-4)
            for text in texts:
                scores = [r["score"] for r in got if r["input"] == text]
                assert len(scores) == samples and scores == sorted(scores, reverse=True)
        else:
            pieces = [(1, chunk, chunk, chunk), (1, 2 * chunk, 3, chunk)]  # (texts, first, samples, lines out)
            assert calls == [(1, 0, chunk, 0), *pieces, (1, 0, chunk, 3), *pieces]
            assert out == whole.stdout


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
@pytest.mark.parametrize("command", [["infill", "a [MASK]"], ["generate", "--length", "2", "--steps", "1"]])
def test_output_that_cannot_be_written_is_one_line(bundles, command):
    """A full disk (here /dev/full) gets the system's reason in one line naming stdout, without '[Errno 28]' or a
    traceback."""
    with open("/dev/full", "w") as full:
        process = subprocess.run(
            [
                sys.executable,
                "-c",
                "from cli import app; app()",
                *command,
                "--model",
                str(bundles["olmo"]),
                "--device",
                "cpu",
            ],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
            timeout=300,
        )
    assert process.returncode == 2, process.stderr
    assert process.stderr == "error: stdout: No space left on device; the output is incomplete\n"


def test_version_names_the_package_onnx_runtime_cuda_and_python(monkeypatch):
    import platform
    from importlib import metadata

    import onnxruntime

    from maria_onnx.runtime import sessions

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    package, runtime, cuda, cpus, model, python = result.stdout.splitlines()
    assert package == f"maria-onnx {metadata.version('maria-onnx')}"
    assert onnxruntime.__version__ in runtime and "CPUExecutionProvider" in runtime
    assert cuda == f"CUDA: {sessions.cuda_missing() or 'ready'}" and platform.python_version() in python
    assert cpus.startswith(f"CPUs: {sessions.usable_cpus()} of {os.cpu_count()} usable") and "--threads" in cpus
    assert model.startswith("shipped model: fp32, quantization none")
    monkeypatch.setattr(sessions, "cuda_missing", lambda: "the CUDA library libcublasLt.so.13 cannot be loaded")
    assert "CUDA: the CUDA library libcublasLt.so.13" in runner.invoke(app, ["--version"]).stdout
