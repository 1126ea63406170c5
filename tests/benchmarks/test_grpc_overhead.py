"""benchmarks/grpc_overhead.py: the CPU counters it reads, its table, a clear error without a model, and
(marked slow) one short real run of every kind of row. No rates are checked: they are the benchmark's."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time

import pytest
from _serving import REPO

BENCH = REPO / "benchmarks" / "grpc_overhead.py"


def _load():
    sys.path.insert(0, str(REPO / "benchmarks"))  # it imports its neighbours (compare_protocols, load_test)
    spec = importlib.util.spec_from_file_location("grpc_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


go = _load()


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task"), reason="reads /proc/PID/task")
def test_cpu_ticks_count_the_main_thread_and_the_process():
    main0, total0 = go.cpu_ticks(os.getpid())
    end = time.process_time() + 0.3
    while time.process_time() < end:  # burn CPU on this (the main) thread
        pass
    main1, total1 = go.cpu_ticks(os.getpid())
    assert main1 - main0 >= 0.2 * go.TICK  # most of the 0.3 s, in clock ticks
    assert total1 - total0 >= main1 - main0 and total1 >= main1


def test_table_has_a_row_per_measurement_and_dashes_for_what_was_not_measured():
    rows = [go.Row("empty grpc.aio", 4, None, calls_s=8000.4, p50_ms=6.8, p99_ms=12.1, main_us=105.2,
                   process_us=158.0),
            go.Row("mnist-deploy serve", 1, 1000, note="h2load failed (exit 1)")]
    text = go.table(rows).splitlines()
    assert len(text) == 4 and text[0].startswith("| server | acceptors | window us | calls/s")
    assert "| empty grpc.aio | 4 | - | 8,000 | 6.80 | 12.10 | 0 | 105 | 158 | - |  |" == text[2]
    assert text[3].startswith("| mnist-deploy serve | 1 | 1000 | - |") and text[3].endswith("h2load failed (exit 1) |")


def test_no_model_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH), "--artifacts", str(tmp_path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "mnist_model.onnx not found" in r.stderr


@pytest.mark.parametrize("option, value", [("--acceptors", "x"), ("--acceptors", "0"), ("--windows", "-5")])
def test_a_bad_list_is_one_line_and_exit_2(tmp_path, option, value):
    r = subprocess.run([sys.executable, str(BENCH), "--artifacts", str(tmp_path), option, value],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"grpc_overhead.py: error: argument {option}:")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_a_short_run_measures_every_kind_of_row(served, mnist_dir):
    r = subprocess.run([sys.executable, str(BENCH), "--artifacts", str(served), "--data-dir", str(mnist_dir),
                        "--acceptors", "1,2", "--windows", "0", "--duration", "0.5", "--warmup", "0.2",
                        "--connections", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    kinds = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert kinds == ["empty grpc.aio"] * 2 + ["empty grpc.aio + interceptor"] + ["mnist-deploy serve"] * 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] != "-" and float(cells[3].replace(",", "")) > 0, row  # calls/s
        assert cells[6] == "0", row  # errors
        assert cells[7] != "-" and cells[8] != "-", row  # CPU per call measured
    assert all(row.split("|")[10].strip() != "-" for row in rows[3:])  # ours: rows per model call
