"""Randomly initialised backbones of given shapes, for benchmarks: speed does not depend on trained weights.

`random_checkpoint` writes an MLM + AR pair of the given configs, a synthetic word-level tokenizer covering their
vocabulary (both folders share it, so the pair passes the vocabulary check), and a product-of-experts head.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from maria_onnx.backbones import AR_FAMILIES, MLM_ADAPTERS, load_backbones
from maria_onnx.checkpoint import maria_config, save_checkpoint
from maria_onnx.model import FusionHead

from .pretrain import DEFAULT_SIZE, SPECIAL_TOKENS, backbone_configs, save_tokenizer

# The paper's pairing at its smallest size: ModernBERT-large and OLMo-1B (their Hugging Face configs' shapes).
PAPER = {
    "mlm": dict(
        model_type="modernbert",
        vocab_size=50368,
        hidden_size=1024,
        intermediate_size=2624,
        num_hidden_layers=28,
        num_attention_heads=16,
        max_position_embeddings=8192,
        global_attn_every_n_layers=3,
        local_attention=128,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        pad_token_id=1,
        cls_token_id=2,
        sep_token_id=3,
        mask_token_id=4,
        bos_token_id=2,
        eos_token_id=3,
    ),
    "ar": dict(
        model_type="olmo",
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=0,
        tie_word_embeddings=True,
    ),
}


AUTO = {"mlm": AutoModelForMaskedLM, "ar": AutoModelForCausalLM}
SHAPES = {"paper": lambda: PAPER, "default": lambda: backbone_configs(**DEFAULT_SIZE)}  # default: the shipped model


def load_shapes(name_or_file: str) -> dict:
    """'paper', 'default', or a JSON file {"mlm": {...config...}, "ar": {...config...}}."""
    if name_or_file in SHAPES:
        return SHAPES[name_or_file]()
    path = Path(name_or_file)
    if not path.is_file():
        raise FileNotFoundError(f"--shapes {name_or_file}: not 'paper', 'default' or a JSON file")
    try:
        shapes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"--shapes {path}: cannot be read as JSON ({error})") from None
    if (
        not isinstance(shapes, dict)
        or set(shapes) != {"mlm", "ar"}
        or not all(isinstance(shapes[k], dict) and "model_type" in shapes[k] for k in shapes)
    ):
        raise ValueError(f'{path} must hold {{"mlm": {{...}}, "ar": {{...}}}} Hugging Face configs with model_type')
    check_configs(shapes, path)
    return shapes


def check_configs(shapes: dict, path: Path) -> None:
    """Names the first thing in a --shapes file that gives no supported model pair."""
    for kind, supported in (("mlm", MLM_ADAPTERS), ("ar", AR_FAMILIES)):
        if shapes[kind]["model_type"] not in supported:
            raise ValueError(
                f"{path}: the {kind} config is a {shapes[kind]['model_type']!r} model; supported: "
                f"{', '.join(sorted(supported))}"
            )
        if type(shapes[kind].get("vocab_size")) is not int:
            raise ValueError(f"{path}: the {kind} config needs vocab_size, an integer (the pair shares a vocabulary)")
        positions = shapes[kind].get("max_position_embeddings", 3)
        if type(positions) is not int or positions < 3:
            raise ValueError(
                f"{path}: the {kind} config's max_position_embeddings must be an integer of at least 3, "
                f"got {positions!r}"
            )
    for kind in AUTO:
        try:  # built on the meta device: the library's own checks, no memory, no time
            with torch.device("meta"):
                AUTO[kind].from_config(model_config(shapes[kind]))
        except (AssertionError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: the {kind} config builds no model ({error})") from None


def model_config(config: dict):
    """A Hugging Face config object from a config dict with its model_type."""
    config = dict(config)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def synthetic_tokenizer(vocab_size: int, path: Path) -> Path:
    """A word-level tokenizer of vocab_size entries: SPECIAL_TOKENS, [UNK], then placeholder words."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ["[UNK]"])}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def random_checkpoint(shapes: dict, folder: Path, seed: int = 0) -> Path:
    """Writes folder/mlm, folder/ar and the checkpoint folder/maria; returns the checkpoint."""
    torch.manual_seed(seed)
    folder = Path(folder)
    tokenizer_json = synthetic_tokenizer(shapes["ar"]["vocab_size"], folder / "tokenizer.json")
    for kind, auto in AUTO.items():
        auto.from_config(model_config(shapes[kind])).save_pretrained(folder / kind)
        save_tokenizer(tokenizer_json, folder / kind, kind)
    backbones = load_backbones(folder / "mlm", folder / "ar")
    save_checkpoint(
        folder / "maria",
        FusionHead.product_of_experts(backbones),
        maria_config(backbones, folder / "mlm", folder / "ar", {"random_weights": True}, 0),
    )
    return folder / "maria"
