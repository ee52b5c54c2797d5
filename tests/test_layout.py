"""The source's import graph: dependencies run one way (cli > tools, serve > export > maria_onnx > runtime) and
form no cycle. Every import counts, also those inside functions."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"runtime": 0, "maria_onnx": 1, "export": 2, "tools": 3, "serve": 3, "cli": 4}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every source module of the project (tests excluded)."""
    found = {"cli": ROOT / "cli.py"}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
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
    return LAYERS[module.split(".")[0]]


def test_the_graph_sees_the_known_edges():
    edges = graph()
    assert "runtime.decode" in edges["runtime.infiller"]
    assert "maria_onnx.backbones" in edges["maria_onnx.train"]
    assert "export.bundle" in edges["tools.bench"]                 # from a module-level import
    assert "tools.bench" in edges["cli"]                           # from an import inside a function


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = sorted(f"{source} -> {target}" for source, targets in graph().items() for target in targets
                    if layer(target) > layer(source))
    assert upward == []


def test_serving_and_tools_do_not_import_each_other():
    sideways = sorted(f"{source} -> {target}" for source, targets in graph().items() for target in targets
                      if layer(source) == layer(target) == 3 and source.split(".")[0] != target.split(".")[0])
    assert sideways == []


def test_the_module_graph_has_no_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []
