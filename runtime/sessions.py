"""ONNX Runtime sessions: the execution provider chosen once, each graph's session created once per bundle."""

import ctypes
import io
import os
import platform
import re
import shutil
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from functools import cache
from importlib import metadata
from pathlib import Path

import onnxruntime as ort

from .cpus import session_threads, usable_cpus
from .device import choose_device, gpu_index
from .errors import SettingError

CUDA_ERROR_INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver: the driver is older than the runtime


def gpu_present() -> bool:
    """An NVIDIA GPU is installed (its driver's device node or tool is there); says nothing of CUDA libraries."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


@cache
def cuda_libraries_missing() -> str | None:
    """Loads CUDA and cuDNN (from pip's nvidia-* packages where installed, else the system's) and the CUDA
    execution provider's library; returns which library is missing, or None when all load."""
    provider = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not provider.exists():
        return None  # another platform's layout: ONNX Runtime itself will tell
    if hasattr(ort, "preload_dlls"):
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            ort.preload_dlls()
    try:
        ctypes.CDLL(str(provider))
    except OSError as error:
        return str(error).split(":")[0]
    return None


def cuda_runtime() -> tuple | None:
    """(the CUDA runtime library this onnxruntime-gpu was built for, loaded by preload_dlls from pip's nvidia-*
    packages or found on the system; the CUDA version it was built with), or None where either is unknown."""
    try:
        from onnxruntime.capi.build_and_package_info import cuda_version
    except ImportError:
        return None
    major = cuda_version.split(".")[0]
    for name in (f"libcudart.so.{major}", f"cudart64_{major}.dll", f"cudart64_{major}0.dll"):
        try:
            return ctypes.CDLL(name), cuda_version
        except OSError:
            continue
    return None


@cache
def cuda_devices() -> tuple[int | None, str | None]:
    """(how many GPUs the CUDA runtime sees, None where it cannot be asked; why it sees none, or None)."""
    found = cuda_runtime()
    if found is None:
        return None, None  # no CUDA runtime to ask: ONNX Runtime itself will tell
    cudart, built_for = found
    count = ctypes.c_int(0)
    status = cudart.cudaGetDeviceCount(ctypes.byref(count))
    if status == 0:
        return count.value, None if count.value else "CUDA sees no GPU; check CUDA_VISIBLE_DEVICES"
    cudart.cudaGetErrorString.restype = ctypes.c_char_p
    error = f"cudaGetDeviceCount: {cudart.cudaGetErrorString(status).decode()}"
    if status != CUDA_ERROR_INSUFFICIENT_DRIVER:
        return 0, f"CUDA cannot use the GPU ({error}); check the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES"
    driver = ctypes.c_int(0)  # the newest CUDA the driver runs, as 12040 for 12.4; 0: no driver
    needs = f"this onnxruntime-gpu is built for CUDA {built_for}"
    if cudart.cudaDriverGetVersion(ctypes.byref(driver)) == 0 and driver.value:
        return 0, (
            f"the NVIDIA driver runs CUDA up to {driver.value // 1000}.{driver.value % 1000 // 10}, and "
            f"{needs} ({error}); update the NVIDIA driver"
        )
    return 0, f"the NVIDIA driver cannot be used, and {needs} ({error}); install or update the NVIDIA driver"


def cuda_missing() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, or None where it can try."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (
            "this onnxruntime has no CUDA execution provider (pip install 'maria-onnx[cuda]' on Linux x86-64 "
            "or Windows)"
        )
    if not gpu_present():
        return "no NVIDIA GPU was found (no /dev/nvidiactl and no nvidia-smi)"
    missing = cuda_libraries_missing()
    if missing:
        return (
            f"the CUDA library {missing} cannot be loaded; pip install 'maria-onnx[cuda]' for CUDA and cuDNN "
            "from pip, or install them system-wide"
        )
    return cuda_devices()[1]


def installation() -> list[str]:
    """What `maria --version` prints: this package's version, ONNX Runtime's and its providers, whether CUDA can
    run here (or what stops it), Python's."""

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    onnx_runtime = next(
        (f"{name} {installed(name)}" for name in ("onnxruntime-gpu", "onnxruntime") if installed(name)),
        f"onnxruntime {ort.__version__}",
    )
    return [
        f"maria-onnx {installed('maria-onnx') or '(not installed: run from a source tree)'}",
        f"{onnx_runtime} (providers: {', '.join(ort.get_available_providers())})",
        f"CUDA: {cuda_missing() or 'ready'}",
        cpu_threads(),
        shipped_model(),
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}",
    ]


def shipped_model() -> str:
    """The shipped model's precision: its graphs' dtype and their weights' quantization (maria.json)."""
    from .default_model import DEFAULT_MODEL
    from .manifest import load_manifest

    try:
        manifest = load_manifest(DEFAULT_MODEL, verify=False)
    except (OSError, ValueError):
        return "shipped model: none in this install (--model BUNDLE)"
    return (
        f"shipped model: {manifest.dtype}, quantization {manifest.quantization} (a bundle's own: maria.json; "
        "`maria export --quantize int8|int4` writes quantized ones)"
    )


def cpu_threads() -> str:
    """The CPUs this process may use and the threads each session gets by default (runtime/cpus.py)."""
    usable, machine, threads = usable_cpus(), os.cpu_count() or 1, session_threads()
    pools = f"{threads} thread{'s' * (threads > 1)}" if threads else "ONNX Runtime's default, one per physical core"
    return f"CPUs: {usable} of {machine} usable (affinity, cgroup quota); threads per session: {pools} (--threads)"


def cuda_providers(device_id: int) -> list:
    """The CUDA execution provider on GPU device_id, with the CPU one for what CUDA has no kernel for."""
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


def providers_for(device: str) -> list:
    """auto: CUDA where this onnxruntime has it and a GPU is present, else CPU. cuda / cuda:N: CUDA on GPU 0 / N,
    or an error. cpu: CPU."""
    ort.set_default_logger_severity(3)  # our own one-line warning replaces ORT's provider-loading noise
    missing = None if device == "cpu" else cuda_missing()  # --device cpu loads no CUDA library
    if device == "auto" and missing and gpu_present():
        warnings.warn(f"a GPU is present but CUDA cannot run ({missing}); running on CPU", RuntimeWarning, stacklevel=2)
    if choose_device(device, missing) == "cpu":
        return ["CPUExecutionProvider"]
    count = cuda_devices()[0]
    if count is not None and gpu_index(device) >= count:
        gpus = "1 GPU here (cuda:0)" if count == 1 else f"{count} GPUs here (cuda:0 to cuda:{count - 1})"
        raise SettingError(f"{{device}} {device}: CUDA sees {gpus}; pick one of them, or use {{device}} cpu", "device")
    return cuda_providers(gpu_index(device))


def provider_name(provider: str | tuple[str, dict]) -> str:
    """A provider as ONNX Runtime takes it (a name, or a (name, options) pair) -> its name."""
    return provider if isinstance(provider, str) else provider[0]


@cache
def shared_cpu_arena() -> None:
    """Registers one CPU memory arena in ONNX Runtime's environment, for the CPU sessions of this process to share
    (session.use_env_allocators) instead of an arena each: what the MLM pass took, the decode steps reuse (a lower
    peak and less kept resident: docs/benchmarks.md, "Smaller measurements")."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # ONNX Runtime's defaults


def make_session(path: Path, providers: list, insist: bool = False, threads: int | None = None) -> ort.InferenceSession:
    """One session on the first provider that loads. Where CUDA cannot load (no driver, no GPU), falls back to
    CPU with one warning, or fails if the user insisted on CUDA. threads: its thread pool's size; None: as many as
    this process may use where that is fewer than the machine's CPUs (runtime/cpus.py), else ONNX Runtime's own."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    threads = session_threads(threads)
    if threads is not None:
        options.intra_op_num_threads = threads
    # ONNX Runtime's pool threads spin between calls by default, taking the cores that the Python between the decode
    # loop's many small calls (and a server's event loop) needs (docs/benchmarks.md, "CPU: the decode engine")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if [provider_name(p) for p in providers] == ["CPUExecutionProvider"]:
        shared_cpu_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    # ONNX Runtime's own fallback, where a provider cannot start, prints the error on stdout (where fills go) and
    # retries on the CPU. It is off (enable_fallback=0; versions before 1.23 ignore the key, fall back, and their
    # print goes to stderr), and the fallback is this function's: one line naming the reason.
    try:
        with redirect_stdout(sys.stderr):
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers, enable_fallback=0)
    except (RuntimeError, ValueError) as error:  # what ONNX Runtime's fallback catches: a provider that failed
        if provider_name(providers[0]) == "CPUExecutionProvider":
            raise
        _cuda_failed(f"CUDA could not start ({provider_error(error)})", insist)
        return make_session(path, ["CPUExecutionProvider"], threads=threads)
    session.disable_fallback()  # and a provider failing mid-run raises, not reruns on the CPU behind a print
    got = session.get_providers()[0]
    if got != provider_name(providers[0]):
        _cuda_failed(f"CUDA could not start (ONNX Runtime fell back to {got})", insist)
    return session


def _cuda_failed(reason: str, insist: bool) -> None:
    """The user asked for CUDA: one line and stop. auto: one warning, and the session runs on the CPU."""
    if insist:
        raise SettingError(
            f"{{device}} cuda: {reason}; check the GPU driver (nvidia-smi) and CUDA libraries, or use {{device}} cpu",
            "device",
        )
    warnings.warn(f"{reason}; running on the CPU instead", RuntimeWarning, stacklevel=3)


def provider_error(error: Exception) -> str:
    """ONNX Runtime's error from a provider, in one line: the CUDA failure where it names one."""
    text = " ".join(str(error).split())
    failure = re.search(r"CUDA failure \d+: [^;]*[^; ]", text)
    return failure.group(0) if failure else text[:300]
