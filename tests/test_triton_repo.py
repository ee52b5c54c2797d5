"""`maria triton-repo`: names a URL or config.pbtxt cannot carry, instances per GPU or sharing the CPUs, and where
the repository may be written."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from commands import cli, one_line_error

from maria_onnx.runtime.default_model import DEFAULT_MODEL


@pytest.mark.parametrize("name", ['my "model"', "a b", "", ".hidden", "a/b", "naïve"])
def test_a_model_name_a_url_or_config_pbtxt_cannot_carry_is_refused(name, tmp_path):
    message = f"--model-name takes letters, digits, '_', '-' and '.' (not first), got {name!r}"
    one_line_error(cli("triton-repo", "--out", tmp_path / "repo", "--model-name", name), message)
    one_line_error(cli("serve", "--port", "0", "--device", "cpu", "--model-name", name), message)
    assert not (tmp_path / "repo").exists()


def triton_model(repo: Path, monkeypatch, made: list):
    """The repository's model.py, loaded as Triton's Python backend would (its utilities stubbed), with an Infiller
    that only records (device, threads, speculate) in `made`."""
    import importlib.util
    import types

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the model puts its folder first
    spec = importlib.util.spec_from_file_location(f"model_{repo.name}", repo / "maria" / "1" / "model.py")
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    monkeypatch.setattr(
        model, "Infiller", lambda bundle, device, threads, speculate=0: made.append((device, threads, speculate))
    )
    return model


def test_triton_gpu_instances_each_run_on_their_own_gpu(tmp_path, monkeypatch):
    """Triton starts an instance group on every visible GPU and tells each instance its GPU; the model must use it
    (with plain "cuda" every instance would share GPU 0)."""
    from maria_onnx.serve.triton import write_repository

    write_repository(DEFAULT_MODEL, tmp_path / "repo", kind="gpu", link=True)
    assert 'key: "device" value: { string_value: "cuda" }' in (tmp_path / "repo" / "maria" / "config.pbtxt").read_text()
    runtime = tmp_path / "repo" / "maria" / "1" / "maria_onnx" / "runtime"
    assert (runtime / "graphs" / "greedy.onnx").is_file()  # the greedy choice on the GPU, beside the Python files
    assert not list((runtime / "default_model").glob("*.onnx"))  # the default model's weights stay behind
    made = []
    model = triton_model(tmp_path / "repo", monkeypatch, made)
    config = json.dumps({"parameters": {"device": {"string_value": "cuda"}, "max_texts": {"string_value": "64"}}})
    for kind, device_id in [("GPU", "0"), ("GPU", "3"), ("CPU", "0")]:
        model.TritonPythonModel().initialize(
            {"model_config": config, "model_instance_kind": kind, "model_instance_device_id": device_id}
        )
    assert [device for device, _, _ in made] == ["cuda:0", "cuda:3", "cpu"]


def test_a_repository_carries_the_speculate_setting_to_its_instances(tmp_path, monkeypatch):
    from maria_onnx.serve.triton import write_repository

    write_repository(DEFAULT_MODEL, tmp_path / "repo", kind="cpu", link=True, speculate=4)
    text = (tmp_path / "repo" / "maria" / "config.pbtxt").read_text()
    assert 'key: "speculate" value: { string_value: "4" }' in text
    made = []
    config = json.dumps({"parameters": {"speculate": {"string_value": "4"}}})
    triton_model(tmp_path / "repo", monkeypatch, made).TritonPythonModel().initialize(
        {"model_config": config, "model_instance_kind": "CPU"}
    )
    assert made == [("cpu", None, 4)]
    refused = cli("triton-repo", "--out", tmp_path / "one", "--speculate", "1")
    assert refused.exit_code == 2 and "--speculate takes 0 (off)" in refused.output
    assert not (tmp_path / "one").exists()


def test_triton_cpu_instances_share_the_cpus(tmp_path, monkeypatch):
    """Each of Triton's instances is a process of its own: N CPU instances, each with ONNX Runtime's pools of every
    core, would run N times the threads the machine has. They share the CPUs Triton may use, unless --threads
    says otherwise; what the repository's config says is what its model reads."""
    from maria_onnx.runtime import cpus
    from maria_onnx.serve.triton import write_repository

    monkeypatch.setattr(cpus, "usable_cpus", lambda: 16)
    made = []
    for kind, instances, threads, expected in [
        ("cpu", 4, None, 4),
        ("cpu", 3, None, 5),
        ("cpu", 32, None, 1),
        ("cpu", 1, None, None),
        ("gpu", 4, None, None),
        ("cpu", 4, 2, 2),
        ("gpu", 2, 3, 3),
    ]:
        repo = tmp_path / f"{kind}-{instances}-{threads}"
        write_repository(DEFAULT_MODEL, repo, kind=kind, instances=instances, threads=threads, link=True)
        text = (repo / "maria" / "config.pbtxt").read_text()
        assert f'key: "threads" value: {{ string_value: "{threads or "auto"}" }}' in text
        config = {
            "parameters": {
                "device": {"string_value": "cpu"},
                "threads": {"string_value": str(threads or "auto")},
            },  # as Triton gives them
            "instance_group": [{"name": "maria_0", "kind": f"KIND_{kind.upper()}", "count": instances}],
        }
        triton_model(repo, monkeypatch, made).TritonPythonModel().initialize(
            {"model_config": json.dumps(config), "model_instance_kind": kind.upper(), "model_instance_device_id": "0"}
        )
        assert made[-1][1] == expected, (kind, instances, threads)
    refused = cli("triton-repo", "--out", tmp_path / "zero", "--threads", "0")
    assert refused.exit_code == 2 and "Invalid value for '--threads'" in refused.output
    assert not (tmp_path / "zero").exists()


def test_a_repository_where_none_can_be_written_names_the_out_folder(tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "repo"  # its parent is a file
    one_line_error(
        cli("triton-repo", "--out", out, "--link"),
        f"cannot write the repository to {out} (File exists); choose another --out",
    )


def test_a_repository_inside_its_bundle_is_refused(tmp_path):
    bundle = shutil.copytree(DEFAULT_MODEL, tmp_path / "bundle")
    for out, link in [(bundle / "repo", ()), (bundle / "a" / "repo", ("--link",))]:
        one_line_error(
            cli("triton-repo", bundle, "--out", out, *link),
            f"--out {out} is inside the bundle {bundle}; write the repository somewhere else",
        )
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in Path(DEFAULT_MODEL).iterdir())
