"""The CPU threads of ONNX Runtime's sessions (runtime/cpus.py): a process given fewer CPUs than the machine has
(an affinity mask, a container's cpuset or CPU quota) gets that many threads per session, never pools pinned to
CPUs outside its set."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maria_onnx.cli import app
from maria_onnx.runtime import cpus
from maria_onnx.runtime.cpus import cpu_quota, session_threads, usable_cpus

ROOT = Path(__file__).resolve().parent.parent


def tree(tmp_path: Path, files: dict[str, str], cgroup: str) -> tuple[Path, Path]:
    """A fake cgroup mount (files under it) and a fake /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    (tmp_path / "proc").write_text(cgroup)
    return root, tmp_path / "proc"


@pytest.mark.parametrize(
    "files, cgroup, quota",
    [
        ({"cpu.max": "150000 100000\n"}, "0::/\n", 1.5),  # docker --cpus 1.5, cgroup v2
        ({"cpu.max": "max 100000\n"}, "0::/\n", None),  # no quota
        (
            {"cpu.max": "max 100000\n", "kubepods/pod1/cpu.max": "200000 100000\n"},  # v2, no cgroup namespace
            "0::/kubepods/pod1\n",
            2.0,
        ),
        ({"cpu.max": "50000 100000\n", "a/cpu.max": "400000 100000\n"}, "0::/a\n", 0.5),  # a parent's smaller quota
        (
            {
                "cpu/cpu.cfs_quota_us": "-1\n",
                "cpu/cpu.cfs_period_us": "100000\n",  # v1, the process's own cgroup
                "cpu/mexp/cpu.cfs_quota_us": "100000\n",
                "cpu/mexp/cpu.cfs_period_us": "100000\n",
            },
            "3:cpuset:/\n1:cpu:/mexp\n0::/\n",
            1.0,
        ),
        (
            {"cpu,cpuacct/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            "4:cpu,cpuacct:/docker/0123abcd\n",
            3.0,
        ),  # v1 in a container: its own path is the mount's root
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "1:cpu:/\n", None),
        ({"cpu.max": "garbage\n"}, "0::/\n", None),  # unreadable: no quota
        ({}, "", None),  # no cgroups (another OS)
    ],
)
def test_the_cpu_quota_is_read_from_cgroup_v2_and_v1(tmp_path, files, cgroup, quota):
    assert cpu_quota(*tree(tmp_path, files, cgroup)) == quota


@pytest.mark.parametrize(
    "affinity, files, usable",
    [
        ({0, 1, 2, 3}, {"cpu.max": "150000 100000\n"}, 2),  # a quota of 1.5 CPUs: 2 threads
        ({0, 1, 2, 3}, {"cpu.max": "max 100000\n"}, 4),
        ({5}, {"cpu.max": "800000 100000\n"}, 1),  # the affinity mask is smaller
        ({0, 1}, {"cpu.max": "10000 100000\n"}, 1),  # at least 1
    ],
)
def test_usable_cpus_are_the_affinity_mask_within_the_quota(tmp_path, monkeypatch, affinity, files, usable):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity, raising=False)
    assert usable_cpus(*tree(tmp_path, files, "0::/\n")) == usable


def test_sessions_get_the_usable_cpus_only_where_they_are_fewer_than_the_machines(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 3)
    assert session_threads() == 3
    assert session_threads(5) == 5  # --threads wins
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 8)
    assert session_threads() is None  # the whole machine: ONNX Runtime's own choice
    for wrong in (0, -1, 2.5, True, "2"):
        with pytest.raises(ValueError, match="^threads must be a whole number >= 1"):
            session_threads(wrong)
    with pytest.raises(ValueError, match="^threads 9 is more than the 8 CPUs of this machine; use at most 8"):
        session_threads(9)


def test_more_threads_than_cpus_is_one_line_before_any_session_starts(bundles):
    """Thousands of threads per session would take minutes to start; the command says so at once instead."""
    result = CliRunner().invoke(
        app, ["infill", "a [MASK] b", "--model", str(bundles["olmo"]), "--device", "cpu", "--threads", "100000"]
    )
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (
        f"error: --threads 100000 is more than the {os.cpu_count()} CPUs of this "
        f"machine; use at most {os.cpu_count()}, or leave it out for the CPUs this "
        "process may use"
    )


def test_a_session_gets_the_threads_asked_for(bundles, monkeypatch):
    from maria_onnx.runtime.infiller import Infiller

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    infiller = Infiller(bundles["olmo"], device="cpu", threads=3)
    backend = infiller.backend
    for session in (backend.mlm, backend.step, backend.head):
        assert session.get_session_options().intra_op_num_threads == 3
        # a process given 1 CPU of a 64-CPU machine
    monkeypatch.setattr(cpus, "usable_cpus", lambda: 1)
    assert Infiller(bundles["olmo"], device="cpu").backend.step.get_session_options().intra_op_num_threads == 1


PINNED = """
import json, os, sys
from maria_onnx.runtime.infiller import Infiller
infiller = Infiller(sys.argv[1], device="cpu")
infiller.infill(["a [MASK] b [MASK:2] c"])
tasks = os.listdir("/proc/self/task")
print(json.dumps(sorted({cpu for task in tasks for cpu in os.sched_getaffinity(int(task))})))
"""


def test_a_process_limited_to_one_cpu_runs_no_thread_outside_it(bundles):
    """Left to itself, ONNX Runtime pins its pool threads to the machine's cores, outside a process's affinity mask
    (and, under a container's cpuset, prints an error for each thread it cannot pin)."""
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs Linux and at least 2 CPUs in this process's affinity mask")
    cpu = min(os.sched_getaffinity(0))
    run = subprocess.run(
        [sys.executable, "-c", PINNED, str(bundles["olmo"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [cpu]
    assert "pthread_setaffinity" not in run.stderr


def test_threads_from_the_cli_fill_alike(bundles):
    from typer.testing import CliRunner

    from maria_onnx.cli import app

    def infill(*args):
        return CliRunner().invoke(
            app, ["infill", "a [MASK] b [MASK:3] c", "--model", str(bundles["olmo"]), "--device", "cpu", *args]
        )

    default, one = infill(), infill("--threads", "1")
    assert default.exit_code == 0 and one.exit_code == 0 and one.stdout == default.stdout
    assert CliRunner().invoke(app, ["infill", "a [MASK]", "--threads", "2"], env={"MARIA_THREADS": "0"}).exit_code == 0
    refused = CliRunner().invoke(app, ["infill", "a [MASK]"], env={"MARIA_THREADS": "0"})
    assert refused.exit_code == 2 and "'--threads' (env var: 'MARIA_THREADS')" in refused.output
