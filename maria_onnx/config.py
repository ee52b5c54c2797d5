"""Configuration of a MARIA checkpoint: what the two backbones are, their shared ids, how the head was trained.

A trained checkpoint is a folder:
    head.safetensors    tensors `weight` [V, D_mlm + D_ar] and `bias` [V]
    maria_config.json   MariaConfig.to_dict()
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from maria_onnx.runtime.backend import SpecialIds
from maria_onnx.runtime.manifest import CHECKPOINT_CONFIG as CONFIG_NAME
from maria_onnx.runtime.manifest import from_dict

HEAD_NAME = "head.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Settings of L_MARIA training (the `maria train` knobs)."""

    steps: int = 1000
    seq_len: int = 128
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    mask_rate_min: float = 0.0  # per-sequence mask rate ~ U(mask_rate_min, mask_rate_max)
    mask_rate_max: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 100
    seed: int = 0
    text_field: str = "text"  # JSONL field holding the text
    line_documents: bool = False  # plain text: one document per line instead of one per file

    def __post_init__(self):
        if not 0.0 <= self.mask_rate_min < self.mask_rate_max <= 1.0:
            raise ValueError(
                f"mask rate range ({self.mask_rate_min}, {self.mask_rate_max}) is invalid; "
                "use 0 <= --mask-rate-min < --mask-rate-max <= 1"
            )
        for name in ("steps", "seq_len", "batch_size", "eval_every", "save_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be a positive number, got {self.learning_rate}")


def _with_special_ids(data: dict) -> dict:
    """Five *_token_id keys -> one special_ids object."""
    names = {
        "cls": "cls_token_id",
        "sep": "sep_token_id",
        "mask": "mask_token_id",
        "start": "start_token_id",
        "pad": "pad_token_id",
    }
    rest = {k: v for k, v in data.items() if k not in names.values()}
    return {**rest, "special_ids": {name: data.get(key) for name, key in names.items()}}


@dataclass(frozen=True)
class MariaConfig:
    """Everything that describes a MARIA model apart from the head's tensors. Keys follow HF config names."""

    mlm_path: str  # local Hugging Face folder of the masked LM
    ar_path: str  # local Hugging Face folder of the causal LM
    mlm_model_type: str
    ar_model_type: str
    mlm_hidden_size: int
    ar_hidden_size: int
    vocab_size: int  # V: the AR's vocabulary size
    special_ids: SpecialIds  # cls, sep, mask, start (AR bos, or eos where it has none), pad
    train: dict = field(default_factory=dict)  # TrainConfig.to_dict() of the run that made the head
    trained_steps: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MariaConfig":
        fix = "re-run `maria train`, or fix the file"
        if isinstance(data, dict) and "special_ids" not in data and "mask_token_id" in data:
            data = _with_special_ids(data)  # checkpoints written before the ids were grouped
        config = from_dict(cls, data, CONFIG_NAME, fix)
        return dataclasses.replace(config, special_ids=SpecialIds.from_dict(config.special_ids))

    def save_to(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "MariaConfig":
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} is not a MARIA checkpoint: {CONFIG_NAME} is missing; pass the --out folder of `maria train`"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); re-run `maria train` to rewrite it") from None
        return cls.from_dict(data)
