"""maria-onnx: fill masked text with an autoregressive model, on ONNX Runtime.

    from maria_onnx import Infiller, Sampling
    Infiller().infill(["The [MASK] statement is used to [MASK] an exception."], Sampling(temperature=0.0))

The installed package is this one namespace: the PyTorch side (config, backbones, fusion head, training) in its own
modules, and beneath it `runtime` (bundle -> fills: onnxruntime, numpy and tokenizers only), `export`, `serve`,
`tools`, `console` and `cli`. In the repository those are top-level folders (and cli.py), linked into this folder
so that a checkout, an editable install and type checkers see the installed names; pyproject.toml maps them into
the wheel. Importing this package, or `maria_onnx.runtime`, loads no torch: the public names below load on first
use.
"""

_PUBLIC = {
    "Infiller": "maria_onnx.runtime.infiller",
    "FillRequest": "maria_onnx.runtime.requests",
    "Prepared": "maria_onnx.runtime.requests",
    "Infilled": "maria_onnx.runtime.results",
    "Sampling": "maria_onnx.runtime.choose",
    "Schedule": "maria_onnx.runtime.anneal",
    "anneal": "maria_onnx.runtime.anneal",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> object:
    """The public names, imported when first used (PEP 562), so `import maria_onnx` stays light."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'maria_onnx' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
