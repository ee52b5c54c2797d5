"""L_MARIA training of the fusion head; the backbones stay frozen.

Runs on one CPU or GPU, or on many GPUs / nodes under `accelerate launch` (Hugging Face Accelerate).
Batches are drawn from a generator seeded by (seed, step), so a run is repeatable and resumes exactly.
The training state is saved atomically: written beside the last one, synced, then swapped in by renames, so a
run killed during a save resumes from the previous save.
"""

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from maria_onnx.runtime.text import plain_encoder
from maria_onnx.runtime.windows import pack_windows

from .backbones import load_backbones, torch_device
from .checkpoint import fsync_path, maria_config, save_checkpoint
from .config import MariaConfig, TrainConfig
from .data import random_masks, read_documents, split_windows
from .model import FusionHead, masked_nll, teacher_forced_hidden

STATE_DIR = "train_state"
EVAL_FRACTION = 0.05
FREE_ON_RESUME = {"steps", "eval_every", "eval_batches", "save_every"}  # settings a resumed run may change


def _windows(backbones, config: TrainConfig, data, eval_data):
    read = lambda path: read_documents(path, config.text_field, config.line_documents)
    pack = lambda path: pack_windows(
        read(path), plain_encoder(backbones.tokenizer), config.seq_len, backbones.special.start, str(path)
    )
    train = pack(data)
    if eval_data is not None:
        return train, pack(eval_data)
    return split_windows(train, EVAL_FRACTION, config.seed)


def _batch(windows, rng, config: TrainConfig, accelerator):
    """The global batch for one step, then this process's share of it."""
    size = config.batch_size * accelerator.num_processes
    ids = windows[rng.integers(0, len(windows), size=size)]
    masked = random_masks(rng, size, config.seq_len, config.mask_rate_min, config.mask_rate_max)
    share = slice(accelerator.process_index * config.batch_size, (accelerator.process_index + 1) * config.batch_size)
    to = lambda a: torch.from_numpy(a[share]).to(accelerator.device)
    return to(ids), to(masked)


def _loss(backbones, head, ids, masked, accelerator):
    with accelerator.autocast():
        mlm_hidden, ar_hidden = teacher_forced_hidden(backbones, ids, masked)
        return masked_nll(head, mlm_hidden, ar_hidden, ids, masked)


@torch.no_grad()
def evaluate(backbones, head, windows, config: TrainConfig, accelerator) -> float:
    """Masked-token perplexity on held-out windows, with masks fixed by the seed."""
    rng = np.random.default_rng([config.seed, 1])
    total, count = 0.0, 0
    for start in range(0, min(len(windows), config.eval_batches * config.batch_size), config.batch_size):
        ids = windows[start : start + config.batch_size]
        masked = random_masks(rng, len(ids), config.seq_len, config.mask_rate_min, config.mask_rate_max)
        nll = _loss(
            backbones,
            head,
            torch.from_numpy(ids).to(accelerator.device),
            torch.from_numpy(masked).to(accelerator.device),
            accelerator,
        )
        total, count = total + nll.sum().item(), count + nll.numel()
    return math.exp(total / count)


def _sync_folder(folder: Path) -> None:
    """Flushes every file of folder, and the folder itself, to disk."""
    for path in [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]:
        fsync_path(path)


def _swap_in(new: Path, state: Path) -> None:
    """Replaces state by the complete folder new; the old state is kept until new is in place."""
    old = state.with_name(f".{STATE_DIR}.old")
    shutil.rmtree(old, ignore_errors=True)
    if state.exists():
        os.replace(state, old)
    os.replace(new, state)
    _sync_folder(state.parent)
    shutil.rmtree(old, ignore_errors=True)


def _check_out(out: Path, mlm_path, ar_path) -> None:
    """--out is a folder, new or holding a checkpoint of these backbones: a run into another pair's checkpoint would
    resume its state or overwrite its head, and leave a head that does not belong to the backbones it names."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; --out names the checkpoint folder to write")
    try:
        earlier = MariaConfig.load(out)
    except (FileNotFoundError, ValueError):  # no checkpoint yet, or a torn config this run rewrites
        return
    given = {"--mlm": str(Path(mlm_path).resolve()), "--ar": str(Path(ar_path).resolve())}
    saved = {"--mlm": earlier.mlm_path, "--ar": earlier.ar_path}
    if given != saved:
        named = " ".join(f"{option} {path}" for option, path in saved.items())
        raise ValueError(
            f"{out} holds a checkpoint of other backbones ({named}); pass those to resume it, or a new --out"
        )


def _damaged(state: Path, reason: str) -> ValueError:
    return ValueError(
        f"the training state in {state} is damaged ({reason}); delete that folder to restart "
        "training from step 0, or pass a new --out"
    )


def _resume(accelerator, state: Path, config: TrainConfig) -> int:
    """Loads optimizer/scheduler/head state if an earlier run left one; returns the step to start at."""
    old = state.with_name(f".{STATE_DIR}.old")
    if not state.exists() and old.is_dir() and accelerator.is_main_process:
        os.replace(old, state)  # a run killed between the two renames of a save
    accelerator.wait_for_everyone()
    info = state / "step.json"
    if not state.exists():
        return 0
    if not info.is_file():
        raise _damaged(state, "step.json is missing")
    empty = sorted(p.name for p in state.rglob("*") if p.is_file() and p.stat().st_size == 0)
    if empty:
        raise _damaged(state, f"{', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty")
    try:
        saved = json.loads(info.read_text())
    except ValueError as error:
        raise _damaged(state, f"step.json is not valid JSON: {error}") from None
    changed = {
        k for k, v in dataclasses.asdict(config).items() if k not in FREE_ON_RESUME and saved["train"].get(k) != v
    }
    if changed:
        raise ValueError(
            f"{state.parent} holds an interrupted run with other settings ({', '.join(sorted(changed))}); "
            "pass the same settings to resume, or a new --out to start afresh"
        )
    try:
        accelerator.load_state(str(state))
    except Exception as error:  # torch and safetensors raise many types for a torn file
        first_line = (str(error).splitlines() or [""])[0]
        raise _damaged(state, f"{type(error).__name__}: {first_line}") from None
    return saved["step"]


def _save(accelerator, head, out: Path, step: int, config: TrainConfig, model_config: MariaConfig):
    """Writes the state beside the last one, then swaps it in; the head and config files are replaced atomically,
    first, so a state never lies beside a config naming other backbones (_check_out reads the config)."""
    new = out / f".{STATE_DIR}.new"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(new, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(new))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (new / "step.json").write_text(json.dumps({"step": step, "train": dataclasses.asdict(config)}))
        _sync_folder(new)
        save_checkpoint(out, accelerator.unwrap_model(head), dataclasses.replace(model_config, trained_steps=step))
        _swap_in(new, out / STATE_DIR)
    accelerator.wait_for_everyone()


def train(
    mlm_path, ar_path, data, out, config: TrainConfig, eval_data=None, device: str = "auto", log=print
) -> MariaConfig:
    """Trains the fusion head with L_MARIA and writes a checkpoint to `out`; returns its config."""
    on_cpu = torch_device(device) == "cpu"
    accelerator = Accelerator(cpu=on_cpu, mixed_precision="no" if on_cpu else "bf16")
    set_seed(config.seed)
    out = Path(out)
    _check_out(out, mlm_path, ar_path)
    backbones = load_backbones(mlm_path, ar_path, device=accelerator.device)
    longest = min(backbones.mlm.config.max_position_embeddings - 2, backbones.ar.config.max_position_embeddings)
    if config.seq_len > longest:
        raise ValueError(
            f"--seq-len {config.seq_len} is over the backbones' maximum of {longest} tokens "
            "(the MLM also sees [CLS] and [SEP]); lower --seq-len"
        )
    train_windows, eval_windows = _windows(backbones, config, data, eval_data)
    model_config = maria_config(backbones, mlm_path, ar_path, dataclasses.asdict(config), 0)
    head = FusionHead.product_of_experts(backbones).to(accelerator.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    head, optimizer, scheduler = accelerator.prepare(head, optimizer, scheduler)
    start = _resume(accelerator, out / STATE_DIR, config)
    if accelerator.is_main_process:
        log(
            f"training on {len(train_windows)} windows of {config.seq_len} tokens, evaluating on "
            f"{len(eval_windows)}; {accelerator.num_processes} process(es) on {accelerator.device}; "
            f"starting at step {start} of {config.steps}"
        )
    progress = tqdm(
        range(start, config.steps),
        initial=start,
        total=config.steps,
        disable=not accelerator.is_main_process,
        desc="train",
    )
    tokens_per_step = config.batch_size * config.seq_len * accelerator.num_processes
    began = time.perf_counter()
    for step in progress:
        head.train()
        ids, masked = _batch(train_windows, np.random.default_rng([config.seed, 0, step]), config, accelerator)
        loss = _loss(backbones, head, ids, masked, accelerator).mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(head.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        rate = tokens_per_step * (step + 1 - start) / (time.perf_counter() - began)
        progress.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{rate:.0f}")
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            head.eval()
            ppl = evaluate(backbones, head, eval_windows, config, accelerator)
            if accelerator.is_main_process:
                progress.write(f"step {done}: held-out masked-token perplexity {ppl:.3f}")
        if done % config.save_every == 0 or done == config.steps:
            _save(accelerator, head, out, done, config, model_config)
    if start >= config.steps:
        _save(accelerator, head, out, start, config, model_config)
    return dataclasses.replace(model_config, trained_steps=max(start, config.steps))
