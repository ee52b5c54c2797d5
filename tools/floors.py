"""The lowest versions pyproject.toml allows for the runtime and `maria serve` (the base dependencies and the serve
and grpc extras) on this machine: `python -m maria_onnx.tools.floors` prints them as pins, which .ci/run installs
into an environment of their own for tests/test_floors.py. Needs the packaging module (the dev extra)."""

from pathlib import Path

import tomllib
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
EXTRAS = ("serve", "grpc")


def floors(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """name -> the version of each `name>=version` that applies here (markers evaluated on this machine)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = project["dependencies"] + [line for extra in EXTRAS for line in project["optional-dependencies"][extra]]
    found = {}
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        lowest = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(lowest) != 1:
            raise ValueError(f"{line!r} in {pyproject.name} has no single >= floor")
        found[requirement.name] = lowest[0]
    return found


if __name__ == "__main__":
    print(" ".join(f"{name}=={version}" for name, version in floors().items()))
