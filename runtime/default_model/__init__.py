"""The default MARIA bundle shipped with the package (built by `python -m maria_onnx.recipe --install`)."""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent
