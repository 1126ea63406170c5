"""bench.env: what a bench run records about the machine, and the warnings it derives from it."""

from __future__ import annotations

import os
import subprocess
import sys

from mnist_deploy.bench.env import (
    collect_environment,
    cpu_snapshot,
    default_threads,
    loadavg,
    other_cpu_percent,
    run_warnings,
)


def test_default_threads_is_the_usable_cores():
    n = default_threads()
    assert 1 <= n <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert n == len(os.sched_getaffinity(0))


def test_other_cpu_percent_from_snapshots():
    cores = os.cpu_count() or 1
    assert other_cpu_percent(None, (1.0, 1.0, 1.0)) is None
    assert other_cpu_percent((0.0, 0.0, 5.0), (1.0, 0.0, 5.0)) is None  # no wall time passed
    # the whole machine busy for 10 s, none of it ours: 100%; all of it ours: 0%
    assert other_cpu_percent((0.0, 0.0, 0.0), (10.0 * cores, 0.0, 10.0)) == 100.0
    assert other_cpu_percent((0.0, 0.0, 0.0), (10.0 * cores, 10.0 * cores, 10.0)) == 0.0
    assert other_cpu_percent((0.0, 0.0, 0.0), (1.0, 2.0, 10.0)) == 0.0  # never negative


def test_cpu_snapshot_counts_this_process_and_its_children():
    before = cpu_snapshot()
    if before is None:  # not Linux
        return
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.3: pass\nprint('done', flush=True)\ntime.sleep(30)"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().strip() == "done"  # it has burnt its CPU and is still alive
        after = cpu_snapshot()
    finally:
        busy.kill()
        busy.wait()
    assert len(after) == 3 and after[2] > before[2]
    assert after[1] - before[1] >= 0.2  # the live child's CPU seconds are counted as ours


def test_run_warnings():
    assert run_warnings({"other_processes_cpu_percent": 1.0, "cores": 4}, threads=4) == []
    busy = run_warnings({"other_processes_cpu_percent": 40.0, "cores": 4}, threads=8)
    assert any("other processes used 40%" in w and "rerun on a quiet machine" in w for w in busy)
    assert any("8 threads on 4 cores: oversubscribed" in w for w in busy)
    assert run_warnings({}, threads=1) == []


def test_collect_environment_records_versions_and_the_commit():
    env = collect_environment(2, ["cpu"])
    assert env["threads"] == 2 and env["cores"] == os.cpu_count() and env["gpu"] is None
    assert env["cpu"] and env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "numpy" in env["packages"] and all(p in env for p in env["packages"])
    assert env["torch_cpu_capability"] is None or isinstance(env["torch_cpu_capability"], str)
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    load = loadavg()
    assert load is None or len(load) == 3


def test_environment_records_the_8_bit_path():
    """The bench environment block names the CPU's 8-bit path (where every INT8 row was measured)."""
    from mnist_deploy.formats.cpu_int8 import PATHS, int8_path

    env = collect_environment(threads=1)
    assert env["cpu_int8_path"] == int8_path()
    assert env["cpu_int8_path"]["path"] in PATHS
