"""Small backbones from scratch, for the default model: a byte-level BPE tokenizer both share, a ModernBERT
masked LM (30% masking, as ModernBERT was trained) and an OLMo causal LM, saved as Hugging Face folders."""

import math
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    ModernBertConfig,
    ModernBertForMaskedLM,
    OlmoConfig,
    OlmoForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)

SPECIAL_TOKENS = ["<|endoftext|>", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
ROLES = {
    "mlm": dict(cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", pad_token="[PAD]"),
    "ar": dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="[PAD]"),
}


def train_tokenizer(texts, vocab_size: int, path: Path) -> Path:
    """Byte-level BPE over texts, with the special tokens both backbones need; saved as tokenizer.json."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return Path(path)


def save_tokenizer(tokenizer_json: Path, folder: Path, role: str) -> PreTrainedTokenizerFast:
    """The shared tokenizer as a transformers tokenizer folder, with the special tokens of the role (mlm / ar)."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **ROLES[role])
    tokenizer.save_pretrained(folder)
    return tokenizer


# The shipped default model's size (tools/recipe.py trains it; `--shapes default` benchmarks it).
DEFAULT_SIZE = dict(vocab_size=4096, hidden_size=256, layers=4, heads=4, intermediate_size=512, max_positions=2048)


def backbone_configs(
    vocab_size: int, hidden_size: int, layers: int, heads: int, intermediate_size: int, max_positions: int
) -> dict:
    """Hugging Face config arguments of the pair: a ModernBERT MLM and an OLMo AR of one size, whose special
    ids are SPECIAL_TOKENS' positions (the BPE trainer puts them first)."""
    eos, pad, cls, sep, mask = range(len(SPECIAL_TOKENS))
    size = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
    )
    return {
        "mlm": dict(
            model_type="modernbert",
            **size,
            global_attn_every_n_layers=2,
            local_attention=128,
            pad_token_id=pad,
            cls_token_id=cls,
            sep_token_id=sep,
            bos_token_id=cls,
            eos_token_id=sep,
            mask_token_id=mask,
        ),
        "ar": dict(model_type="olmo", **size, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad),
    }


def new_backbone(kind: str, config: dict):
    """A randomly initialised MLM (kind 'mlm') or AR from backbone_configs' arguments."""
    config = {k: v for k, v in config.items() if k != "model_type"}
    return ModernBertForMaskedLM(ModernBertConfig(**config)) if kind == "mlm" else OlmoForCausalLM(OlmoConfig(**config))


def mlm_batch(windows: np.ndarray, rng: np.random.Generator, tokenizer, mask_rate: float):
    """[CLS] x [SEP] with mask_rate of the content tokens selected: 80% [MASK], 10% random, 10% kept."""
    batch, length = windows.shape
    selected = rng.random((batch, length)) < mask_rate
    action = rng.random((batch, length))
    corrupted = np.where(selected & (action < 0.8), tokenizer.mask_token_id, windows)
    random_ids = rng.integers(len(SPECIAL_TOKENS), len(tokenizer), size=(batch, length))
    corrupted = np.where(selected & (action >= 0.8) & (action < 0.9), random_ids, corrupted)
    cls = np.full((batch, 1), tokenizer.cls_token_id)
    sep = np.full((batch, 1), tokenizer.sep_token_id)
    labels = np.where(selected, windows, -100)
    ignore = np.full((batch, 1), -100)
    as_tensor = lambda *parts: torch.from_numpy(np.concatenate(parts, axis=1).astype(np.int64))
    return dict(input_ids=as_tensor(cls, corrupted, sep), labels=as_tensor(ignore, labels, ignore))


def ar_batch(windows: np.ndarray, tokenizer):
    """[START] x: the model shifts the labels itself."""
    start = np.full((windows.shape[0], 1), tokenizer.eos_token_id)
    ids = torch.from_numpy(np.concatenate([start, windows], axis=1).astype(np.int64))
    return dict(input_ids=ids, labels=ids)


def pretrain(
    model,
    make_batch,
    windows: np.ndarray,
    eval_windows: np.ndarray,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    log=print,
) -> dict:
    """AdamW + warmup/cosine on random windows; returns the held-out loss before and after."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)

    @torch.no_grad()
    def held_out_loss():
        model.eval()
        eval_rng = np.random.default_rng(seed + 1)
        losses = [
            model(**make_batch(eval_windows[i : i + batch_size], eval_rng)).loss.item()
            for i in range(0, min(len(eval_windows), 8 * batch_size), batch_size)
        ]
        model.train()
        return float(np.mean(losses))

    before, began = held_out_loss(), time.perf_counter()
    model.train()
    for step in range(steps):
        loss = model(**make_batch(windows[rng.integers(0, len(windows), batch_size)], rng)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if (step + 1) % max(1, steps // 20) == 0:
            rate = (step + 1) * batch_size * windows.shape[1] / (time.perf_counter() - began)
            log(f"  step {step + 1}/{steps}: loss {loss.item():.3f}, {rate:.0f} tokens/s")
    after = held_out_loss()
    log(f"  held-out loss {before:.3f} -> {after:.3f} (perplexity {math.exp(after):.1f})")
    model.eval()
    return {"held_out_loss_before": before, "held_out_loss_after": after, "seconds": time.perf_counter() - began}
