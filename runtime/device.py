"""The one place that turns a device setting (auto|cuda|cuda:N|cpu) into the device a run uses, for ONNX Runtime and
PyTorch."""

import re

from .errors import SettingError

DEVICES = ("auto", "cuda", "cuda:N", "cpu")
CUDA_N = re.compile(r"cuda:(\d{1,3})")


def check_device(device: str) -> str:
    """Refuses a device name other than auto, cuda, cuda:N (GPU number N) or cpu; returns it."""
    if device not in ("auto", "cuda", "cpu") and not CUDA_N.fullmatch(device or ""):
        raise SettingError(f"{{device}} must be one of {', '.join(DEVICES)}, got '{device}'", "device")
    return device


def gpu_index(device: str) -> int:
    """The GPU number of cuda:N (0 for cuda and auto)."""
    match = CUDA_N.fullmatch(check_device(device))
    return int(match.group(1)) if match else 0


def choose_device(device: str, cuda_missing: str | None) -> str:
    """'cuda' or 'cpu' for the requested device. cuda_missing says why CUDA cannot run here (None: it can).
    auto takes CUDA where it can run, else CPU; cuda and cuda:N fail with that reason; cpu is CPU."""
    check_device(device)
    if device == "cpu" or (device == "auto" and cuda_missing):
        return "cpu"
    if cuda_missing:
        raise SettingError(f"{{device}} {device}: {cuda_missing}; use {{device}} auto or cpu", "device")
    return "cuda"
