"""Exports lose nothing: --overwrite replaces only a bundle, a killed or interrupted export leaves nothing that
looks complete, and a wrong manifest or opset is refused in one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commands import cli, one_line_error

from maria_onnx.export.bundle import export_bundle

ROOT = Path(__file__).resolve().parent.parent


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
        "import runpy, sys, time; import maria_onnx.export.bundle as bundle; "
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


def test_an_export_killed_between_its_two_renames_loses_no_bundle(checkpoints, tmp_path):
    """--overwrite swaps bundles with two renames (the old one aside, the new one in); killed between them, the
    target was empty and the next export deleted the old bundle as a leftover. Now the next export restores it."""
    target = tmp_path / "b"
    export_bundle(checkpoints["olmo"], target)
    before = (target / "maria.json").read_bytes()
    killed = (
        "import os, runpy, signal, sys; import maria_onnx.export.bundle as bundle; replace = os.replace\n"
        "def first_rename_only(src, dst):\n"
        "    replace(src, dst)\n"
        f"    if os.fspath(src) == {str(target)!r}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "bundle.os.replace = first_rename_only\n"
        f"sys.argv = ['cli.py', 'export', {str(checkpoints['llama'])!r}, '--out', {str(target)!r}, '--overwrite']\n"
        "runpy.run_path('cli.py', run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", killed], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert not target.exists() and [p.name for p in tmp_path.glob(".b.partial-*.old")]  # the state a kill leaves
    again = cli("export", checkpoints["olmo"], "--out", target)  # no --overwrite: the restored bundle is kept
    assert again.exit_code == 2 and "restored the previous bundle at" in again.output, again.output
    assert (target / "maria.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_an_interrupted_export_says_so_in_one_line_and_leaves_nothing(checkpoints, tmp_path):
    process = start_export(checkpoints["olmo"], tmp_path / "b")
    wait_for_partial(tmp_path / "b", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted; nothing was written" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


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


@pytest.mark.parametrize("opset", ["5", "99"])
def test_an_unsupported_opset_is_one_line(checkpoints, tmp_path, opset):
    one_line_error(
        cli("export", checkpoints["olmo"], "--out", tmp_path / "b", "--opset", opset),
        f"--opset {opset} is not supported; use 17 to 20",
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--quantize", "int3"], "--quantize must be int8 or int4, got 'int3'"),
        (["--quantize", "int4", "--dtype", "fp16"], "--quantize int4 quantizes an fp32 export's weights; use it with"),
        (["--quantize", "int4", "--int8"], "--int8 is --quantize int8; drop one of --int8 and --quantize int4"),
    ],
)
def test_a_quantization_that_cannot_be_written_is_one_line(checkpoints, tmp_path, args, message):
    one_line_error(cli("export", checkpoints["olmo"], "--out", tmp_path / "b", *args), message)
    assert list(tmp_path.iterdir()) == []


def test_int4_from_the_command_line_and_int8_by_its_old_spelling(checkpoints, tmp_path):
    for how, args in (("int4", ["--quantize", "int4"]), ("int8", ["--int8"])):
        result = cli("export", checkpoints["olmo"], "--out", tmp_path / how, *args)
        assert result.exit_code == 0, result.output
        manifest = json.loads((tmp_path / how / "maria.json").read_text())
        assert manifest["quantization"].startswith(how) and manifest["source"]["quantization"]
        filled = cli("infill", "a [MASK] b", "--model", tmp_path / how, "--device", "cpu", "--json")
        assert json.loads(filled.stdout)["bundle"] == {"dtype": "fp32", "quantization": manifest["quantization"]}
