"""Device choice: names, GPU numbers, missing CUDA libraries and drivers, and the fallback to the CPU, each in one
line."""

from pathlib import Path

import pytest

from maria_onnx.runtime.default_model import DEFAULT_MODEL
from maria_onnx.tools import error_line


def test_device_names_and_the_gpu_they_pick():
    from maria_onnx.runtime.device import check_device, choose_device, gpu_index
    from maria_onnx.runtime.sessions import cuda_providers, providers_for

    assert [gpu_index(d) for d in ("auto", "cuda", "cuda:0", "cuda:3")] == [0, 0, 0, 3]
    for bad in ("gpu", "cuda:", "cuda:x", "cuda:1:2", "CUDA"):
        with pytest.raises(ValueError, match="^device must be one of auto, cuda, cuda:N, cpu"):
            check_device(bad)
    assert choose_device("cuda:2", None) == "cuda" and choose_device("auto", "no GPU") == "cpu"
    with pytest.raises(ValueError, match="^device cuda:2: no GPU; use device auto or cpu$"):
        choose_device("cuda:2", "no GPU")
    assert cuda_providers(2) == [("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]
    assert providers_for("cpu") == ["CPUExecutionProvider"]


def test_missing_cuda_libraries_are_named_in_one_line(monkeypatch):
    from maria_onnx.runtime import sessions

    missing = sessions.cuda_libraries_missing()
    assert missing is None or missing.startswith("lib") and ".so" in missing  # what this machine lacks, if any
    monkeypatch.setattr(sessions, "gpu_present", lambda: True)  # as on a GPU machine...
    monkeypatch.setattr(sessions, "cuda_libraries_missing", lambda: "libcublasLt.so.13")  # ...without CUDA
    monkeypatch.setattr(
        sessions.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with pytest.raises(ValueError) as refused:
        sessions.providers_for("cuda")
    assert error_line(refused.value) == (
        "--device cuda: the CUDA library libcublasLt.so.13 cannot be loaded; pip install "
        "'maria-onnx[cuda]' for CUDA and cuDNN from pip, or install them system-wide; "
        "use --device auto or cpu"
    )
    with pytest.warns(RuntimeWarning, match="a GPU is present but CUDA cannot run"):
        assert sessions.providers_for("auto") == ["CPUExecutionProvider"]


class FakeCudart:
    """The CUDA runtime's calls that runtime.sessions.cuda_devices makes, answering as a given machine would."""

    ERRORS = {
        35: b"CUDA driver version is insufficient for CUDA runtime version",
        100: b"no CUDA-capable device is detected",
    }

    def __init__(self, status: int, count: int = 0, driver: int = 0):
        self.status, self.count, self.driver = status, count, driver
        self.cudaGetErrorString = lambda status: self.ERRORS[status]

    def cudaGetDeviceCount(self, count):
        count._obj.value = self.count
        return self.status

    def cudaDriverGetVersion(self, version):
        version._obj.value = self.driver
        return 0


@pytest.mark.parametrize(
    "cudart, expected",
    [
        (FakeCudart(0, count=2), (2, None)),
        (FakeCudart(0, count=0), (0, "CUDA sees no GPU; check CUDA_VISIBLE_DEVICES")),
        (
            FakeCudart(35, driver=12040),
            (
                0,
                "the NVIDIA driver runs CUDA up to 12.4, and this onnxruntime-gpu is built "
                "for CUDA 13.0 (cudaGetDeviceCount: CUDA driver version is insufficient for "
                "CUDA runtime version); update the NVIDIA driver",
            ),
        ),
        (
            FakeCudart(35, driver=0),
            (
                0,
                "the NVIDIA driver cannot be used, and this onnxruntime-gpu is built for CUDA "
                "13.0 (cudaGetDeviceCount: CUDA driver version is insufficient for CUDA runtime "
                "version); install or update the NVIDIA driver",
            ),
        ),
        (
            FakeCudart(100),
            (
                0,
                "CUDA cannot use the GPU (cudaGetDeviceCount: no CUDA-capable device is detected); check "
                "the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES",
            ),
        ),
    ],
)
def test_a_driver_too_old_or_no_usable_gpu_is_named_before_any_session(cudart, expected, monkeypatch):
    """Asked before ONNX Runtime starts CUDA, which would print its error on stdout and fall back to the CPU."""
    from maria_onnx.runtime import sessions

    monkeypatch.setattr(sessions, "cuda_runtime", lambda: (cudart, "13.0"))
    sessions.cuda_devices.cache_clear()
    try:
        assert sessions.cuda_devices() == expected
        monkeypatch.setattr(sessions, "gpu_present", lambda: True)
        monkeypatch.setattr(sessions, "cuda_libraries_missing", lambda: None)
        monkeypatch.setattr(
            sessions.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        assert sessions.cuda_missing() == expected[1]
        if expected[1]:
            with pytest.raises(ValueError) as refused:
                sessions.providers_for("cuda:1")
            assert error_line(refused.value) == f"--device cuda:1: {expected[1]}; use --device auto or cpu"
    finally:
        sessions.cuda_devices.cache_clear()


def test_a_gpu_number_beyond_the_machines_is_refused(monkeypatch):
    from maria_onnx.runtime import sessions

    monkeypatch.setattr(sessions, "cuda_missing", lambda: None)
    for count, device, gpus in [(1, "cuda:1", "1 GPU here (cuda:0)"), (2, "cuda:2", "2 GPUs here (cuda:0 to cuda:1)")]:
        monkeypatch.setattr(sessions, "cuda_devices", lambda count=count: (count, None))
        with pytest.raises(ValueError) as refused:
            sessions.providers_for(device)
        assert (
            error_line(refused.value) == f"--device {device}: CUDA sees {gpus}; pick one of them, or use --device cpu"
        )
    assert sessions.providers_for("cuda:1") == sessions.cuda_providers(1)  # 2 GPUs: cuda:1 is the second


def test_this_machines_cuda_runtime_answers():
    """The real CUDA runtime where one is installed (this project's CPU machine has one and no driver)."""
    from maria_onnx.runtime import sessions

    if sessions.cuda_runtime() is None:
        pytest.skip("no CUDA runtime library (libcudart) for this onnxruntime here")
    sessions.cuda_devices.cache_clear()
    count, why = sessions.cuda_devices()
    assert (count > 0 and why is None) or (count == 0 and "(cudaGetDeviceCount: " in why), (count, why)


CUDA_FAILURE = (
    "[ONNXRuntimeError] : 1 : FAIL : provider_options_utils.h:187 Parse Failed to parse provider option "
    '"device_id": CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version ; '
    "GPU=-1 ; hostname=vm ; expr=cudaGetDeviceCount(&num_devices);"
)


@pytest.mark.parametrize("onnxruntime", ["1.23 and later", "before 1.23"])
def test_cuda_that_fails_to_start_falls_back_with_one_line_and_nothing_on_stdout(onnxruntime, monkeypatch, capsys):
    from maria_onnx.runtime import sessions
    from maria_onnx.runtime.sessions import cuda_providers, make_session

    real = sessions.ort.InferenceSession

    def session(path, sess_options=None, providers=None, **kwargs):
        if providers[0] == "CPUExecutionProvider":
            return real(path, sess_options=sess_options, providers=providers)
        if onnxruntime == "1.23 and later":
            assert kwargs == {"enable_fallback": 0}
            raise RuntimeError(CUDA_FAILURE)
        print("*************** EP Error ***************")  # its own fallback, printed where fills go
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(sessions.ort, "InferenceSession", session)
    head = Path(DEFAULT_MODEL) / "fusion_head.onnx"
    reason = (
        "CUDA could not start (CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version)"
        if onnxruntime == "1.23 and later"
        else "CUDA could not start (ONNX Runtime fell back to CPUExecutionProvider)"
    )
    with pytest.warns(RuntimeWarning) as warned:
        assert make_session(head, cuda_providers(0)).get_providers() == ["CPUExecutionProvider"]
    assert [str(w.message) for w in warned] == [f"{reason}; running on the CPU instead"]
    with pytest.raises(ValueError) as refused:
        make_session(head, cuda_providers(0), insist=True)
    assert error_line(refused.value) == (
        f"--device cuda: {reason}; check the GPU driver (nvidia-smi) and CUDA libraries, or use --device cpu"
    )
    assert capsys.readouterr().out == ""


def test_a_provider_error_other_than_starting_is_not_hidden_by_a_fallback(monkeypatch):
    """ONNX Runtime's Fail (not a RuntimeError) at session creation, such as a refused CUDA graph capture, reaches the
    caller; and a session never reruns a failed call on the CPU behind a print."""
    from maria_onnx.runtime import sessions
    from maria_onnx.runtime.sessions import cuda_providers, make_session

    head = Path(DEFAULT_MODEL) / "fusion_head.onnx"
    assert make_session(head, ["CPUExecutionProvider"])._enable_fallback is False

    class Fail(Exception):
        pass

    def refuse(path, sess_options=None, providers=None, **kwargs):
        raise Fail("This session cannot use the graph capture feature as requested by the user")

    monkeypatch.setattr(sessions.ort, "InferenceSession", refuse)
    with pytest.raises(Fail):
        make_session(head, cuda_providers(0))
