"""Nothing lost and one line for every bad input: export, training state, input lines, manifests, sampling."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from maria_onnx.cli import app
from maria_onnx.console.outputs import NEWLINES, shown
from maria_onnx.export.bundle import export_bundle
from maria_onnx.runtime.choose import Sampling
from maria_onnx.runtime.default_model import DEFAULT_MODEL
from maria_onnx.runtime.infiller import Infilled, Infiller
from maria_onnx.tools import error_line

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def cli(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_line_error(result, message, code=2):
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.fixture(scope="module")
def default():
    return Infiller(DEFAULT_MODEL, device="cpu")


# -- export: --overwrite replaces only a bundle, never the checkpoint; partials are cleaned up -------------------


def test_overwrite_refuses_what_is_not_a_bundle_and_the_checkpoint(checkpoints, tmp_path):
    checkpoint = shutil.copytree(checkpoints["olmo"], tmp_path / "ckpt")
    before = sorted(p.name for p in checkpoint.iterdir())
    one_line_error(cli("export", checkpoint, "--out", checkpoint, "--overwrite"), "is the checkpoint being exported")
    one_line_error(cli("export", checkpoint, "--out", tmp_path, "--overwrite"), "holds the checkpoint")
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    one_line_error(cli("export", checkpoint, "--out", tmp_path / "photos", "--overwrite"), "is not a MARIA bundle")
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"
    (tmp_path / "notes.txt").write_text("keep")
    one_line_error(cli("export", checkpoint, "--out", tmp_path / "notes.txt", "--overwrite"), "is not a MARIA bundle")
    assert (tmp_path / "notes.txt").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_overwrite_replaces_a_bundle(checkpoints, bundles, tmp_path):
    target = shutil.copytree(bundles["olmo"], tmp_path / "b")
    (target / "stale.txt").write_text("from the old bundle")
    export_bundle(checkpoints["olmo"], target, overwrite=True)
    assert (target / "maria.json").is_file() and not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def start_export(checkpoint, out) -> subprocess.Popen:
    """`maria export` in a child process whose validation stage waits, so a signal sent once the partial folder
    holds graphs always lands mid-export (a tiny export can otherwise finish before the signal is sent). Ctrl-C
    acts as in a terminal even where the tests run as a background job, which starts with SIGINT ignored."""
    stalled = (
        "import runpy, sys, time; import export.bundle as bundle; "
        "bundle.validate = lambda *args, **kwargs: time.sleep(120); "
        f"sys.argv = ['cli.py', 'export', {str(checkpoint)!r}, '--out', {str(out)!r}]; "
        "runpy.run_path('cli.py', run_name='__main__')"
    )
    return subprocess.Popen(
        [sys.executable, "-c", stalled],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_partial(out: Path, process, seconds: float = 60) -> Path:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        partials = list(out.parent.glob(f".{out.name}.partial-*"))
        if partials and any(partials[0].iterdir()):
            return partials[0]
        time.sleep(0.05)
    process.kill()
    pytest.fail("the export never started writing its partial folder")


def test_a_killed_export_leaves_a_partial_that_the_next_export_removes(checkpoints, tmp_path):
    process = start_export(checkpoints["llama"], tmp_path / "b")
    partial = wait_for_partial(tmp_path / "b", process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert partial.exists() and not (tmp_path / "b").exists()
    export_bundle(checkpoints["llama"], tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_an_interrupted_export_says_so_in_one_line_and_leaves_nothing(checkpoints, tmp_path):
    process = start_export(checkpoints["olmo"], tmp_path / "b")
    wait_for_partial(tmp_path / "b", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted; nothing was written" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


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


def test_an_interrupted_training_run_says_how_to_resume(pairs, corpus_file, tmp_path, monkeypatch):
    import maria_onnx.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(maria_onnx.train, "train", interrupted)
    one_line_error(
        cli(*train_args(pairs, corpus_file, tmp_path / "run", 2), "--warmup-steps", "1"),
        f"interrupted; the same command resumes from the last save in {tmp_path / 'run'}",
        code=130,
    )


# -- training state: saves are atomic, damage is named --------------------------------------------------------


def train_args(pairs, corpus_file, out, steps):
    mlm, ar = pairs["olmo"]
    return [
        "train",
        "--mlm",
        mlm,
        "--ar",
        ar,
        "--data",
        corpus_file,
        "--out",
        out,
        "--steps",
        steps,
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--save-every",
        "1",
        "--eval-every",
        "100",
        "--device",
        "cpu",
    ]


def test_a_save_cut_short_resumes_from_the_previous_one(pairs, corpus_file, tmp_path, monkeypatch):
    from accelerate import Accelerator

    out = tmp_path / "run"
    assert cli(*train_args(pairs, corpus_file, out, 2)).exit_code == 0
    save_state = Accelerator.save_state

    def torn_save(self, output_dir=None, **kwargs):
        save_state(self, output_dir, **kwargs)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"")  # killed while the optimizer was written
        raise KeyboardInterrupt

    monkeypatch.setattr(Accelerator, "save_state", torn_save)
    with pytest.raises(KeyboardInterrupt):
        from maria_onnx.config import TrainConfig
        from maria_onnx.train import train

        mlm, ar = pairs["olmo"]
        train(
            mlm,
            ar,
            corpus_file,
            out,
            TrainConfig(steps=4, seq_len=16, batch_size=2, save_every=1, eval_every=100),
            device="cpu",
        )
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    assert json.loads((out / "train_state" / "step.json").read_text())["step"] == 2  # the last complete save
    result = cli(*train_args(pairs, corpus_file, out, 4))
    assert result.exit_code == 0, result.output
    assert "starting at step 2 of 4" in result.output


def test_a_damaged_state_is_named_with_the_fix(pairs, corpus_file, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(pairs, corpus_file, out, 1)).exit_code == 0
    (out / "train_state" / "optimizer.bin").write_bytes(b"")
    result = cli(*train_args(pairs, corpus_file, out, 2))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is damaged (optimizer.bin is empty); delete that folder" in result.output


def test_train_seq_len_over_the_backbones_maximum_is_refused(pairs, corpus_file, tmp_path):
    args = train_args(pairs, corpus_file, tmp_path / "run", 1)
    args[args.index("--seq-len") + 1] = "600"
    result = cli(*args)
    assert result.exit_code == 2 and "--seq-len 600 is over the backbones' maximum of 510" in result.output
    assert not (tmp_path / "run" / "train_state").exists()


# -- input lines: one in, one out; formats explicit; bad lines named; --skip-invalid ----------------------------


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


def edited_bundle(bundles, tmp_path, edit) -> Path:
    folder = shutil.copytree(bundles["olmo"], tmp_path / "bundle")
    manifest = json.loads((folder / "maria.json").read_text())
    edit(manifest, folder)
    (folder / "maria.json").write_text(json.dumps(manifest))
    return folder


def setter(key, value):
    def edit(manifest, folder):
        manifest[key] = value

    return edit


def special(name, value):
    def edit(manifest, folder):
        manifest["special_ids"][name] = value

    return edit


def drop_special(manifest, folder):
    del manifest["special_ids"]["pad"]


def drop_graph_file(manifest, folder):
    (folder / "fusion_head.onnx").unlink()
    del manifest["files"]["fusion_head.onnx"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (setter("head_dim", 3), "ar_step.onnx 'cache.0.key' is tensor(float)"),
        (setter("num_key_value_heads", 9), "ar_step.onnx 'cache.0.key' is tensor(float)"),
        (setter("dtype", "fp16"), "'hidden_states' is tensor(float)"),
        (setter("dtype", "int4"), "'dtype' must be one of fp32, fp16"),
        (setter("vocab_size", 17), "'logits' is tensor(float)"),
        (setter("num_hidden_layers", 5), "the KV cache of 2 layers, but the manifest says 5"),
        (setter("files", {}), "has no sha256 in 'files'"),
        (setter("schema_version", "1"), "'schema_version' must be int"),
        (setter("schema_version", 0), "schema_version 0 is not one this maria-onnx reads"),
        (setter("head_dim", "64"), "'head_dim' must be int"),
        (drop_special, "special ids must be an object with keys"),
        (special("mask", 7), "is the token"),
        (special("start", 10**6), "outside the AR vocabulary"),
        (drop_graph_file, "'fusion_head.onnx' has no sha256 in 'files'"),
    ],
)
def test_a_wrong_manifest_is_refused_in_one_line(bundles, tmp_path, edit, message):
    one_line_error(
        cli("infill", "a [MASK]", "--model", edited_bundle(bundles, tmp_path, edit), "--device", "cpu"), message
    )


def test_the_layer_count_check_reads_the_graph(bundles):
    assert json.loads((bundles["olmo"] / "maria.json").read_text())["num_hidden_layers"] == 2


# -- one line instead of a traceback ---------------------------------------------------------------------------


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
        (["bench", "--model", "runtime/default_model"], "--model needs --checkpoint"),
        (
            ["train", "--mlm", "x", "--ar", "y", "--data", "README.md", "--out", "never", "--learning-rate", "inf"],
            "--learning-rate must be a positive number, got inf",
        ),
    ],
)
def test_bad_arguments_get_one_line_before_any_work(args, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    one_line_error(cli(*args), message)


@pytest.mark.parametrize("opset", ["5", "99"])
def test_an_unsupported_opset_is_one_line(checkpoints, tmp_path, opset):
    one_line_error(
        cli("export", checkpoints["olmo"], "--out", tmp_path / "b", "--opset", opset),
        f"--opset {opset} is not supported; use 17 to 20",
    )
    assert list(tmp_path.iterdir()) == []


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


def test_device_names_and_the_gpu_they_pick():
    from maria_onnx.runtime.device import check_device, choose_device, gpu_index
    from maria_onnx.runtime.sessions import cuda_providers, providers_for

    assert [gpu_index(d) for d in ("auto", "cuda", "cuda:0", "cuda:3")] == [0, 0, 0, 3]
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:1:2", "CUDA"):
        with pytest.raises(ValueError, match="^device must be one of auto, cuda, cuda:N, cpu"):
            check_device(bad)
    assert choose_device("cuda:2", None) == "cuda" and choose_device("auto", "no GPU") == "cpu"
    with pytest.raises(ValueError, match="^device cuda:2: no GPU; use device auto or cpu$"):
        choose_device("cuda:2", "no GPU")
    assert cuda_providers(2) == [("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]
    assert providers_for("cpu") == ["CPUExecutionProvider"]


def test_missing_cuda_libraries_are_named_in_one_line(monkeypatch):
    from maria_onnx.runtime import sessions

    missing = sessions.cuda_libraries_missing()
    assert missing is None or missing.startswith("lib") and ".so" in missing  # what this machine lacks, if any
    monkeypatch.setattr(sessions, "gpu_present", lambda: True)  # as on a GPU machine...
    monkeypatch.setattr(sessions, "cuda_libraries_missing", lambda: "libcublasLt.so.13")  # ...without CUDA
    monkeypatch.setattr(
        sessions.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.raises(ValueError) as refused:
        sessions.providers_for("cuda")
    assert error_line(refused.value) == (
        "--device cuda: the CUDA library libcublasLt.so.13 cannot be loaded; pip install "
        "'maria-onnx[cuda]' for CUDA and cuDNN from pip, or install them system-wide; "
        "use --device auto or cpu"
    )
    with pytest.warns(RuntimeWarning, match="a GPU is present but CUDA cannot run"):
        assert sessions.providers_for("auto") == ["CPUExecutionProvider"]


class FakeCudart:
    """The CUDA runtime's calls that runtime.sessions.cuda_devices makes, answering as a given machine would."""

    ERRORS = {
        35: b"CUDA driver version is insufficient for CUDA runtime version",
        100: b"no CUDA-capable device is detected",
    }

    def __init__(self, status: int, count: int = 0, driver: int = 0):
        self.status, self.count, self.driver = status, count, driver
        self.cudaGetErrorString = lambda status: self.ERRORS[status]

    def cudaGetDeviceCount(self, count):
        count._obj.value = self.count
        return self.status

    def cudaDriverGetVersion(self, version):
        version._obj.value = self.driver
        return 0


@pytest.mark.parametrize(
    "cudart, expected",
    [
        (FakeCudart(0, count=2), (2, None)),
        (FakeCudart(0, count=0), (0, "CUDA sees no GPU; check CUDA_VISIBLE_DEVICES")),
        (
            FakeCudart(35, driver=12040),
            (
                0,
                "the NVIDIA driver runs CUDA up to 12.4, and this onnxruntime-gpu is built "
                "for CUDA 13.0 (cudaGetDeviceCount: CUDA driver version is insufficient for "
                "CUDA runtime version); update the NVIDIA driver",
            ),
        ),
        (
            FakeCudart(35, driver=0),
            (
                0,
                "the NVIDIA driver cannot be used, and this onnxruntime-gpu is built for CUDA "
                "13.0 (cudaGetDeviceCount: CUDA driver version is insufficient for CUDA runtime "
                "version); install or update the NVIDIA driver",
            ),
        ),
        (
            FakeCudart(100),
            (
                0,
                "CUDA cannot use the GPU (cudaGetDeviceCount: no CUDA-capable device is detected); check "
                "the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES",
            ),
        ),
    ],
)
def test_a_driver_too_old_or_no_usable_gpu_is_named_before_any_session(cudart, expected, monkeypatch):
    """Asked before ONNX Runtime starts CUDA, which would print its error on stdout and fall back to the CPU."""
    from maria_onnx.runtime import sessions

    monkeypatch.setattr(sessions, "cuda_runtime", lambda: (cudart, "13.0"))
    sessions.cuda_devices.cache_clear()
    try:
        assert sessions.cuda_devices() == expected
        monkeypatch.setattr(sessions, "gpu_present", lambda: True)
        monkeypatch.setattr(sessions, "cuda_libraries_missing", lambda: None)
        monkeypatch.setattr(
            sessions.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        assert sessions.cuda_missing() == expected[1]
        if expected[1]:
            with pytest.raises(ValueError) as refused:
                sessions.providers_for("cuda:1")
            assert error_line(refused.value) == f"--device cuda:1: {expected[1]}; use --device auto or cpu"
    finally:
        sessions.cuda_devices.cache_clear()


def test_a_gpu_number_beyond_the_machines_is_refused(monkeypatch):
    from maria_onnx.runtime import sessions

    monkeypatch.setattr(sessions, "cuda_missing", lambda: None)
    for count, device, gpus in [(1, "cuda:1", "1 GPU here (cuda:0)"), (2, "cuda:2", "2 GPUs here (cuda:0 to cuda:1)")]:
        monkeypatch.setattr(sessions, "cuda_devices", lambda count=count: (count, None))
        with pytest.raises(ValueError) as refused:
            sessions.providers_for(device)
        assert (
            error_line(refused.value) == f"--device {device}: CUDA sees {gpus}; pick one of them, or use --device cpu"
        )
    assert sessions.providers_for("cuda:1") == sessions.cuda_providers(1)  # 2 GPUs: cuda:1 is the second


def test_this_machines_cuda_runtime_answers():
    """The real CUDA runtime where one is installed (this project's CPU machine has one and no driver)."""
    from maria_onnx.runtime import sessions

    if sessions.cuda_runtime() is None:
        pytest.skip("no CUDA runtime library (libcudart) for this onnxruntime here")
    sessions.cuda_devices.cache_clear()
    count, why = sessions.cuda_devices()
    assert (count > 0 and why is None) or (count == 0 and "(cudaGetDeviceCount: " in why), (count, why)


CUDA_FAILURE = (
    "[ONNXRuntimeError] : 1 : FAIL : provider_options_utils.h:187 Parse Failed to parse provider option "
    '"device_id": CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version ; '
    "GPU=-1 ; hostname=vm ; expr=cudaGetDeviceCount(&num_devices);"
)


@pytest.mark.parametrize("onnxruntime", ["1.23 and later", "before 1.23"])
def test_cuda_that_fails_to_start_falls_back_with_one_line_and_nothing_on_stdout(onnxruntime, monkeypatch, capsys):
    from maria_onnx.runtime import sessions
    from maria_onnx.runtime.sessions import cuda_providers, make_session

    real = sessions.ort.InferenceSession

    def session(path, sess_options=None, providers=None, **kwargs):
        if providers[0] == "CPUExecutionProvider":
            return real(path, sess_options=sess_options, providers=providers)
        if onnxruntime == "1.23 and later":
            assert kwargs == {"enable_fallback": 0}
            raise RuntimeError(CUDA_FAILURE)
        print("*************** EP Error ***************")  # its own fallback, printed where fills go
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(sessions.ort, "InferenceSession", session)
    head = Path(DEFAULT_MODEL) / "fusion_head.onnx"
    reason = (
        "CUDA could not start (CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version)"
        if onnxruntime == "1.23 and later"
        else "CUDA could not start (ONNX Runtime fell back to CPUExecutionProvider)"
    )
    with pytest.warns(RuntimeWarning) as warned:
        assert make_session(head, cuda_providers(0)).get_providers() == ["CPUExecutionProvider"]
    assert [str(w.message) for w in warned] == [f"{reason}; running on the CPU instead"]
    with pytest.raises(ValueError) as refused:
        make_session(head, cuda_providers(0), insist=True)
    assert error_line(refused.value) == (
        f"--device cuda: {reason}; check the GPU driver (nvidia-smi) and CUDA libraries, or use --device cpu"
    )
    assert capsys.readouterr().out == ""


def test_a_provider_error_other_than_starting_is_not_hidden_by_a_fallback(monkeypatch):
    """ONNX Runtime's Fail (not a RuntimeError) at session creation, such as a refused CUDA graph capture, reaches the
    caller; and a session never reruns a failed call on the CPU behind a print."""
    from maria_onnx.runtime import sessions
    from maria_onnx.runtime.sessions import cuda_providers, make_session

    head = Path(DEFAULT_MODEL) / "fusion_head.onnx"
    assert make_session(head, ["CPUExecutionProvider"])._enable_fallback is False

    class Fail(Exception):
        pass

    def refuse(path, sess_options=None, providers=None, **kwargs):
        raise Fail("This session cannot use the graph capture feature as requested by the user")

    monkeypatch.setattr(sessions.ort, "InferenceSession", refuse)
    with pytest.raises(Fail):
        make_session(head, cuda_providers(0))


@pytest.mark.parametrize("name", ['my "model"', "a b", "", ".hidden", "a/b", "naïve"])
def test_a_model_name_a_url_or_config_pbtxt_cannot_carry_is_refused(name, tmp_path):
    message = f"--model-name takes letters, digits, '_', '-' and '.' (not first), got {name!r}"
    one_line_error(cli("triton-repo", "--out", tmp_path / "repo", "--model-name", name), message)
    one_line_error(cli("serve", "--port", "0", "--device", "cpu", "--model-name", name), message)
    assert not (tmp_path / "repo").exists()


def triton_model(repo: Path, monkeypatch, made: list):
    """The repository's model.py, loaded as Triton's Python backend would (its utilities stubbed), with an Infiller
    that only records (device, threads) in `made`."""
    import importlib.util
    import types

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the model puts its folder first
    spec = importlib.util.spec_from_file_location(f"model_{repo.name}", repo / "maria" / "1" / "model.py")
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    monkeypatch.setattr(model, "Infiller", lambda bundle, device, threads: made.append((device, threads)))
    return model


def test_triton_gpu_instances_each_run_on_their_own_gpu(tmp_path, monkeypatch):
    """Triton starts an instance group on every visible GPU and tells each instance its GPU; the model must use it
    (with plain "cuda" every instance would share GPU 0)."""
    from maria_onnx.serve.triton import write_repository

    write_repository(DEFAULT_MODEL, tmp_path / "repo", kind="gpu", link=True)
    assert 'key: "device" value: { string_value: "cuda" }' in (tmp_path / "repo" / "maria" / "config.pbtxt").read_text()
    made = []
    model = triton_model(tmp_path / "repo", monkeypatch, made)
    config = json.dumps({"parameters": {"device": {"string_value": "cuda"}, "max_texts": {"string_value": "64"}}})
    for kind, device_id in [("GPU", "0"), ("GPU", "3"), ("CPU", "0")]:
        model.TritonPythonModel().initialize(
            {"model_config": config, "model_instance_kind": kind, "model_instance_device_id": device_id}
        )
    assert [device for device, _ in made] == ["cuda:0", "cuda:3", "cpu"]


def test_triton_cpu_instances_share_the_cpus(tmp_path, monkeypatch):
    """Each of Triton's instances is a process of its own: N CPU instances, each with ONNX Runtime's pools of every
    core, would run N times the threads the machine has. They share the CPUs Triton may use, unless --threads
    says otherwise; what the repository's config says is what its model reads."""
    from maria_onnx.runtime import cpus
    from maria_onnx.serve.triton import write_repository

    monkeypatch.setattr(cpus, "usable_cpus", lambda: 16)
    made = []
    for kind, instances, threads, expected in [
        ("cpu", 4, None, 4),
        ("cpu", 3, None, 5),
        ("cpu", 32, None, 1),
        ("cpu", 1, None, None),
        ("gpu", 4, None, None),
        ("cpu", 4, 2, 2),
        ("gpu", 2, 3, 3),
    ]:
        repo = tmp_path / f"{kind}-{instances}-{threads}"
        write_repository(DEFAULT_MODEL, repo, kind=kind, instances=instances, threads=threads, link=True)
        text = (repo / "maria" / "config.pbtxt").read_text()
        assert f'key: "threads" value: {{ string_value: "{threads or "auto"}" }}' in text
        config = {
            "parameters": {
                "device": {"string_value": "cpu"},
                "threads": {"string_value": str(threads or "auto")},
            },  # as Triton gives them
            "instance_group": [{"name": "maria_0", "kind": f"KIND_{kind.upper()}", "count": instances}],
        }
        triton_model(repo, monkeypatch, made).TritonPythonModel().initialize(
            {"model_config": json.dumps(config), "model_instance_kind": kind.upper(), "model_instance_device_id": "0"}
        )
        assert made[-1][1] == expected, (kind, instances, threads)
    refused = cli("triton-repo", "--out", tmp_path / "zero", "--threads", "0")
    assert refused.exit_code == 2 and "Invalid value for '--threads'" in refused.output
    assert not (tmp_path / "zero").exists()


def test_a_repository_where_none_can_be_written_names_the_out_folder(tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "repo"  # its parent is a file
    one_line_error(
        cli("triton-repo", "--out", out, "--link"),
        f"cannot write the repository to {out} (File exists); choose another --out",
    )


def test_a_repository_inside_its_bundle_is_refused(tmp_path):
    bundle = shutil.copytree(DEFAULT_MODEL, tmp_path / "bundle")
    for out, link in [(bundle / "repo", ()), (bundle / "a" / "repo", ("--link",))]:
        one_line_error(
            cli("triton-repo", bundle, "--out", out, *link),
            f"--out {out} is inside the bundle {bundle}; write the repository somewhere else",
        )
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in Path(DEFAULT_MODEL).iterdir())
