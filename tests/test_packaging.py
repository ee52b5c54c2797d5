"""The base install: onnxruntime-gpu where it has wheels, onnxruntime elsewhere, never both; the runtime fills
with either."""

import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = [
    ("Linux", "x86_64"),
    ("Linux", "aarch64"),
    ("Darwin", "arm64"),
    ("Darwin", "x86_64"),
    ("Windows", "AMD64"),
    ("Windows", "ARM64"),
]
HAS_GPU_WHEELS = {("Linux", "x86_64"), ("Windows", "AMD64")}


def test_exactly_one_onnxruntime_on_every_platform():
    requirements = [Requirement(r) for r in requires("maria-onnx") if "extra ==" not in r]  # the base install's
    for system, machine in PLATFORMS:
        environment = {"platform_system": system, "platform_machine": machine}
        chosen = [
            r.name
            for r in requirements
            if r.name.startswith("onnxruntime") and (r.marker is None or Marker(str(r.marker)).evaluate(environment))
        ]
        assert chosen == ["onnxruntime-gpu" if (system, machine) in HAS_GPU_WHEELS else "onnxruntime"], (
            system,
            machine,
        )


def test_the_runtime_fills_with_the_cpu_onnxruntime(tmp_path):
    """A fresh environment with the CPU onnxruntime (what macOS and ARM devices get) fills like the GPU wheel."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--only-binary=:all:",
            "onnxruntime",
            "numpy",
            "tokenizers",
            "typer",
            "rich",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        reason = (install.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the CPU onnxruntime cannot be installed from the package index here: {reason}")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import onnxruntime\n"
        "from importlib.metadata import distributions\n"
        "names = {d.metadata['Name'] for d in distributions()}\n"
        "assert 'onnxruntime' in names and 'onnxruntime-gpu' not in names, names\n"
        "from maria_onnx import Infiller\n"
        "print(Infiller(device='auto').infill(['The [MASK] statement is used to [MASK] an exception.'])[0].text)"
    )
    result = subprocess.run([str(python), "-c", code, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The following statement is used to raise an exception."
