"""Loading the frozen MLM + AR pair from local Hugging Face folders and checking that they share a vocabulary.

Each family differs only in where its pieces live; one small adapter per family says how:
    MLM: `mlm_hidden(mlm, input_ids, attention_mask)` -> [batch, seq, d_mlm], the input of its vocabulary decoder
    AR:  the base model's last hidden state (after the final norm), the input of its LM head
"""

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from maria_onnx.runtime.backend import SpecialIds
from maria_onnx.runtime.device import choose_device
from maria_onnx.runtime.utf8 import Utf8Rule

PROBE_TEXT = "MARIA fills masked tokens: the quick brown fox jumps over 13 lazy dogs, doesn't it?\n\tDone."

# MLM families: how to get the prediction-head transform output and the vocabulary decoder.
MLM_ADAPTERS = {
    "modernbert": dict(
        hidden=lambda mlm, ids, mask: mlm.head(mlm.model(input_ids=ids, attention_mask=mask).last_hidden_state),
        decoder=lambda mlm: mlm.decoder,
    ),
}
# AR families whose base model returns the final-normed hidden state and whose LM head has no bias.
AR_FAMILIES = ("olmo", "olmo2", "llama", "mistral", "qwen2", "qwen3")


@dataclass
class Backbones:
    """The frozen pair, its tokenizer, and the ids the MARIA conventions use."""

    mlm: torch.nn.Module
    ar: torch.nn.Module
    tokenizer: object
    mlm_model_type: str
    ar_model_type: str
    vocab_size: int
    special: SpecialIds

    def mlm_hidden(self, input_ids, attention_mask):
        """[batch, seq] -> [batch, seq, d_mlm]: the MLM's prediction-head transform output."""
        return MLM_ADAPTERS[self.mlm_model_type]["hidden"](self.mlm, input_ids, attention_mask)

    def mlm_decoder(self) -> torch.nn.Linear:
        return MLM_ADAPTERS[self.mlm_model_type]["decoder"](self.mlm)

    def ar_hidden(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        """AR base model step -> (last_hidden_state [batch, seq, d_ar], past_key_values)."""
        out = self.ar.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
        )
        return out.last_hidden_state, out.past_key_values

    @property
    def mlm_hidden_size(self) -> int:
        return self.mlm.config.hidden_size

    @property
    def ar_hidden_size(self) -> int:
        return self.ar.config.hidden_size

    @property
    def max_sequence_length(self) -> int:
        return max_sequence_length(self.mlm.config, self.ar.config)

    @cached_property
    def utf8(self) -> Utf8Rule:
        """The rule for whole-character fills that the runtime builds from the bundle's tokenizer (the AR's)."""
        return Utf8Rule.from_tokenizer(self.tokenizer, self.vocab_size, self.special.all)


def max_sequence_length(mlm_config, ar_config) -> int:
    """The longest text (in tokens) the pair takes: the MLM reads it between [CLS] and [SEP], the AR after its start
    token."""
    return min(mlm_config.max_position_embeddings - 2, ar_config.max_position_embeddings - 1)


def torch_device(device: str) -> str:
    """'cuda', 'cuda:N' or 'cpu' for PyTorch, from --device auto|cuda|cuda:N|cpu (runtime.device.choose_device)."""
    chosen = choose_device(device, None if torch.cuda.is_available() else "PyTorch sees no CUDA device")
    return device if chosen == "cuda" and device.startswith("cuda:") else chosen


def _check_folder(path: Path, role: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{role} folder {path} has no config.json; pass a local Hugging Face model folder "
            "(saved with save_pretrained)"
        )
    return path


def _model_type(path: Path, role: str, supported) -> str:
    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if model_type not in supported:
        raise ValueError(
            f"{role} at {path} is a '{model_type}' model; supported {role} architectures: "
            f"{', '.join(sorted(supported))}"
        )
    return model_type


def check_shared_vocabulary(mlm_tokenizer, ar_tokenizer, ar_vocab_size: int, mlm_vocab_size: int) -> None:
    """Raises ValueError naming what differs unless the MLM uses the AR's token ids for the AR's vocabulary."""
    mlm_vocab, ar_vocab = mlm_tokenizer.get_vocab(), ar_tokenizer.get_vocab()
    missing = [t for t in ar_vocab if t not in mlm_vocab]
    moved = [t for t in ar_vocab if t in mlm_vocab and mlm_vocab[t] != ar_vocab[t]]
    if missing or moved:
        examples = [f"{t!r}: AR {ar_vocab[t]} vs MLM {mlm_vocab[t]}" for t in moved[:3]] + [
            f"{t!r} only in AR" for t in missing[:3]
        ]
        raise ValueError(
            f"the MLM and AR tokenizers do not share a vocabulary: {len(moved)} tokens have other ids, "
            f"{len(missing)} AR tokens are missing from the MLM (e.g. {'; '.join(examples)}); "
            "MARIA needs an MLM whose tokenizer extends the AR's"
        )
    mlm_ids = mlm_tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    ar_ids = ar_tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    if mlm_ids != ar_ids:
        raise ValueError(
            f"the MLM and AR tokenizers encode the same text differently (MLM {mlm_ids[:8]}... vs "
            f"AR {ar_ids[:8]}...): same vocabulary, other merges or normalization; use a matched pair"
        )
    if mlm_vocab_size < ar_vocab_size:
        raise ValueError(
            f"the MLM's output vocabulary ({mlm_vocab_size}) is smaller than the AR's ({ar_vocab_size}); "
            "MARIA predicts over the AR's vocabulary and needs the MLM to cover it"
        )


def load_backbones(mlm_path, ar_path, device="cpu", dtype=torch.float32) -> Backbones:
    """Loads and checks the pair from local folders (nothing is downloaded); both are frozen and in eval mode."""
    mlm_path, ar_path = _check_folder(mlm_path, "MLM"), _check_folder(ar_path, "AR")
    mlm_type = _model_type(mlm_path, "MLM", MLM_ADAPTERS)
    ar_type = _model_type(ar_path, "AR", AR_FAMILIES)
    mlm_tokenizer = AutoTokenizer.from_pretrained(mlm_path, local_files_only=True)
    ar_tokenizer = AutoTokenizer.from_pretrained(ar_path, local_files_only=True)
    mlm = AutoModelForMaskedLM.from_pretrained(mlm_path, local_files_only=True, dtype=dtype)
    ar = AutoModelForCausalLM.from_pretrained(ar_path, local_files_only=True, dtype=dtype)
    check_shared_vocabulary(mlm_tokenizer, ar_tokenizer, ar.config.vocab_size, mlm.config.vocab_size)
    if mlm_tokenizer.mask_token_id is None:
        raise ValueError(f"the MLM tokenizer at {mlm_path} has no mask token; MARIA needs the MLM's [MASK] id")
    start = ar_tokenizer.bos_token_id if ar_tokenizer.bos_token_id is not None else ar_tokenizer.eos_token_id
    if start is None:
        raise ValueError(f"the AR tokenizer at {ar_path} has neither a bos nor an eos token to start sequences with")
    cls_id = mlm_tokenizer.cls_token_id if mlm_tokenizer.cls_token_id is not None else mlm_tokenizer.bos_token_id
    sep_id = mlm_tokenizer.sep_token_id if mlm_tokenizer.sep_token_id is not None else mlm_tokenizer.eos_token_id
    if cls_id is None or sep_id is None:
        raise ValueError(f"the MLM tokenizer at {mlm_path} lacks a CLS or SEP token")
    pad = mlm_tokenizer.pad_token_id if mlm_tokenizer.pad_token_id is not None else sep_id
    for model in (mlm, ar):
        model.to(device).eval().requires_grad_(False)
    return Backbones(
        mlm=mlm,
        ar=ar,
        tokenizer=ar_tokenizer,
        mlm_model_type=mlm_type,
        ar_model_type=ar_type,
        vocab_size=ar.config.vocab_size,
        special=SpecialIds(cls=cls_id, sep=sep_id, mask=mlm_tokenizer.mask_token_id, start=start, pad=pad),
    )
