"""How many CPUs this process may use, which sizes ONNX Runtime's thread pools.

Left to itself, ONNX Runtime gives each session a pool of one thread per physical core of the machine and pins
those threads to the machine's cores. A process given fewer CPUs than the machine has then oversubscribes them:
under an affinity mask or a container's cpuset (taskset, docker --cpuset-cpus, Kubernetes' static CPU manager) the
threads are pinned to cores outside its set (ONNX Runtime prints an error for each where the pinning fails, and
the threads crowd the CPUs the process has), and under a CPU quota (docker --cpus, a Kubernetes CPU limit) it runs
more threads than it has time for. There each session gets as many threads as the process has CPUs, set
explicitly, so ONNX Runtime pins none. (loky's cpu_count reads the same limits, at two more packages and about
35 ms more start-up for every command.)
"""

import math
import os
from pathlib import Path

from .errors import SettingError

CGROUP = Path("/sys/fs/cgroup")


def _own_cgroups(proc: Path) -> dict[str, str]:
    """This process's cgroup path per hierarchy, from /proc/self/cgroup: '' for cgroup v2's unified one, the
    controllers ('cpu,cpuacct') for v1's."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return {}
    return {fields[1]: fields[2] for fields in (line.split(":", 2) for line in lines) if len(fields) == 3}


def _quota_in(folder: Path) -> float | None:
    """The CPU quota set on one cgroup folder, in CPUs, or None where it sets none."""
    try:
        if (folder / "cpu.max").exists():  # v2: "max 100000" or "150000 100000"
            limit, every = (folder / "cpu.max").read_text().split()[:2]
            return None if limit == "max" else int(limit) / int(every)
        if (folder / "cpu.cfs_quota_us").exists():  # v1: -1 where there is none
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
    return None


def cpu_quota(root: Path = CGROUP, proc: Path = Path("/proc/self/cgroup")) -> float | None:
    """The smallest CPU quota (in CPUs: 1.5 for docker --cpus 1.5) on this process's cgroup and its ancestors,
    cgroup v2 or v1; None where there is none or it cannot be read. Inside a container the cgroup root is the
    container's own."""
    folders = []
    for controllers, path in _own_cgroups(proc).items():
        if controllers == "":
            base = root
        elif "cpu" in controllers.split(","):
            base = root / controllers
        else:
            continue
        parts = [part for part in path.split("/") if part]
        folders += [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    quotas = [quota for quota in map(_quota_in, folders or [root, root / "cpu"]) if quota is not None]
    return min(quotas, default=None)


def usable_cpus(root: Path = CGROUP, proc: Path = Path("/proc/self/cgroup")) -> int:
    """CPUs this process may use: those of its affinity mask, no more than its cgroup CPU quota (rounded up), at
    least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity masks on this platform (macOS, Windows)
        cpus = os.cpu_count() or 1
    quota = cpu_quota(root, proc)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def session_threads(threads: int | None = None) -> int | None:
    """The threads each ONNX Runtime session gets: `threads` where given (no more than the machine's CPUs); else,
    where this process may use fewer CPUs than the machine has, that many; else None: ONNX Runtime's own choice (one
    per physical core)."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise SettingError(f"{{threads}} must be a whole number >= 1, got {threads!r}", "threads")
        machine = os.cpu_count() or 1
        if threads > machine:  # more only take turns on the CPUs, and thousands take minutes to start
            raise SettingError(
                f"{{threads}} {threads} is more than the {machine} CPUs of this machine; use at most "
                f"{machine}, or leave it out for the CPUs this process may use",
                "threads",
            )
        return threads
    usable = usable_cpus()
    return usable if usable < (os.cpu_count() or 1) else None


def shared_threads(processes: int) -> int:
    """Threads per session for each of `processes` processes that share this process's CPUs (Triton's CPU
    instances, say): an equal share, at least 1."""
    return max(1, usable_cpus() // processes)
