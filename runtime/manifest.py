"""maria.json: the bundle's manifest, everything the runtime needs and nothing it must guess.

A bundle is one folder:
    mlm.onnx          input_ids, attention_mask [batch, seq] -> hidden_states [batch, seq, d_mlm]
    ar_step.onnx      input_ids, position_ids [batch, seq], cache.{i}.key/value (a KV cache of slots written in
                      place) -> last_hidden_state [batch, seq, d_ar], cache_out.{i}.key/value (export/step.py)
    ar_decoder.onnx   (optional, the concat decoder) input_ids, attention_mask [batch, past + seq], position_ids,
                      past_key_values.{i}.key/value -> last_hidden_state [batch, seq, d_ar], present.{i}.key/value
    fusion_head.onnx  mlm_hidden [batch, d_mlm], ar_hidden [batch, d_ar] -> logits [batch, V] (fp32)
    tokenizer.json    the backbones' shared tokenizer
    maria.json        this manifest (with the sha256 of every other file)
    validation.json   the largest differences from PyTorch found when the bundle was made
"""

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .backend import SpecialIds

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

SCHEMA_VERSION = 4  # 2: baseline heads; 3: the step graph, ar_decoder optional; 4: values_transposed
READABLE_SCHEMAS = (1, 2, 3, 4)
MANIFEST_NAME = "maria.json"
CHECKPOINT_CONFIG = "maria_config.json"  # what marks a `maria train` checkpoint, not a bundle
GRAPHS = ("mlm", "fusion_head")
AR_GRAPHS = ("ar_step", "ar_decoder")  # at least one

BASELINE_GRAPHS = ("ar_lm_head", "mlm_decoder")  # optional: ar_hidden / mlm_hidden -> logits over V
DTYPES = ("fp32", "fp16")
QUANTIZATIONS = ("none", "int8-dynamic", "int4-weight-only")
REEXPORT = "re-export the bundle with `maria export`"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def from_dict(cls: type[T], data: object, what: str, fix: str) -> T:
    """Builds dataclass `cls` from `data`, naming unknown or missing keys instead of failing on a signature."""
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    found = set(data) if isinstance(data, dict) else set()
    if not isinstance(data, dict) or found - names or required - found:
        raise ValueError(
            f"{what} is malformed: unknown keys {sorted(found - names)}, missing keys {sorted(required - found)}; {fix}"
        )
    for f in fields:
        value = data.get(f.name)
        if (
            f.name in data
            and f.type in (int, str, dict, list, float, bool)
            and not (isinstance(value, f.type) and (f.type is bool or not isinstance(value, bool)))
        ):
            raise ValueError(f"{what}: '{f.name}' must be {f.type.__name__}, got {value!r}; {fix}")
    return cls(**data)


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: list
    outputs: list


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    dtype: str  # fp32 | fp16: the dtype of hidden states and the KV cache
    quantization: str  # none | int8-dynamic | int4-weight-only (export/quantize.py)
    opset: int
    mlm_hidden_size: int
    ar_hidden_size: int
    num_hidden_layers: int  # AR layers: one past key and value each
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_sequence_length: int  # content tokens per text
    special_ids: SpecialIds  # cls, sep, mask, start, pad
    graphs: dict  # name -> GraphSpec
    tokenizer: str
    files: dict  # file name -> sha256
    source: dict  # backbones, training settings, library versions
    # the step graph's values [b, kv, head_dim, C] (eager attention), or [b, kv, C, head_dim] as its keys (fused
    # attention, export/attention.py); schemas before 4 have only the first
    values_transposed: bool = True

    def graph(self, name: str) -> GraphSpec:
        return self.graphs[name]

    @property
    def has_baseline_heads(self) -> bool:
        return set(BASELINE_GRAPHS) <= set(self.graphs)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        version = data.get("schema_version") if isinstance(data, dict) else None
        if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
            raise ValueError(
                f"the bundle has manifest schema {version}, newer than the "
                f"{SCHEMA_VERSION} this maria-onnx reads; upgrade maria-onnx"
            )
        manifest = from_dict(cls, data, MANIFEST_NAME, REEXPORT)
        if manifest.schema_version not in READABLE_SCHEMAS:
            raise ValueError(
                f"{MANIFEST_NAME}: schema_version {manifest.schema_version!r} is not one this "
                f"maria-onnx reads ({', '.join(map(str, READABLE_SCHEMAS))}); {REEXPORT}"
            )
        graphs = {
            name: from_dict(GraphSpec, spec, f"{MANIFEST_NAME} graph '{name}'", REEXPORT)
            for name, spec in manifest.graphs.items()
        }
        if (
            not set(GRAPHS) <= set(graphs) <= set(GRAPHS + AR_GRAPHS + BASELINE_GRAPHS)
            or not set(graphs) & set(AR_GRAPHS)
            or set(graphs) & set(BASELINE_GRAPHS) not in (set(), set(BASELINE_GRAPHS))
        ):
            raise ValueError(
                f"{MANIFEST_NAME} names graphs {sorted(graphs)}, expected {list(GRAPHS)}, one or both "
                f"of {list(AR_GRAPHS)}, and optionally both of {list(BASELINE_GRAPHS)}"
            )
        try:
            special = SpecialIds.from_dict(manifest.special_ids)
        except ValueError as error:
            raise ValueError(f"{MANIFEST_NAME}: {error}; {REEXPORT}") from None
        manifest = cls(**{**vars(manifest), "graphs": graphs, "special_ids": special})
        manifest.check()
        return manifest

    def check(self) -> None:
        """Refuses values no bundle can have: the shape of each field, not yet the graphs (see OnnxBackend)."""
        problems = [
            f"'{name}' must be at least 1, got {getattr(self, name)}"
            for name in (
                "opset",
                "mlm_hidden_size",
                "ar_hidden_size",
                "num_hidden_layers",
                "num_key_value_heads",
                "head_dim",
                "vocab_size",
                "max_sequence_length",
            )
            if getattr(self, name) < 1
        ]
        if self.dtype not in DTYPES:
            problems.append(f"'dtype' must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"'quantization' must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        problems += [
            f"special id '{name}' ({value}) is outside the AR vocabulary of {self.vocab_size}"
            for name, value in (("start", self.special_ids.start), ("pad", self.special_ids.pad))
            if value >= self.vocab_size
        ]
        named = [spec.file for spec in self.graphs.values()] + [self.tokenizer]
        problems += [f"'{file}' has no sha256 in 'files'" for file in named if file not in self.files]
        if problems:
            raise ValueError(f"{MANIFEST_NAME}: {problems[0]}; {REEXPORT}")

    def save(self, folder: Path) -> None:
        (Path(folder) / MANIFEST_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def load_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Reads a bundle's manifest; with verify, checks that every file is there with its recorded sha256."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if folder.is_file():
        raise ValueError(f"{folder} is a file; a bundle is the folder written by `maria export`")
    if not folder.is_dir():
        raise FileNotFoundError(f"bundle {folder} does not exist; pass a folder written by `maria export`")
    if not path.is_file() and (folder / CHECKPOINT_CONFIG).is_file():
        raise ValueError(
            f"{folder} is a training checkpoint, not a bundle; export it first: maria export {folder} --out BUNDLE"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a complete MARIA bundle: {MANIFEST_NAME} is missing; re-run `maria export`"
        )
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-run `maria export`") from None
    if verify:
        for name in manifest.files:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"bundle {folder} is incomplete: {name} is missing; re-run `maria export`")
        # the files hashed side by side (hashlib lets go of the GIL): the largest bundles hold gigabytes
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            digests = pool.map(sha256, [folder / name for name in manifest.files])
            for (name, expected), digest in zip(manifest.files.items(), digests):
                if digest != expected:
                    raise ValueError(
                        f"bundle {folder}: {name} fails its sha256 check (changed or corrupted since "
                        "export); re-run `maria export`"
                    )
    return manifest
