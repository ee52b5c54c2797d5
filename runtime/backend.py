"""The decode loop's contract: what a backend provides and the special ids every layer shares.

Two backends implement `Backend`: `runtime.onnx_backend.OnnxBackend` (ONNX Runtime) and
`maria_onnx.reference.TorchBackend` (eager PyTorch, the parity oracle). The loop in `runtime.decode` is written
against this protocol only, so both run the same orchestration and parity tests compare like with like.
"""

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

SPECIAL_NAMES = ("cls", "sep", "mask", "start", "pad")


@dataclass(frozen=True)
class SpecialIds:
    """The five ids MARIA's conventions use: the MLM sees [CLS] x~ [SEP] with [MASK] at masked positions and
    [PAD] after the text; the AR sees [START] x."""

    cls: int
    sep: int
    mask: int
    start: int  # the AR's bos, or its eos where it has none
    pad: int

    def __post_init__(self) -> None:
        for name in SPECIAL_NAMES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"special id '{name}' must be a non-negative integer, got {value!r}")

    @property
    def all(self) -> list[int]:
        return sorted({self.cls, self.sep, self.mask, self.start, self.pad})

    @classmethod
    def from_dict(cls, data: object) -> "SpecialIds":
        if not isinstance(data, dict) or set(data) != set(SPECIAL_NAMES):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"special ids must be an object with keys {list(SPECIAL_NAMES)}, got {found}")
        return cls(**data)


class MlmPass(Protocol):
    """The MLM pass alone, which Backend and SlotBackend both give."""

    def mlm_hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """As in Backend."""


class Backend(Protocol):
    """What the decode loop needs from a model: numpy arrays in and out, the KV cache an opaque value.

    Shapes: b sequences, L MLM positions ([CLS] x~ [SEP] and padding), T new AR tokens, P AR tokens already in
    the cache, r rows to fuse.
    """

    def mlm_hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """input_ids, attention_mask [b, L] int64 -> the MLM's head-transform output [b, L, d_mlm]."""

    def empty_past(self, batch: int) -> Any:
        """The KV cache of `batch` sequences with nothing fed yet (P = 0)."""

    def ar_step(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Any
    ) -> tuple[np.ndarray, Any]:
        """input_ids [b, T], attention_mask [b, P + T] (0 over padding), position_ids [b, T], past (P tokens)
        -> (the AR's last hidden state [b, T, d_ar], the cache with P + T tokens)."""

    def fuse(self, mlm_hidden: np.ndarray, ar_hidden: np.ndarray) -> np.ndarray:
        """mlm_hidden [r, d_mlm], ar_hidden [r, d_ar] -> the fusion head's logits [r, V] (fp32)."""


class HeadsBackend(Backend, Protocol):
    """A Backend with the backbones' own heads (a bundle's ar_lm_head.onnx and mlm_decoder.onnx): what scoring
    whole texts by the AR and the baselines need."""

    def ar_logits(self, ar_hidden: np.ndarray) -> np.ndarray:
        """ar_hidden [r, d_ar] -> the AR's own next-token logits [r, V] (fp32)."""

    def mlm_logits(self, mlm_hidden: np.ndarray) -> np.ndarray:
        """mlm_hidden [r, d_mlm] -> the MLM's own logits [r, V] (fp32)."""


class SlotBackend(Protocol):
    """What the decode engine (runtime/engine.py) needs: the step graph over a KV cache of slots, written in place
    (runtime/slots.py), beside the MLM pass and the fusion head of `Backend`.

    Shapes: rows <= slots sequences (the cache's first rows slots), T new tokens per row, C cache positions.
    """

    def mlm_hidden(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """As in Backend."""

    def new_cache(self, slots: int, capacity: int) -> Any:
        """An empty cache of `slots` slots with `capacity` positions each (a runtime.slots.SlotCache)."""

    def cache_step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache: Any) -> np.ndarray:
        """input_ids, position_ids [rows, T] (a row's tokens at its positions; right padding at positions the row
        has not reached) -> the AR's last hidden state [rows, T, d_ar]; the chunk's keys and values are written
        into the first rows slots of the cache at position_ids. A token sees the positions <= its own."""

    def fuse(self, mlm_hidden: np.ndarray, ar_hidden: np.ndarray) -> np.ndarray:
        """As in Backend."""

    def fuse_best(
        self, mlm_hidden: np.ndarray, ar_hidden: np.ndarray, banned: list[int], refused: list | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The greedy fills: as fuse, then each row's best id that is neither banned nor in refused[r] (where that
        is not None), and its log-probability under the head's distribution [r] (runtime/choose.py's best_tokens;
        the logits need not leave the device)."""

    def mlm_logits(self, mlm_hidden: np.ndarray) -> np.ndarray:
        """mlm_hidden [r, d_mlm] -> the MLM's own logits [r, V] (fp32): the drafts of speculative infilling."""

    def mlm_best(self, mlm_hidden: np.ndarray, banned: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The MLM's own best id per row that is not banned, and its log-probability among the ids not banned:
        greedy drafts and how sure the head is of them."""
