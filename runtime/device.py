"""The one place that turns `--device auto|cuda|cpu` into the device a run uses, for ONNX Runtime and PyTorch."""

DEVICES = ("auto", "cuda", "cpu")


def check_device(device: str) -> str:
    """Refuses a device name other than auto, cuda or cpu; returns it."""
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got '{device}'")
    return device


def choose_device(device: str, cuda_missing: str | None) -> str:
    """'cuda' or 'cpu' for the requested device. cuda_missing says why CUDA cannot run here (None: it can).
    auto takes CUDA where it can run, else CPU; cuda fails with that reason; cpu is CPU."""
    check_device(device)
    if device == "cpu" or (device == "auto" and cuda_missing):
        return "cpu"
    if cuda_missing:
        raise ValueError(f"--device cuda: {cuda_missing}; use --device auto or cpu")
    return "cuda"
