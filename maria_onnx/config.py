"""Configuration of a MARIA checkpoint: what the two backbones are, their shared ids, how the head was trained.

A trained checkpoint is a folder:
    head.safetensors    tensors `weight` [V, D_mlm + D_ar] and `bias` [V]
    maria_config.json   MariaConfig.to_dict()
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime.manifest import from_dict

CONFIG_NAME = "maria_config.json"
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
    mask_rate_min: float = 0.0       # per-sequence mask rate ~ U(mask_rate_min, mask_rate_max)
    mask_rate_max: float = 1.0
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 100
    seed: int = 0
    text_field: str = "text"         # JSONL field holding the text
    line_documents: bool = False     # plain text: one document per line instead of one per file

    def __post_init__(self):
        if not 0.0 <= self.mask_rate_min < self.mask_rate_max <= 1.0:
            raise ValueError(f"mask rate range ({self.mask_rate_min}, {self.mask_rate_max}) is invalid; "
                             "use 0 <= --mask-rate-min < --mask-rate-max <= 1")
        for name in ("steps", "seq_len", "batch_size", "eval_every", "save_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass(frozen=True)
class MariaConfig:
    """Everything that describes a MARIA model apart from the head's tensors. Keys follow HF config names."""
    mlm_path: str                    # local Hugging Face folder of the masked LM
    ar_path: str                     # local Hugging Face folder of the causal LM
    mlm_model_type: str
    ar_model_type: str
    mlm_hidden_size: int
    ar_hidden_size: int
    vocab_size: int                  # V: the AR's vocabulary size
    cls_token_id: int
    sep_token_id: int
    mask_token_id: int
    start_token_id: int              # AR bos, or eos where it has none
    pad_token_id: int
    train: dict = field(default_factory=dict)   # TrainConfig.to_dict() of the run that made the head
    trained_steps: int = 0

    @property
    def special_token_ids(self) -> list[int]:
        return sorted({self.cls_token_id, self.sep_token_id, self.mask_token_id,
                       self.start_token_id, self.pad_token_id})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MariaConfig":
        return from_dict(cls, data, CONFIG_NAME, "re-run `maria train`, or fix the file")

    def save_to(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "MariaConfig":
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a MARIA checkpoint: {CONFIG_NAME} is missing; "
                                    "pass the --out folder of `maria train`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); re-run `maria train` to rewrite it") from None
        return cls.from_dict(data)
