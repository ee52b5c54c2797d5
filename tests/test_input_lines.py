"""Every bad input is one line and nothing is lost: input lines and files, texts, arguments, fuzzed texts."""

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from commands import cli, one_line_error

from maria_onnx.console.outputs import NEWLINES, shown
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.default_model import DEFAULT_MODEL
from maria_onnx.runtime.infiller import Infilled, Infiller

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def default():
    return Infiller(DEFAULT_MODEL, device="cpu")


def test_an_interrupted_infill_says_its_output_is_incomplete(tmp_path):
    """Ctrl-C while results stream out: one line saying so, so a redirected output is not taken for complete."""
    (tmp_path / "in.txt").write_text("".join(f"Use the [MASK] module {i} to [MASK:3] files.\n" for i in range(20_000)))
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "infill",
            "--input",
            str(tmp_path / "in.txt"),
            "--device",
            "cpu",
            "--batch-size",
            "2",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout.readline().startswith("Use the")  # results are streaming
        process.send_signal(signal.SIGINT)
        rest, stderr = process.stdout.read(), process.stderr.read()
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and 1 + len(rest.splitlines()) < 20_000, stderr
    assert stderr.strip() == "error: interrupted before every result was written; the output is incomplete"


def test_separators_inside_a_line_do_not_split_it(tmp_path):
    (tmp_path / "in.txt").write_text("a [MASK] b\u2028c\nd\x0ce [MASK]\nf\x85g [MASK]\n")
    result = cli("infill", "--input", tmp_path / "in.txt", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split("\n")) == 4 and result.stdout.endswith("\n")  # 3 lines in, 3 out


def test_a_newline_inside_a_fill_is_escaped_in_plain_text():
    result = Infilled(
        input="a [MASK] b",
        text="a\n b",
        ids=[1, 2, 3],
        masked_positions=[1],
        fill_logprobs=[-1.0],
        fills=["\n"],
        segments=[("a", False), ("\n", True), (" b", False)],
    )
    plain, styled, as_json = (
        shown(result, as_json=False, styled=False, kept={}),
        shown(result, as_json=False, styled=True, kept={}),
        shown(result, as_json=True, styled=False, kept={}),
    )
    assert plain == "a\\n b" and "\\n" in styled and json.loads(as_json)["fills"] == ["\n"]
    assert "\n".translate(NEWLINES) == "\\n"


def test_jsonl_is_found_by_suffix_or_format_and_a_mismatch_is_refused(tmp_path):
    line = '{"text": "a [MASK] b"}\n'
    for name in ("in.JSONL", "in.ndjson"):
        (tmp_path / name).write_text(line)
        result = cli("infill", "--input", tmp_path / name, "--device", "cpu", "--json")
        assert result.exit_code == 0 and json.loads(result.stdout)["input"] == "a [MASK] b", result.output
    result = cli("infill", "--input", "-", "--format", "jsonl", "--device", "cpu", "--json", input=line)
    assert result.exit_code == 0 and json.loads(result.stdout)["input"] == "a [MASK] b"
    one_line_error(cli("infill", "--input", "-", "--device", "cpu", input=line), "looks like JSONL; pass --format")
    result = cli("infill", "--input", "-", "--format", "text", "--device", "cpu", input=line)
    assert result.exit_code == 0 and result.stdout.startswith('{"text":')
    one_line_error(cli("infill", "--input", "-", "--format", "xml", input=line), "--format must be text or jsonl")


def test_a_byte_order_mark_is_not_text(tmp_path):
    """A file saved with a UTF-8 byte order mark (as Windows editors write) fills as the same file without it."""
    for name, line in [("in.txt", "Use the [MASK] module."), ("in.jsonl", '{"text": "Use the [MASK] module."}')]:
        (tmp_path / name).write_bytes(line.encode())
        (tmp_path / f"bom-{name}").write_bytes(b"\xef\xbb\xbf" + line.encode())
        plain, marked = (
            cli("infill", "--input", tmp_path / n, "--device", "cpu", "--json") for n in (name, f"bom-{name}")
        )
        assert marked.exit_code == 0 and marked.stdout == plain.stdout, marked.output
        assert json.loads(marked.stdout)["input"] == "Use the [MASK] module."
    (tmp_path / "bad.txt").write_bytes(b"\xef\xbb\xbfab\xff")
    one_line_error(cli("infill", "--input", tmp_path / "bad.txt"), "bad.txt is not valid UTF-8 (byte 5)")


def test_an_input_without_text_says_so(tmp_path):
    (tmp_path / "blank.txt").write_text("\n  \n")
    for source, stdin in [(tmp_path / "blank.txt", None), ("-", "")]:
        result = cli("infill", "--input", source, "--device", "cpu", input=stdin)
        assert result.exit_code == 0 and result.stdout == ""
        assert "holds no text (no line but blank ones); nothing to fill" in result.stderr


def test_a_bad_line_is_named_and_skip_invalid_keeps_the_rest(tmp_path):
    (tmp_path / "in.txt").write_text("a [MASK] b\n\nc [MASK:0] d\ne [MASK] f\n")
    one_line_error(cli("infill", "--input", tmp_path / "in.txt", "--device", "cpu"), "in.txt:3: '[MASK:0]' asks")
    result = cli("infill", "--input", tmp_path / "in.txt", "--device", "cpu", "--skip-invalid")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 2 and "in.txt:3" in result.stderr
    assert result.stderr.count("skipped: ") == 1  # the file is read twice, the line told once
    (tmp_path / "in.jsonl").write_text('{"text": "a [MASK]"}\n{"txt": "b"}\nnot json\n{"text": "c [MASK]"}\n')
    one_line_error(
        cli("infill", "--input", tmp_path / "in.jsonl", "--device", "cpu"), "in.jsonl:2 has no string field 'text'"
    )
    result = cli("infill", "--input", tmp_path / "in.jsonl", "--device", "cpu", "--skip-invalid", "--json")
    assert [json.loads(x)["input"] for x in result.stdout.splitlines()] == ["a [MASK]", "c [MASK]"]
    assert "in.jsonl:2" in result.stderr and "in.jsonl:3 is not valid JSON" in result.stderr
    (tmp_path / "twice.jsonl").write_text('{"text": "a [MASK]"}\n{"text": "b [MASK]", "text": "c [MASK]"}\n')
    one_line_error(
        cli("infill", "--input", tmp_path / "twice.jsonl", "--device", "cpu"),
        "twice.jsonl:2 repeats the key 'text' in one object; give each key once",
    )
    for depth in (200, 5000):  # every Python parses 200 levels; 5,000 only from 3.13 on
        (tmp_path / "deep.jsonl").write_text('{"text": "a [MASK]"}\n{"text": ' + "[" * depth + "]" * depth + "}\n")
        one_line_error(
            cli("infill", "--input", tmp_path / "deep.jsonl", "--device", "cpu"),
            "deep.jsonl:2 nests arrays or objects more than 128 deep; send flatter JSON",
        )
    (tmp_path / "at-limit.jsonl").write_text('{"text": "a [MASK]", "meta": ' + "[" * 127 + "]" * 127 + "}\n")
    result = cli("infill", "--input", tmp_path / "at-limit.jsonl", "--device", "cpu")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1, result.output


def test_a_string_is_not_a_list_of_texts(default):
    with pytest.raises(ValueError, match="got a single string; pass \\[text\\]"):
        default.infill("a [MASK] b")


def test_a_text_far_over_the_maximum_is_refused_without_tokenizing_all_of_it(default):
    """A whole file on one line, or a 1 MB request of [MASK:2046] markers, is refused from its start: the
    tokenizer never takes more than 32 characters per token allowed, and no more ids are made than allowed."""
    from maria_onnx.runtime.text import encode_masked_text

    taken = []

    class Spy:
        def encode(self, text, add_special_tokens):
            taken.append(len(text))
            return default.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    maximum = default.manifest.max_sequence_length
    with pytest.raises(ValueError, match=f"far over the bundle's maximum of {maximum} tokens"):
        encode_masked_text("word " * 2_000_000 + "[MASK]", Spy(), default.special.mask, maximum)
    assert max(taken) == 32 * maximum
    with pytest.raises(
        ValueError,
        match=f"over the bundle's maximum of {maximum} tokens: {maximum + 1} to the end of its marker at character 11",
    ):
        encode_masked_text(f"[MASK:{maximum}][MASK]" * 90_000, Spy(), default.special.mask, maximum)
    text = "word " * 1000 + "[MASK]"  # long, under the maximum: tokenized whole as before
    assert (
        encode_masked_text(text, Spy(), default.special.mask, maximum).ids.size
        == encode_masked_text(text, default.tokenizer, default.special.mask, maximum).ids.size
    )


# -- sampling: a text's samples do not depend on its batch ---------------------------------------------------


def test_a_special_tokens_spelling_in_the_text_is_text(default):
    """ "[SEP]" or "<|endoftext|>" typed in a text are its characters: the model never sees a separator or an end of
    text there, and the filled text gives them back as typed."""
    special = {token.content for token in default.tokenizer.get_added_tokens_decoder().values() if token.special}
    assert {"[SEP]", "<|endoftext|>", "[CLS]", "[MASK]"} <= special
    text = "Split on [SEP] or <|endoftext|> and [CLS], then [MASK] the rest."
    result = default.infill([text])[0]
    special_ids = {default.tokenizer.token_to_id(token) for token in special}
    assert not special_ids & set(result.ids)
    fill = result.fills[0]
    assert result.text == f"Split on [SEP] or <|endoftext|> and [CLS], then{fill} the rest."
    from transformers import PreTrainedTokenizerFast

    from maria_onnx.runtime.text import plain_encoder

    hf = PreTrainedTokenizerFast(tokenizer_file=str(DEFAULT_MODEL / "tokenizer.json"))  # training reads text alike
    assert not special_ids & set(plain_encoder(hf)(text))
    assert special_ids & set(hf.encode(text, add_special_tokens=False))  # and leaves the tokenizer as it was


def test_samples_do_not_depend_on_the_batch(default):
    texts = [f"Use the [MASK] module to [MASK:2] files number {i}." for i in range(10)]
    sampling = Sampling(temperature=1.0, seed=5)
    by_4 = default.infill(texts, sampling, batch_size=4, num_samples=2)
    by_8 = default.infill(texts, sampling, batch_size=8, num_samples=2)
    assert [r.ids for r in by_4] == [r.ids for r in by_8]
    alone = default.infill([texts[7]], sampling, num_samples=2, indices=[7])
    assert [r.ids for r in alone] == [r.ids for r in by_4[14:16]]
    assert len({tuple(r.ids) for r in by_4}) > 10  # the samples do differ from one another


def test_greedy_samples_are_said_to_be_identical():
    result = cli("infill", "a [MASK] b", "--num-samples", "3", "--device", "cpu")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 3
    assert result.stderr.count("samples of each text are identical") == 1


# -- manifests: checked against the graphs, every file checksummed, fields typed ---------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["infill", "a [MASK] \udcff"], "not valid Unicode"),
        (["infill", "a [MASK:x] b"], "'[MASK:x]' is not a marker"),
        (["infill", "a [MASK: 2] b"], "'[MASK: 2]' is not a marker"),
        (["infill", "a [MASK]", "--seed", "-1"], "--seed must be a non-negative integer"),
        (["infill", "a [MASK]", "--model", "cli.py"], "is a file; a bundle is the folder"),
        (["infill", "a [MASK]", "--device", "cuda"], "--device cuda: "),
        (["eval", "README.md", "--json", "docs"], "--json docs is a folder; give a file path, e.g. docs/eval.json"),
        (
            ["eval", "README.md", "--json", "nowhere/eval.json"],
            "--json nowhere/eval.json: the folder nowhere does not "
            "exist; create it or give a path in an existing folder",
        ),
        (["bench", "--model", "runtime/default_model", "--shapes", "paper"], "--model with --shapes: the PyTorch"),
        (
            ["train", "--mlm", "x", "--ar", "y", "--data", "README.md", "--out", "never", "--learning-rate", "inf"],
            "--learning-rate must be a positive number, got inf",
        ),
    ],
)
def test_bad_arguments_get_one_line_before_any_work(args, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    one_line_error(cli(*args), message)


def test_invalid_utf8_in_an_argument_is_one_line():
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "infill", b"a [MASK] \xff", "--device", "cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "not valid Unicode" in result.stderr and "Traceback" not in result.stderr


def test_help_shows_flags_as_flags():
    result = cli("export", "--help")
    assert "--int8 " in result.output and "<bool>" not in result.output


def fuzz_texts(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    pieces = [
        "[MASK]",
        "[MASK:2]",
        "[MASK:0]",
        "[MASK:99999]",
        "[MASK:-1]",
        "[MASK:x]",
        "[MASK",
        "MASK]",
        "[",
        "]",
        " ",
        "\t",
        "\r",
        "\x00",
        "\x0c",
        "\x1b",
        "\u2028",
        "\u2029",
        "\x85",
        "\ufeff",
        "\ud800",
        "\udfff",
        "é",
        "漢字",
        "🙂",
        "\u0301",
        "word",
        " the",
        "import",
        "{",
        '"text"',
        "\\",
        "\n",
    ]
    return ["".join(rng.choice(pieces, size=rng.integers(0, 12))) for _ in range(count)]


def test_fuzzed_texts_fill_or_raise_value_error(default):
    outcomes = {"filled": 0, "refused": 0}
    for text in fuzz_texts(300, seed=0):
        try:
            default.infill([text])
            outcomes["filled"] += 1
        except ValueError:
            outcomes["refused"] += 1
    assert outcomes["filled"] > 20 and outcomes["refused"] > 20


def test_fuzzed_texts_never_give_the_cli_a_traceback(tmp_path):
    texts = [t.replace("\n", " ") for t in fuzz_texts(300, seed=1)]
    for text in texts[:25]:
        result = cli("infill", text, "--device", "cpu")
        assert result.exit_code in (0, 2) and "Traceback" not in result.output, (text, result.output)
    (tmp_path / "in.txt").write_text("\n".join(texts), encoding="utf-8", errors="surrogatepass")
    result = cli("infill", "--input", tmp_path / "in.txt", "--device", "cpu", "--skip-invalid")
    assert result.exit_code in (0, 2) and "Traceback" not in result.output


def test_a_jsonl_line_python_alone_would_read_is_a_bad_line_and_the_output_stays_strict_json(tmp_path):
    """An integer of 5,000 digits stopped the whole run with Python's own advice, even with --skip-invalid; NaN and
    Infinity were read and echoed into --json output, which strict JSON parsers refuse."""
    lines = [
        {"text": "a [MASK]", "id": 1},
        '{"text": "b [MASK]", "id": ' + "7" * 5000 + "}",
        '{"text": "c [MASK]", "score_in": NaN}',
        '{"text": "d [MASK]", "weight": -Infinity}',
        {"text": "e [MASK]", "id": 5},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    stopped = cli("infill", "--input", path, "--json", "--device", "cpu")
    one_line_error(stopped, f"{path}:2 holds an integer of 5,000 digits; send at most 1000")
    result = cli("infill", "--input", path, "--json", "--skip-invalid", "--device", "cpu")
    assert result.exit_code == 0, result.output
    strict = [json.loads(line, parse_constant=lambda name: pytest.fail(name)) for line in result.stdout.splitlines()]
    assert [row["line"] for row in strict] == [1, 5] and [row["id"] for row in strict] == [1, 5]
    assert f"skipped: {path}:3 holds NaN, which is not JSON" in result.stderr
    assert f"skipped: {path}:4 holds -Infinity, which is not JSON" in result.stderr


def test_memory_follows_the_texts_not_the_batch_size(monkeypatch):
    """One text with --batch-size 1000000 sized the engine for a million rows (153 GiB, a traceback); the engine
    now has the rows there are. A failed allocation is one line and exit 2."""
    slots = []
    new_decoder = Infiller.new_decoder
    monkeypatch.setattr(Infiller, "new_decoder", lambda self, n: slots.append(n) or new_decoder(self, n))
    result = cli("infill", "The [MASK] statement is used to [MASK] an exception.", "--batch-size", 1_000_000)
    assert result.exit_code == 0 and result.stdout == "The following statement is used to raise an exception.\n"
    assert slots == [1]
    monkeypatch.setattr(Infiller, "new_decoder", lambda self, n: (_ for _ in ()).throw(MemoryError("153. GiB")))
    one_line_error(cli("infill", "a [MASK]", "--device", "cpu"), "out of memory: the work does not fit this machine")


def test_control_characters_of_the_input_are_shown_escaped_in_errors(tmp_path):
    """ESC, CR and NUL from the input went raw to the terminal in error lines (an ESC sequence recolours it)."""
    for args in (["--input", "in\x1b[31m\rred.txt"], ["a [MASK]", "--model", "bundle\x1b[2J\r"]):
        result = cli("infill", *args, "--device", "cpu")
        one_line_error(result, "\\x1b[")
        assert not set(result.output) & {"\x1b", "\r", "\x00"}, result.output
    path = tmp_path / "in.txt"
    path.write_bytes(b"a [MASK]\nb [MASK:\x1b] c\n")
    result = cli("infill", "--input", path, "--skip-invalid", "--device", "cpu")
    assert result.exit_code == 0 and "\x1b" not in result.stderr and "\\x1b" in result.stderr


def test_a_stream_without_a_newline_is_refused_within_a_bounded_read():
    """A 400 MB line on stdin peaked at 972 MB before it was refused: a line is refused once it runs past
    StreamLines.MAX_LINE, having read no more than that and a piece."""
    from maria_onnx.runtime.readers import StreamLines

    class Endless(io.RawIOBase):
        read_so_far = 0

        def readable(self):
            return True

        def readinto(self, buffer):
            Endless.read_so_far += len(buffer)
            buffer[:] = b"x" * len(buffer)
            return len(buffer)

    stream = io.BufferedReader(Endless())
    with pytest.raises(ValueError, match=r"^stdin:2 runs over 16 MiB without a newline; give one text per line$"):
        for _ in StreamLines(io.BufferedReader(io.BytesIO(b"a [MASK]\n" + b"x" * (40 << 20))), "stdin", False):
            pass
    with pytest.raises(ValueError, match="runs over 16 MiB"):
        list(StreamLines(stream, "stdin", False))
    assert Endless.read_so_far <= StreamLines.MAX_LINE + 2 * StreamLines.PIECE + io.DEFAULT_BUFFER_SIZE
