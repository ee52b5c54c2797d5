"""The shipped default model: it is in the package (editable or not), the README's commands print what the
README shows, and the quality table in MODEL.md holds for the bundle that ships."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from runtime.default_model import DEFAULT_MODEL
from runtime.evaluate import draw_masks
from runtime.infiller import Infiller
from runtime.manifest import load_manifest

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
    manifest = load_manifest(DEFAULT_MODEL)          # every file present with its sha256
    size = sum((DEFAULT_MODEL / name).stat().st_size for name in manifest.files) + (DEFAULT_MODEL / "maria.json").stat().st_size
    assert size < 50 * 10**6                         # with its baseline heads
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
    for baseline in ("AR alone", "MLM alone", "PoE init"):       # the paper's claim, at every rate
        assert rows["MARIA"]["perplexity"] < rows[baseline]["perplexity"]
    infiller = Infiller(DEFAULT_MODEL, device="cpu")
    masks = draw_masks(WINDOWS, float(rate), seed=0)
    nll = infiller.score(list(WINDOWS), masks, batch_size=32)
    count = sum(int(m.sum()) for m in masks)
    assert count == rows["MARIA"]["masked_tokens"]
    assert math.isclose(math.exp(sum(nll) / count), rows["MARIA"]["perplexity"], rel_tol=1e-4)


def test_a_plain_wheel_install_carries_the_default_model(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("maria_onnx-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = ("import runtime, cli; assert runtime.__file__.startswith(%r), runtime.__file__; "
            "cli.app(['infill', '--json', 'The [MASK] statement is used to [MASK] an exception.'])"
            % str(tmp_path / "site"))
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["fills"]) == 2
