"""The README's "Your own model" first try, run as it is written: tiny backbones -> train -> export -> infill."""

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from maria_onnx.cli import app

ROOT = Path(__file__).resolve().parent.parent


def first_try() -> list[list[str]]:
    """The `maria` commands of the README's first try, as argument lists."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Your own model\n.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("maria ")]


def test_the_readmes_first_try_trains_exports_and_fills(tmp_path, monkeypatch):
    commands = first_try()
    assert [c[0] for c in commands] == ["tiny-backbones", "train", "export", "infill"]
    monkeypatch.chdir(tmp_path)
    for args in commands:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    assert result.stdout.startswith("The") and result.stdout.endswith(" an exception.\n")
    assert (tmp_path / "tiny" / "bundle" / "maria.json").is_file()


def test_tiny_backbones_refuse_a_folder_in_use_and_an_unknown_family(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["tiny-backbones", str(tmp_path / "used")])
    assert result.exit_code == 2 and "is not empty; give a new folder" in result.output
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    result = CliRunner().invoke(app, ["tiny-backbones", str(tmp_path / "new"), "--ar-type", "gpt2"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --ar-type must be one of olmo, olmo2, llama, qwen2, got 'gpt2'"
