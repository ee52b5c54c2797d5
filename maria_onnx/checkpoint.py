"""Trained checkpoints on disk: head.safetensors + maria_config.json, written so a crash never leaves a torn file."""

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .backbones import Backbones, load_backbones
from .config import CONFIG_NAME, HEAD_NAME, MariaConfig
from .model import FusionHead


def maria_config(backbones: Backbones, mlm_path, ar_path, train: dict, trained_steps: int) -> MariaConfig:
    return MariaConfig(
        mlm_path=str(Path(mlm_path).resolve()),
        ar_path=str(Path(ar_path).resolve()),
        mlm_model_type=backbones.mlm_model_type,
        ar_model_type=backbones.ar_model_type,
        mlm_hidden_size=backbones.mlm_hidden_size,
        ar_hidden_size=backbones.ar_hidden_size,
        vocab_size=backbones.vocab_size,
        special_ids=backbones.special,
        train=train,
        trained_steps=trained_steps,
    )


def save_checkpoint(folder, head: FusionHead, config: MariaConfig) -> None:
    """Writes head.safetensors and maria_config.json; each appears complete or not at all."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "weight": head.linear.weight.detach().float().cpu().contiguous(),
        "bias": head.linear.bias.detach().float().cpu().contiguous(),
    }
    save_file(tensors, folder / (HEAD_NAME + ".tmp"))
    fsync_path(folder / (HEAD_NAME + ".tmp"))
    os.replace(folder / (HEAD_NAME + ".tmp"), folder / HEAD_NAME)
    config.save_to(folder / (CONFIG_NAME + ".tmp"))
    fsync_path(folder / (CONFIG_NAME + ".tmp"))
    os.replace(folder / (CONFIG_NAME + ".tmp"), folder / CONFIG_NAME)
    fsync_path(folder)


def fsync_path(path: Path) -> None:
    """Flushes a file or folder to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_head(folder, config: MariaConfig) -> FusionHead:
    path = Path(folder) / HEAD_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a trained MARIA checkpoint: {HEAD_NAME} is missing; "
            "pass the --out folder of a finished `maria train`"
        )
    tensors = load_file(path)
    head = FusionHead(config.mlm_hidden_size, config.ar_hidden_size, config.vocab_size)
    expected = {"weight": tuple(head.linear.weight.shape), "bias": tuple(head.linear.bias.shape)}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise ValueError(
            f"{path} holds tensors {found}, but {CONFIG_NAME} describes {expected}; "
            "the two files come from different runs"
        )
    with torch.no_grad():
        head.linear.weight.copy_(tensors["weight"])
        head.linear.bias.copy_(tensors["bias"])
    return head.eval()


def load_config(folder) -> MariaConfig:
    """A checkpoint's config, once the two backbone folders it names are there."""
    config = MariaConfig.load(folder)
    for role, path in (("MLM", config.mlm_path), ("AR", config.ar_path)):
        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"the {role} backbone folder {path} named by {Path(folder) / CONFIG_NAME} "
                f"does not exist; move it back or fix '{role.lower()}_path' in that file"
            )
    return config


def load_maria(folder, device="cpu", dtype=torch.float32) -> tuple[Backbones, FusionHead, MariaConfig]:
    """Loads a trained checkpoint and the two backbone folders it names."""
    config = load_config(folder)
    backbones = load_backbones(config.mlm_path, config.ar_path, device=device, dtype=dtype)
    return backbones, load_head(folder, config).to(device), config
