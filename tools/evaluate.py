"""`maria eval`: MARIA through ONNX Runtime and, where PyTorch and the backbones are at hand, the baselines,
on the same seeded masks."""

from runtime.evaluate import draw_masks, evaluate_maria, text_windows


def evaluate(text_file, infiller, mask_rate: float = 0.5, span: bool = False, seq_len: int = 128,
             windows: int = 64, seed: int = 0, batch_size: int = 16, backbones_from=None) -> dict:
    """The quality report: one row per system, and a note where the baselines could not run."""
    data = text_windows(text_file, infiller, seq_len, windows)
    masks = draw_masks(data, mask_rate, seed, span)
    rows, note = [evaluate_maria(infiller, data, masks, batch_size)], ""
    try:
        from .baselines import evaluate_baselines, load_baseline_backbones
    except ImportError:
        note = "baselines need the train extra (pip install 'maria-onnx[train]'); MARIA only"
    else:
        backbones, note = load_baseline_backbones(infiller.manifest, backbones_from)
        if backbones is not None:
            rows += evaluate_baselines(backbones, data, masks, batch_size)
    return {"text": str(text_file), "mask_rate": mask_rate, "span": span, "seq_len": seq_len,
            "windows": int(len(data)), "seed": seed, "rows": rows, "note": note}
