"""The shipped default model: it is in the package (editable or not), the README's commands print what the
README shows, and the quality table in MODEL.md holds for the bundle that ships."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from maria_onnx.cli import app
from maria_onnx.runtime.default_model import DEFAULT_MODEL
from maria_onnx.runtime.evaluate import draw_masks
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.manifest import load_manifest

ROOT = Path(__file__).parent.parent
QUALITY = json.loads((DEFAULT_MODEL / "quality.json").read_text())
WINDOWS = np.load(ROOT / "tests" / "data" / "default_model_eval_windows.npy")


def readme_examples() -> list[tuple[str, str]]:
    """(command, output) pairs of the README's `$ maria infill ...` examples."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Fill masked text\n\n```console\n(.*?)```", readme, re.S).group(1)
    pairs = re.findall(r"^\$ (maria infill .*)\n((?:[^$].*\n)*)", block, re.M)
    assert pairs, "the README shows no `$ maria infill` example"
    return pairs


def test_bundle_is_complete_and_small():
    manifest = load_manifest(DEFAULT_MODEL)  # every file present with its sha256
    size = (
        sum((DEFAULT_MODEL / name).stat().st_size for name in manifest.files)
        + (DEFAULT_MODEL / "maria.json").stat().st_size
    )
    assert size < 50 * 10**6  # with its baseline heads
    assert manifest.has_baseline_heads


@pytest.mark.parametrize("command, output", readme_examples())
def test_readme_examples_print_what_the_readme_shows(command, output):
    import shlex

    args = shlex.split(command)[1:]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == output


def test_readme_first_command_is_the_main_job():
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)\n", readme).group(1)
    assert first.endswith(readme_examples()[0][0].replace("$ ", ""))


@pytest.mark.parametrize("rate", sorted(QUALITY["rates"]))
def test_quality_table_holds_for_the_shipped_bundle(rate):
    rows = {row["system"]: row for row in QUALITY["rates"][rate]}
    for baseline in ("AR alone", "MLM alone", "PoE init"):  # the paper's claim, at every rate
        assert rows["MARIA"]["perplexity"] < rows[baseline]["perplexity"]
    infiller = Infiller(DEFAULT_MODEL, device="cpu")
    masks = draw_masks(WINDOWS, float(rate), seed=0)
    nll = infiller.score(list(WINDOWS), masks, batch_size=32)
    count = sum(int(m.sum()) for m in masks)
    assert count == rows["MARIA"]["masked_tokens"]
    assert math.isclose(math.exp(sum(nll) / count), rows["MARIA"]["perplexity"], rel_tol=1e-4)


def test_a_plain_wheel_install_is_one_package_carrying_the_default_model(tmp_path):
    """The wheel holds one top-level import package, maria_onnx (the default model inside it); installed, its CLI
    and its Python API work from a folder that holds a cli.py and a runtime/ package of the user's own."""
    source = tmp_path / "source"  # a clean copy: an earlier build's build/ folder is not the wheel's
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "docs", "runs"),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("maria_onnx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"maria_onnx"}
    assert "maria_onnx/cli.py" in names and "maria_onnx/runtime/default_model/ar_step.onnx" in names
    assert "maria_onnx/runtime/graphs/greedy.onnx" in names  # the greedy choice a GPU makes where the logits are
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"), str(wheel)],
        check=True,
        capture_output=True,
    )
    user = tmp_path / "user"  # a user's own project, with names the package must not take
    (user / "runtime").mkdir(parents=True)
    (user / "runtime" / "__init__.py").write_text("raise ImportError('the user runtime package was imported')\n")
    (user / "cli.py").write_text("raise SystemExit('the user cli.py ran')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    example = re.search(r"## Set up\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    code = (
        f"import maria_onnx, sys; assert maria_onnx.__file__.startswith({str(tmp_path / 'site')!r})\n"
        + example
        + "assert 'torch' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=user, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "The following statement is used to raise an exception."
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "maria_onnx.cli",
            "infill",
            "--json",
            "The [MASK] statement is used to [MASK] an exception.",
        ],
        env=env,
        cwd=user,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["fills"]) == 2
