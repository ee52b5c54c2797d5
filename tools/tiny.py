"""Tiny random backbones and a tiny byte-level BPE tokenizer, made offline (nothing is downloaded): the tests'
models, and `maria tiny-backbones` for a first try of train -> export -> infill without a model hub."""

import random
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Olmo2Config,
    OlmoConfig,
    PretrainedConfig,
    Qwen2Config,
)

from .pretrain import backbone_configs, new_backbone, save_tokenizer, train_tokenizer

WORDS = (
    "the a an of to in is was for on with as by at from raise return import class function value list "
    "error exception statement module string number loop file object method name type data python code "
    "call run use used make new old first last each every other some many small large quick brown fox"
).split()


def corpus(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))).capitalize() + "." for _ in range(count)]


def tokenizer_file(folder: Path, seed: int = 0, vocab_size: int = 300) -> Path:
    return train_tokenizer(corpus(400, seed), vocab_size, Path(folder) / "tokenizer.json")


AR_TYPES = ("olmo", "olmo2", "llama", "qwen2")


# The tiny pair's size; the MLM has 2 attention heads, the AR 4, and the MLM's local attention spans 16 tokens.
TINY = dict(hidden_size=32, layers=2, intermediate_size=64, max_positions=512)


def ar_config(ar_type: str, vocab_size: int) -> PretrainedConfig:
    """A tiny causal LM of ar_type, untied, whose special ids are SPECIAL_TOKENS' positions."""
    common = backbone_configs(vocab_size, heads=4, **TINY)["ar"]
    del common["model_type"]
    common["tie_word_embeddings"] = False
    if ar_type == "olmo":
        return OlmoConfig(**common)
    if ar_type == "olmo2":
        return Olmo2Config(**common)
    if ar_type == "llama":
        return LlamaConfig(num_key_value_heads=2, **common)  # grouped-query attention
    if ar_type == "qwen2":
        return Qwen2Config(num_key_value_heads=2, **common)  # grouped-query attention, q/k/v biases
    raise ValueError(f"the causal LM must be one of {', '.join(AR_TYPES)}, got '{ar_type}'")


def make_pair(
    root: Path, ar_type: str = "olmo", seed: int = 0, ar_tokenizer_seed: int | None = None
) -> tuple[Path, Path]:
    """Writes tiny random MLM and AR folders under root; returns (mlm_dir, ar_dir)."""
    torch.manual_seed(seed)
    root = Path(root)
    tok_json = tokenizer_file(root / "tok", seed=0)
    mlm_dir, ar_dir = root / "mlm", root / f"ar-{ar_type}"
    mlm_tok = save_tokenizer(tok_json, mlm_dir, "mlm")
    ar_tok_json = tok_json if ar_tokenizer_seed is None else tokenizer_file(root / "tok-ar", seed=ar_tokenizer_seed)
    ar_tok = save_tokenizer(ar_tok_json, ar_dir, "ar")
    mlm_config = backbone_configs(len(mlm_tok), heads=2, **TINY)["mlm"] | dict(local_attention=16)
    mlm = new_backbone("mlm", mlm_config)
    mlm.save_pretrained(mlm_dir)
    ar = AutoModelForCausalLM.from_config(ar_config(ar_type, len(ar_tok)))
    ar.save_pretrained(ar_dir)
    return mlm_dir, ar_dir


def write_corpus(path: Path, count: int = 300, seed: int = 1) -> Path:
    path.write_text("\n".join(corpus(count, seed)) + "\n")
    return path


def make_checkpoint(mlm_dir: Path, ar_dir: Path, folder: Path, noise: float = 0.05, seed: int = 0) -> Path:
    """A checkpoint without training: the product-of-experts head, perturbed so both halves of W matter."""
    from maria_onnx.backbones import load_backbones
    from maria_onnx.checkpoint import maria_config, save_checkpoint
    from maria_onnx.model import FusionHead

    backbones = load_backbones(mlm_dir, ar_dir)
    head = FusionHead.product_of_experts(backbones)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.linear.weight.add_(noise * torch.randn(head.linear.weight.shape, generator=generator))
        head.linear.bias.add_(noise * torch.randn(head.linear.bias.shape, generator=generator))
    save_checkpoint(folder, head, maria_config(backbones, mlm_dir, ar_dir, {}, 0))
    return Path(folder)


def tiny_backbones(out: Path, ar_type: str = "olmo", seed: int = 0) -> dict[str, Path]:
    """`maria tiny-backbones`: a tiny random ModernBERT, a tiny random causal LM of ar_type sharing its
    vocabulary, and a small training text, under out; their paths by name (mlm, ar, data)."""
    if ar_type not in AR_TYPES:
        raise ValueError(f"--ar-type must be one of {', '.join(AR_TYPES)}, got '{ar_type}'")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; give a new folder for the tiny backbones")
    out.mkdir(parents=True, exist_ok=True)
    mlm, ar = make_pair(out, ar_type, seed)
    return {"mlm": mlm, "ar": ar, "data": write_corpus(out / "train.txt", seed=seed + 1)}
