"""The default MARIA bundle shipped with the package (built by `python -m maria_onnx.tools.recipe --install`)."""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent


def resolve_bundle(bundle: str | Path | None = None) -> Path:
    """The given bundle folder, or the default model shipped inside the package when none is given."""
    if bundle is not None:
        return Path(bundle)
    if not (DEFAULT_MODEL / "maria.json").is_file():
        raise ValueError(
            "no --model given and this install has no default model; pass a bundle folder written by `maria export`"
        )
    return DEFAULT_MODEL
