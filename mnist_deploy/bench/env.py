"""The environment a bench run records: CPU, cores, library versions (of every registered runtime),
load on the machine during the run, git commit. Knows nothing of timing."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .. import __version__


def default_threads() -> int:
    """The cores this process may run on (the affinity mask), else the machine's core count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process, wall seconds), Linux only."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # minus idle and iowait
    own = os.times()
    return busy, own.user + own.system + own.children_user + own.children_system + _descendants_cpu(tick), \
        time.monotonic()


def _descendants_cpu(tick: int) -> float:
    """CPU seconds of this process's live descendants (torch.compile's compile workers, for one)."""
    parent, cpu = {}, {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it exited meanwhile
            parent[int(entry.name)] = int(fields[1])
            cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    mine, total = {os.getpid()}, 0.0
    for pid in sorted(parent):  # children have larger pids, except after pid wrap-around: a rare miss
        if parent[pid] in mine:
            mine.add(pid)
            total += cpu[pid]
    return total


def other_cpu_percent(before, after) -> float | None:
    """How much of the machine's CPU other processes used between two snapshots (0-100)."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return round(max(0.0, 100 * others / ((after[2] - before[2]) * (os.cpu_count() or 1))), 1)


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run_warnings(env: dict, threads: int) -> list[str]:
    out = []
    other = env.get("other_processes_cpu_percent")
    if other is not None and other > 5:
        out.append(f"other processes used {other:.0f}% of the machine's CPU during the run: "
                   "the figures are disturbed; rerun on a quiet machine")
    if env.get("cores") and threads > env["cores"]:
        out.append(f"{threads} threads on {env['cores']} cores: oversubscribed")
    return out


def collect_environment(threads: int, devices: Sequence[str] = ("cpu",)) -> dict:
    """CPU model, cores, threads, OS, Python, library versions, execution providers, GPU, git commit."""
    import importlib.metadata as md

    import torch

    from ..devices import cpu_model, device_name

    env = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "cores_usable": default_threads(), "threads": threads,
        "os": platform.platform(), "python": platform.python_version(), "mnist_deploy": __version__,
    }
    from ..formats import packages

    env["packages"] = list(packages())
    for pkg in packages():
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    env["runtime_versions"] = runtime_versions()
    env["cpu_int8_path"] = _safe(_int8_path)  # VNNI / AVX512 / AVX2 / ARM-dotprod / ...: where INT8 rows ran
    env["torch_cpu_capability"] = _safe(lambda: torch.backends.cpu.get_cpu_capability())
    env["torch_parallel"] = _safe(lambda: torch.__config__.parallel_info().splitlines()[-1].split(":")[-1].strip())
    env["execution_providers"] = _safe(lambda: __import__("onnxruntime").get_available_providers())
    gpus = [d for d in devices if d.startswith("cuda")]
    env["gpu"] = _safe(lambda: device_name(torch.device(gpus[0]))) if gpus else None
    env["cuda"] = torch.version.cuda
    env.update(_git())
    return env


def runtime_versions() -> dict:
    """{runtime: versions} of the registered runtimes that are not Python packages (node, onnxruntime-node),
    as each entry's ``versions()`` reports them; {} for one that is not available here."""
    from ..formats import FORMATS

    return {f.runtime: _safe(f.versions) or {} for f in FORMATS.values() if f.versions is not None}


def _int8_path() -> dict:
    from ..formats.cpu_int8 import int8_path

    return int8_path()


def _safe(fn):
    try:
        return fn()
    except Exception:  # an optional fact we could not read is recorded as null
        return None


def _git() -> dict:
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit or None, "git_dirty": bool(dirty)}


__all__ = ["collect_environment", "cpu_snapshot", "default_threads", "loadavg", "other_cpu_percent", "run_warnings",
           "runtime_versions"]
