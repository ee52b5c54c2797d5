"""The default model, reproducibly, in one command:

    python -m maria_onnx.tools.recipe --work runs/default [--install]

corpus (Python 3.11 docs, split by document) -> BPE tokenizer -> ModernBERT MLM and OLMo AR from scratch
-> MARIA head (`maria train`) -> bundle (`maria export`) -> quality table on the held-out test documents.
Each stage writes its output under --work and is skipped when that output is already there, so an interrupted
run continues. --install copies the bundle and its quality table into runtime/default_model/.
"""

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from maria_onnx.config import TrainConfig
from maria_onnx.data import read_documents
from maria_onnx.export.bundle import export_bundle
from maria_onnx.runtime.default_model import DEFAULT_MODEL
from maria_onnx.runtime.evaluate import document_windows, draw_masks, evaluate_maria
from maria_onnx.runtime.evaluate import evaluate_baselines as onnx_baselines
from maria_onnx.runtime.infiller import Infiller
from maria_onnx.runtime.text import plain_encoder
from maria_onnx.runtime.windows import pack_windows
from maria_onnx.train import train

from . import run_main
from .corpus import build_corpus, download_python_docs
from .pretrain import (
    DEFAULT_SIZE,
    SPECIAL_TOKENS,
    ar_batch,
    backbone_configs,
    mlm_batch,
    new_backbone,
    pretrain,
    save_tokenizer,
    train_tokenizer,
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    vocab_size: int = DEFAULT_SIZE["vocab_size"]
    hidden_size: int = DEFAULT_SIZE["hidden_size"]
    layers: int = DEFAULT_SIZE["layers"]
    heads: int = DEFAULT_SIZE["heads"]
    intermediate_size: int = DEFAULT_SIZE["intermediate_size"]
    max_positions: int = DEFAULT_SIZE["max_positions"]  # RoPE in both: the bundle accepts up to 2046 tokens
    seq_len: int = 128
    batch_size: int = 32
    mlm_steps: int = 1600
    ar_steps: int = 1600
    learning_rate: float = 1e-3
    mlm_mask_rate: float = 0.3
    head_steps: int = 1200
    head_batch_size: int = 16
    head_learning_rate: float = 5e-4
    eval_windows: int = 128
    eval_rates: tuple = (0.15, 0.5, 0.9)
    seed: int = 0

    def backbone_configs(self) -> dict:
        return backbone_configs(
            self.vocab_size, self.hidden_size, self.layers, self.heads, self.intermediate_size, self.max_positions
        )


TEST_WINDOWS = Path(__file__).resolve().parent.parent / "tests" / "data" / "default_model_eval_windows.npy"
QUICK = dict(
    vocab_size=512,
    hidden_size=32,
    layers=2,
    intermediate_size=64,
    mlm_steps=20,
    ar_steps=20,
    head_steps=10,
    eval_windows=8,
    batch_size=8,
)


def run(work: Path, recipe: Recipe, log=print) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    def stage(name, body):
        done = work / f".done-{name}"
        if done.exists():
            log(f"[{name}] already done ({timings.get(name, 0):.0f}s)")
            return
        log(f"[{name}]")
        began = time.perf_counter()
        body()
        timings[name] = time.perf_counter() - began
        timings_path.write_text(json.dumps(timings, indent=2))
        done.touch()

    corpus = work / "corpus"
    stage("corpus", lambda: log(f"  documents: {build_corpus(download_python_docs(work / 'debian'), corpus)}"))
    stage(
        "tokenizer",
        lambda: train_tokenizer(read_documents(corpus / "train"), recipe.vocab_size, work / "tokenizer.json"),
    )
    configs = recipe.backbone_configs()

    def backbone(kind: str):
        tokenizer = save_tokenizer(work / "tokenizer.json", work / kind, kind)
        separator = tokenizer.sep_token_id if kind == "mlm" else tokenizer.eos_token_id
        windows, eval_windows = (
            pack_windows(read_documents(corpus / split), plain_encoder(tokenizer), recipe.seq_len, separator)
            for split in ("train", "validation")
        )
        assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS))), "special ids"
        torch.manual_seed(recipe.seed)
        model = new_backbone(kind, configs[kind])
        make_batch = (
            (lambda w, r: mlm_batch(w, r, tokenizer, recipe.mlm_mask_rate))
            if kind == "mlm"
            else (lambda w, r: ar_batch(w, tokenizer))
        )
        steps = recipe.mlm_steps if kind == "mlm" else recipe.ar_steps
        log(
            f"  {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {steps} steps of "
            f"{recipe.batch_size}x{recipe.seq_len} tokens ({len(windows)} training windows)"
        )
        metrics = pretrain(
            model, make_batch, windows, eval_windows, steps, recipe.batch_size, recipe.learning_rate, recipe.seed, log
        )
        model.save_pretrained(work / kind)
        (work / kind / "pretrain.json").write_text(json.dumps(metrics, indent=2))

    stage("mlm", lambda: backbone("mlm"))
    stage("ar", lambda: backbone("ar"))
    stage(
        "head",
        lambda: train(
            work / "mlm",
            work / "ar",
            corpus / "train",
            work / "maria",
            TrainConfig(
                steps=recipe.head_steps,
                seq_len=recipe.seq_len,
                batch_size=recipe.head_batch_size,
                learning_rate=recipe.head_learning_rate,
                warmup_steps=max(1, recipe.head_steps // 20),
                eval_every=max(1, recipe.head_steps // 4),
                save_every=max(1, recipe.head_steps // 4),
                seed=recipe.seed,
            ),
            eval_data=corpus / "validation",
            device="cpu",
        ),
    )
    stage(
        "export",
        lambda: [
            export_bundle(
                work / "maria",
                work / name,
                quantize="int8" if name.endswith("int8") else None,
                overwrite=True,
                concat_decoder=False,
            )  # the engine's graph only: under 50 MB
            for name in ("bundle", "bundle-int8")
        ],
    )
    stage("quality", lambda: (work / "quality.json").write_text(json.dumps(quality(work, recipe, log), indent=2)))
    return {"timings": timings, "recipe": dataclasses.asdict(recipe)}


def test_windows(work: Path, recipe: Recipe, infiller):
    """The first eval_windows windows of the held-out test documents: the quality table's data (what
    `maria eval runs/default/corpus/test --seq-len 128 --windows 128` masks)."""
    return document_windows(read_documents(work / "corpus" / "test"), infiller, recipe.seq_len, recipe.eval_windows)


def quality(work: Path, recipe: Recipe, log=print) -> dict:
    """The model card's table: every system on the same masks of the held-out test documents, all through ONNX
    Runtime (what `maria eval runs/default/corpus/test --seq-len 128 --windows 128` computes)."""
    infillers = {
        "MARIA": Infiller(work / "bundle", device="cpu"),
        "MARIA int8": Infiller(work / "bundle-int8", device="cpu"),
    }
    windows = test_windows(work, recipe, infillers["MARIA"])
    table: dict = {"windows": int(len(windows)), "seq_len": recipe.seq_len, "rates": {}}
    for rate in recipe.eval_rates:
        masks = draw_masks(windows, rate, seed=recipe.seed)
        rows = onnx_baselines(infillers["MARIA"], windows, masks)
        for name, infiller in infillers.items():
            rows.append({**evaluate_maria(infiller, windows, masks), "system": name})
        table["rates"][str(rate)] = rows
        log(f"  mask rate {rate}: " + ", ".join(f"{r['system']} {r['perplexity']:.2f}" for r in rows))
    return table


def quality_markdown(table: dict) -> str:
    """The model card's table: perplexity (top-1 accuracy) per system and mask rate."""
    rates = sorted(table["rates"], key=float)
    systems = [row["system"] for row in table["rates"][rates[0]]]
    lines = ["| system | " + " | ".join(f"mask rate {rate}" for rate in rates) + " |", "|---|" + "---:|" * len(rates)]
    for system in systems:
        cells = []
        for rate in rates:
            row = next(r for r in table["rates"][rate] if r["system"] == system)
            cells.append(f"{row['perplexity']:.2f} ({100 * row['top1_accuracy']:.1f}%)")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def install(work: Path, recipe: Recipe, target: Path = DEFAULT_MODEL) -> None:
    """Copies the bundle, its quality table and the recipe's timings into the package (beside its __init__.py),
    and the table's test windows into tests/data for the test that guards the table."""
    for old in target.iterdir():
        if old.is_file() and old.name != "__init__.py":
            old.unlink()
    for new in [*(work / "bundle").iterdir(), work / "quality.json", work / "timings.json"]:
        shutil.copy(new, target / new.name)
    infiller = Infiller(target, device="cpu")
    windows = test_windows(work, recipe, infiller)
    np.save(TEST_WINDOWS, windows.astype(np.int16 if recipe.vocab_size < 2**15 else np.int32))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for every stage's output")
    parser.add_argument("--install", action="store_true", help="copy the bundle into runtime/default_model/")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps, to check the recipe runs")
    args = parser.parse_args()
    recipe = Recipe(**QUICK) if args.quick else Recipe()
    summary = run(args.work, recipe)
    print(json.dumps(summary["timings"], indent=2))
    print(quality_markdown(json.loads((args.work / "quality.json").read_text())))
    if args.install:
        install(args.work, recipe)
        print(f"installed {args.work / 'bundle'} as {DEFAULT_MODEL}")


if __name__ == "__main__":
    run_main(main)
