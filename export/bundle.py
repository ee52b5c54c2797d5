"""`maria export`: a trained checkpoint -> a self-describing, self-checked bundle folder.

The bundle is written to a temporary folder beside the target (`.NAME.partial-PID-*`) and renamed into place
only after every graph has passed validation, so a failed or interrupted export never leaves a folder that looks
complete. `overwrite` replaces only an existing bundle, never the checkpoint being exported or a folder holding
it; partial folders left by a killed export of the same target are removed by the next one, and a previous
bundle that an export killed between its two renames left aside is restored first.
"""

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from glob import escape as glob_escape
from importlib.metadata import version
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from rich.console import Console

from maria_onnx.checkpoint import load_maria
from maria_onnx.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, GraphSpec, Manifest, sha256
from maria_onnx.runtime.onnx_backend import OnnxBackend

from .graphs import (
    AR_FILE,
    AR_LM_HEAD_FILE,
    HEAD_FILE,
    MLM_DECODER_FILE,
    MLM_FILE,
    export_backbones,
    export_baseline_heads,
    export_fusion_head,
)
from .quantize import QUANTIZATIONS, quantize, settings
from .step import STEP_FILE, check_fused_attention, export_step
from .validate import validate
from .weights import bundle_weights, external_data, save

DEFAULT_OPSET = 17
OPSETS = range(17, 21)  # from the opset the graphs need to the newest torch.onnx's exporter writes
TOKENIZER_FILE, VALIDATION_FILE = "tokenizer.json", "validation.json"


def _reset_peak_memory() -> bool:
    """Resets this process's resident-memory high-water mark (Linux); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_memory_gb() -> float:
    """This process's resident-memory high-water mark (VmHWM), in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise OSError("no VmHWM in /proc/self/status")


@contextmanager
def stage(console: Console, name: str):
    """Runs a stage under a spinner, then prints its time and, on Linux, its peak resident memory."""
    began, measured = time.perf_counter(), _reset_peak_memory()
    with console.status(name + "..."):
        yield
    peak = f", peak {_peak_memory_gb():.2f} GB" if measured else ""
    console.print(f"[green]✓[/green] {name} ({time.perf_counter() - began:.1f}s{peak})")


def is_bundle(folder: Path) -> bool:
    """A folder whose manifest says it is a MARIA bundle (of any schema version)."""
    try:
        data = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"schema_version", "graphs", "files"} <= set(data)


def _check_target(out: Path, checkpoint: Path, overwrite: bool) -> None:
    """Refuses an --out that is, or holds, the checkpoint, and one that exists unless it is a bundle to replace."""
    checkpoint = Path(checkpoint).resolve()
    if out == checkpoint or out in checkpoint.parents:
        what = "is the checkpoint" if out == checkpoint else "holds the checkpoint"
        raise ValueError(f"--out {out} {what} being exported; choose another --out")
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if not out.is_dir() or out.is_symlink() or not is_bundle(out):
        raise FileExistsError(
            f"{out} exists and is not a MARIA bundle (no {MANIFEST_NAME}); --overwrite replaces "
            "only a bundle: remove it yourself or choose another --out"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_partials(out: Path) -> list[Path]:
    """The partial folders of earlier exports to `out` whose process is gone (killed mid-export)."""
    stale = []
    for partial in out.parent.glob(f".{glob_escape(out.name)}.partial-*"):
        pid = partial.name[len(f".{out.name}.partial-") :].split("-")[0]
        if not (pid.isdigit() and _alive(int(pid))) and partial.is_dir() and not partial.is_symlink():
            stale.append(partial)
    return stale


def _restore_swapped(out: Path, console: Console) -> None:
    """An export killed between its two renames (_publish) left no bundle at `out` and the previous one aside as
    `.NAME.partial-PID-*.old`: it goes back to `out` before anything else looks there."""
    if out.exists() or not out.parent.is_dir():
        return
    for partial in _stale_partials(out):
        if partial.name.endswith(".old"):
            os.replace(partial, out)
            console.print(f"restored the previous bundle at {out} (an export killed while replacing it left it aside)")
            _remove_stale_partials(out)  # the killed export's own, unfinished from the user's side
            return


def _remove_stale_partials(out: Path) -> None:
    """Removes the partial folders of earlier exports to `out` whose process is gone (killed mid-export)."""
    for partial in _stale_partials(out):
        shutil.rmtree(partial, ignore_errors=True)


def _target(out: Path, checkpoint: Path, overwrite: bool, console: Console) -> Path:
    """Checks that out can be written before any work is done; returns a fresh temporary folder beside it."""
    out = Path(out).resolve()
    _restore_swapped(out, console)
    _check_target(out, checkpoint, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(out)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as error:
        raise PermissionError(f"cannot write the bundle to {out} ({error.strerror}); choose another --out") from None


def _to_fp16(path: Path) -> None:
    """Hidden states and the KV cache in fp16; integer inputs untouched. After _optimize, never before: ONNX
    Runtime's CPU provider, saving an fp16 graph, writes into it the Casts to fp32 that its own kernels need (every
    MatMul's weights and output), which a GPU would then run at every step; the heads exported in fp16 are left as
    torch.onnx wrote them for the same reason."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=False, disable_shape_infer=True)
    weights = bundle_weights(path)  # where _optimize put a large graph's weights
    large = weights.exists()
    weights.unlink(missing_ok=True)
    save(model, path, weights if large else None)


def _optimize(path: Path) -> None:
    """ONNX Runtime's provider-independent (basic) graph optimizations, done once offline. A graph with external
    weights keeps them external, in <name>.weights (the file name the optimized graph refers to)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    large = external_data(path).exists()
    if large:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", bundle_weights(path).name
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    os.replace(path.with_suffix(".opt.onnx"), path)
    external_data(path).unlink(missing_ok=True)


def _weights_as_optimized(path: Path) -> None:
    """A graph left as written, with its external weights, if any, where _optimize leaves them: <name>.weights."""
    if external_data(path).exists():
        model = onnx.load(str(path))
        external_data(path).unlink()
        save(model, path, bundle_weights(path))


def _kv_shape(path: Path) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) read off the step graph's cache inputs ([b, kv, C, head_dim])."""
    inputs = [i for i in onnx.load(str(path), load_external_data=False).graph.input if i.name.startswith("cache.")]
    dims = inputs[0].type.tensor_type.shape.dim
    return len(inputs) // 2, dims[1].dim_value, dims[3].dim_value


def _source(config) -> dict:
    versions = {name: version(name) for name in ("torch", "transformers", "onnx", "optimum-onnx")}
    return {
        "mlm_path": config.mlm_path,
        "ar_path": config.ar_path,
        "mlm_model_type": config.mlm_model_type,
        "ar_model_type": config.ar_model_type,
        "train": config.train,
        "trained_steps": config.trained_steps,
        "versions": {**versions, "onnxruntime": ort.__version__},
    }


@dataclass(frozen=True)
class Plan:
    """What an export writes: the graphs' dtype, their weights quantized or not (export/quantize.py: "int8",
    "int4" or None), the opset, the optional graphs and the step graph's attention ("eager": the operations
    themselves; "fused": one ONNX Runtime node a layer, export/attention.py)."""

    dtype: str = "fp32"
    quantize: str | None = None
    opset: int = DEFAULT_OPSET
    baseline_heads: bool = True
    concat_decoder: bool = True
    attention: str = "eager"

    @property
    def variant(self) -> str:
        return self.quantize or self.dtype

    def check(self) -> None:
        if self.dtype not in ("fp32", "fp16"):
            raise ValueError(f"--dtype must be fp32 or fp16, got '{self.dtype}'")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ValueError(f"--quantize must be {' or '.join(QUANTIZATIONS)}, got '{self.quantize}'")
        if self.quantize and self.dtype != "fp32":
            raise ValueError(f"--quantize {self.quantize} quantizes an fp32 export's weights; use it with --dtype fp32")
        if self.attention not in ("eager", "fused"):
            raise ValueError(f"--attention must be eager or fused, got '{self.attention}'")
        if self.opset not in OPSETS:
            raise ValueError(
                f"--opset {self.opset} is not supported; use {OPSETS.start} to {OPSETS.stop - 1} "
                f"(default {DEFAULT_OPSET})"
            )


def export_bundle(
    checkpoint,
    out,
    dtype: str = "fp32",
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    console: Console | None = None,
    baseline_heads: bool = True,
    concat_decoder: bool = True,
    attention: str = "eager",
) -> Manifest:
    """Exports a trained checkpoint to a validated bundle at `out`; returns its manifest. baseline_heads adds the
    AR's LM head and the MLM's decoder (ar_lm_head.onnx, mlm_decoder.onnx); concat_decoder adds Optimum's decoder
    (ar_decoder.onnx) for the concat path beside the engine's step graph (ar_step.onnx); see Plan."""
    plan = Plan(dtype, quantize, opset, baseline_heads, concat_decoder, attention)
    plan.check()
    console = console or Console(stderr=True)
    staging = _target(out, checkpoint, overwrite, console)
    try:
        with stage(console, f"loading checkpoint {checkpoint}"):
            backbones, head, config = load_maria(checkpoint)
        if attention == "fused":
            check_fused_attention(backbones.ar.config)
        manifest = _build(staging, backbones, head, config, plan, console)
        _publish(staging, Path(out).resolve())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.print(f"[green]✓[/green] wrote {out} ({plan.variant})")
    return manifest


def _build(folder: Path, backbones, head, config, plan: Plan, console: Console) -> Manifest:
    dtype, variant, opset, concat_decoder = plan.dtype, plan.variant, plan.opset, plan.concat_decoder
    fuse_attention = plan.attention == "fused"
    hidden_dtype = torch.float16 if dtype == "fp16" else torch.float32
    with stage(console, f"exporting mlm.onnx{' and ar_decoder.onnx' if concat_decoder else ''} with Optimum"):
        specs = export_backbones(backbones, folder, opset, concat_decoder)
    with stage(console, "exporting ar_step.onnx (the KV cache written in place)"):
        specs["ar_step"] = export_step(backbones.ar, folder, opset, fuse_attention)
    with stage(console, "exporting fusion_head.onnx"):
        specs["fusion_head"] = export_fusion_head(head, folder, opset, hidden_dtype)
    files = {
        "mlm": MLM_FILE,
        "ar_step": STEP_FILE,
        **({"ar_decoder": AR_FILE} if concat_decoder else {}),
        "fusion_head": HEAD_FILE,
    }
    if plan.baseline_heads:
        with stage(console, "exporting the baseline heads (ar_lm_head.onnx, mlm_decoder.onnx)"):
            specs.update(export_baseline_heads(backbones, folder, opset, hidden_dtype))
        files.update(ar_lm_head=AR_LM_HEAD_FILE, mlm_decoder=MLM_DECODER_FILE)
    backbone_files = (MLM_FILE, STEP_FILE, *([AR_FILE] if concat_decoder else []))
    with stage(console, "optimizing graphs offline"):
        for file in files.values():
            if dtype == "fp16" and file not in backbone_files:  # a graph written in fp16: see _to_fp16
                _weights_as_optimized(folder / file)
            else:
                _optimize(folder / file)
    if plan.quantize:
        for file in files.values():
            with stage(console, f"quantizing {file} to {plan.quantize}"):
                quantize(folder / file, plan.quantize)
    if dtype == "fp16":
        for file in backbone_files:
            with stage(console, f"converting {file} to fp16"):
                _to_fp16(folder / file)
    backbones.tokenizer.backend_tokenizer.save(str(folder / TOKENIZER_FILE))
    layers, kv_heads, head_dim = _kv_shape(folder / STEP_FILE)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        dtype=dtype,
        quantization=QUANTIZATIONS.get(plan.quantize or "", "none"),
        opset=opset,
        mlm_hidden_size=config.mlm_hidden_size,
        ar_hidden_size=config.ar_hidden_size,
        num_hidden_layers=layers,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        max_sequence_length=backbones.max_sequence_length,
        special_ids=backbones.special,
        graphs={
            name: GraphSpec(file=file, inputs=specs[name][0], outputs=specs[name][1]) for name, file in files.items()
        },
        tokenizer=TOKENIZER_FILE,
        files={},
        source={**_source(config), **({"quantization": settings(plan.quantize)} if plan.quantize else {})},
        values_transposed=not fuse_attention,
    )
    with stage(console, "validating every graph against PyTorch"):
        report = validate(
            lambda decoder: OnnxBackend(folder, manifest, device="cpu", decoder=decoder),
            concat_decoder,
            backbones,
            head,
            manifest.special_ids,
            variant,
        )
        (folder / VALIDATION_FILE).write_text(json.dumps(report, indent=2) + "\n")
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    manifest = Manifest(**{**vars(manifest), "files": {name: sha256(folder / name) for name in names}})
    manifest.save(folder)
    return manifest


def _publish(staging: Path, out: Path) -> None:
    """Moves the finished bundle into place; an existing bundle at out is replaced only now."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a bundle is an ordinary folder
    if out.exists():
        old = staging.with_name(staging.name + ".old")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
