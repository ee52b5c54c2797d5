"""The source's import graph, under the names the package is installed with: dependencies run one way (cli,
console > tools, serve > export > maria_onnx's own modules > runtime) and form no cycle. Every import counts, also those
inside functions."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The repository's folders and the subpackages of maria_onnx they are installed as (pyproject.toml's package-dir).
FOLDERS = {
    "runtime": "maria_onnx.runtime",
    "export": "maria_onnx.export",
    "tools": "maria_onnx.tools",
    "serve": "maria_onnx.serve",
    "console": "maria_onnx.console",
    "maria_onnx": "maria_onnx",
}
LAYERS = {
    "maria_onnx.runtime": 0,
    "maria_onnx": 1,
    "maria_onnx.export": 2,
    "maria_onnx.tools": 3,
    "maria_onnx.serve": 3,
    "maria_onnx.console": 4,
    "maria_onnx.cli": 4,
}


def modules() -> dict[str, Path]:
    """Installed dotted module name -> file, for every source module of the project (tests excluded)."""
    found = {"maria_onnx.cli": ROOT / "cli.py"}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.is_symlink():  # maria_onnx/cli.py: the top-level cli.py, counted above
                continue
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])] = path
    return found


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The project modules that module `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(module: str) -> int:
    """The layer of the longest LAYERS name that module is, or lies beneath."""
    names = [name for name in LAYERS if module == name or module.startswith(name + ".")]
    return LAYERS[max(names, key=len)]


def subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_folders_are_the_packages_pyproject_maps():
    mapped = dict(re.findall(r'^"(maria_onnx[\w.]*)" = "(\w+)"$', (ROOT / "pyproject.toml").read_text(), re.M))
    assert {folder: package for package, folder in mapped.items()} == FOLDERS


def test_the_graph_sees_the_known_edges():
    edges = graph()
    assert "maria_onnx.runtime.decode" in edges["maria_onnx.runtime.infiller"]
    assert "maria_onnx.backbones" in edges["maria_onnx.train"]
    assert "maria_onnx.export.bundle" in edges["maria_onnx.tools.bench"]  # from a module-level import
    assert "maria_onnx.tools.bench" in edges["maria_onnx.cli"]  # from an import inside a function


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = sorted(
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if layer(target) > layer(source)
    )
    assert upward == []


def test_serving_and_tools_do_not_import_each_other():
    sideways = sorted(
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if layer(source) == layer(target) == 3 and subpackage(source) != subpackage(target)
    )
    assert sideways == []


def test_the_module_graph_has_no_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []
