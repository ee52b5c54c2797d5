"""`maria triton-repo`: a Triton Inference Server model repository serving a bundle through the Python backend.

    REPO/NAME/config.pbtxt        the tensors of `maria serve`, dynamic batching with a queue policy, instances
    REPO/NAME/1/model.py          serve/triton_model.py
    REPO/NAME/1/maria_onnx/       this project's package root (__init__.py) and its runtime (onnxruntime, numpy,
                                  tokenizers only), under the names it is installed with
    REPO/NAME/1/bundle/           the bundle, copied (or linked with link=True)

The repository is written beside its target and renamed into place, so it appears complete or not at all.
"""

import shutil
import tempfile
from pathlib import Path

import maria_onnx
import maria_onnx.runtime
from maria_onnx.runtime.infiller import check_speculate, chosen_decoder
from maria_onnx.runtime.manifest import load_manifest

from .protocol import check_model_name

MODEL_FILE = Path(__file__).resolve().parent / "triton_model.py"
KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}


def _source_only(folder: str, names: list[str]) -> list[str]:
    """copytree's ignore: the runtime's Python files and its graphs (runtime/graphs), not the shipped default model's
    weights."""
    kept = (".py", ".onnx") if Path(folder).name == "graphs" else (".py",)
    return [n for n in names if n == "__pycache__" or ((Path(folder) / n).is_file() and not n.endswith(kept))]


def config_pbtxt(
    name: str,
    kind: str,
    instances: int,
    max_batch_size: int,
    max_queue_delay_us: int,
    max_queue: int,
    timeout_us: int,
    max_texts: int = 64,
    threads: int | None = None,
    speculate: int = 0,
) -> str:
    """config.pbtxt: text [batch, 1] -> text, result [batch, num_samples], all BYTES. threads: CPU threads per
    ONNX Runtime session of each instance; None ("auto"): CPU instances share the CPUs Triton may use equally.
    speculate: as `maria serve --speculate`."""
    return f'''name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
input [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }}
]
output [
  {{ name: "text" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "result" data_type: TYPE_STRING dims: [ -1 ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
  default_queue_policy {{
    timeout_action: REJECT
    default_timeout_microseconds: {timeout_us}
    allow_timeout_override: true
    max_queue_size: {max_queue}
  }}
}}
instance_group [ {{ count: {instances} kind: {KINDS[kind]} }} ]
parameters {{ key: "device" value: {{ string_value: "{"cuda" if kind == "gpu" else "cpu"}" }} }}
parameters {{ key: "max_texts" value: {{ string_value: "{max_texts}" }} }}
parameters {{ key: "threads" value: {{ string_value: "{threads or "auto"}" }} }}
parameters {{ key: "speculate" value: {{ string_value: "{speculate}" }} }}
'''


def write_repository(
    bundle: str | Path,
    out: str | Path,
    name: str = "maria",
    kind: str = "gpu",
    instances: int = 1,
    max_batch_size: int = 8,
    max_queue_delay_us: int = 5000,
    max_queue: int = 256,
    timeout_us: int = 60_000_000,
    link: bool = False,
    overwrite: bool = False,
    max_texts: int = 64,
    threads: int | None = None,
    speculate: int = 0,
) -> Path:
    """Writes the repository at `out`; returns the model's folder."""
    bundle, out = Path(bundle).resolve(), Path(out).resolve()
    manifest = load_manifest(bundle)  # a complete, intact bundle, or a clear error
    check_speculate(speculate, chosen_decoder("auto", manifest.graphs), manifest.graphs)  # as the model's Infiller
    if kind not in KINDS:
        raise ValueError(f"--kind must be gpu or cpu, got '{kind}'")
    check_model_name(name)
    if (
        min(instances, max_batch_size, max_queue, max_texts, threads or 1) < 1
        or max_queue_delay_us < 0
        or timeout_us < 1
    ):
        raise ValueError(
            "instances, max batch size, queue size, max texts and threads must be at least 1; delays non-negative"
        )
    if out == bundle or bundle in out.parents:
        raise ValueError(f"--out {out} is inside the bundle {bundle}; write the repository somewhere else")
    if out.exists() and not (overwrite and (out / name / "config.pbtxt").is_file()):
        raise FileExistsError(
            f"{out} already exists; choose another --out (--overwrite replaces only a repository this command wrote)"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as error:
        raise PermissionError(
            f"cannot write the repository to {out} ({error.strerror}); choose another --out"
        ) from None
    try:
        version = staging / name / "1"
        version.mkdir(parents=True)
        (staging / name / "config.pbtxt").write_text(
            config_pbtxt(
                name,
                kind,
                instances,
                max_batch_size,
                max_queue_delay_us,
                max_queue,
                timeout_us,
                max_texts,
                threads,
                speculate,
            )
        )
        shutil.copy(MODEL_FILE, version / "model.py")
        (version / "maria_onnx").mkdir()
        shutil.copy(maria_onnx.__file__, version / "maria_onnx" / "__init__.py")
        shutil.copytree(
            Path(maria_onnx.runtime.__file__).parent, version / "maria_onnx" / "runtime", ignore=_source_only
        )
        if link:
            (version / "bundle").symlink_to(bundle, target_is_directory=True)
        else:
            shutil.copytree(bundle, version / "bundle")
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / name
