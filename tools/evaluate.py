"""`maria eval`: MARIA and its baselines (AR alone, MLM alone, product of experts) on the same seeded masks.

With a bundle that carries its baseline heads everything runs through ONNX Runtime (runtime/evaluate.py); a
bundle exported with --no-baseline-heads falls back to the PyTorch baselines where the train extra and the
backbone folders are at hand.
"""

from pathlib import Path

from maria_onnx.runtime.evaluate import document_windows, draw_masks, evaluate_maria, text_windows
from maria_onnx.runtime.evaluate import evaluate_baselines as onnx_baselines


def windows_of(path, infiller, seq_len: int, count: int):
    """A folder: one document per file, as training reads it (the recipe's test split); a file: one per line.
    Either is read only as far as the windows need."""
    if Path(path).is_dir():
        from maria_onnx.data import iter_documents

        return document_windows(iter_documents(path), infiller, seq_len, count, str(path))
    return text_windows(path, infiller, seq_len, count)


def evaluate(
    text_file,
    infiller,
    mask_rate: float = 0.5,
    span: bool = False,
    seq_len: int = 128,
    windows: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    backbones_from=None,
) -> dict:
    """The quality report: one row per system, and a note where the baselines could not run."""
    data = windows_of(text_file, infiller, seq_len, windows)
    masks = draw_masks(data, mask_rate, seed, span)
    rows, note, engine = [evaluate_maria(infiller, data, masks, batch_size)], "", "onnxruntime"
    if infiller.manifest.has_baseline_heads and backbones_from is None:
        rows += onnx_baselines(infiller, data, masks, batch_size)
    else:
        engine = "onnxruntime (MARIA), pytorch (baselines)"
        try:
            from .baselines import evaluate_baselines, load_baseline_backbones
        except ImportError:
            note = (
                "this bundle has no baseline heads and the PyTorch baselines need the train extra "
                "(pip install 'maria-onnx[train]'); MARIA only"
            )
        else:
            backbones, note = load_baseline_backbones(infiller.manifest, backbones_from)
            if backbones is not None:
                rows += evaluate_baselines(backbones, data, masks, batch_size)
    return {
        "text": str(text_file),
        "mask_rate": mask_rate,
        "span": span,
        "seq_len": seq_len,
        "windows": int(len(data)),
        "seed": seed,
        "engine": engine,
        "rows": rows,
        "note": note,
    }
