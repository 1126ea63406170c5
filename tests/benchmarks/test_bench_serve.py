"""benchmarks/bench_serve.py: its plan of server configurations, its table and verdicts, and one tiny
real cell (wrk against the real server) with a configuration the server rejects, which is skipped.
The speed target is the benchmark's business; nothing here asserts a rate."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from _serving import REPO, onnx_artifacts


def _load_bench_serve():
    # registered in sys.modules before it runs: its dataclasses look their module up there
    spec = importlib.util.spec_from_file_location("bench_serve", REPO / "benchmarks" / "bench_serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bs = _load_bench_serve()
ALL = {"--workers", "--max-batch-size", "--max-queue-delay-us", "--runtime"}


def test_plan_passes_options_the_server_has_and_skips_what_it_lacks():
    full = {c.label: c for c in bs.plan(workers=4, max_batch_size=32, max_queue_delay_us=200, options=ALL)}
    assert list(full) == [bs.BASELINE, "1 worker, batching", "4 workers, no batching", "4 workers, batching"]
    assert not any(c.skipped for c in full.values())
    assert full[bs.BASELINE].args == ["--workers", "1", "--max-batch-size", "1"]
    assert full["4 workers, batching"].args == ["--workers", "4", "--max-batch-size", "32",
                                                "--max-queue-delay-us", "200"]

    today = {c.label: c for c in bs.plan(workers=4, max_batch_size=32, max_queue_delay_us=0, options={"--runtime"})}
    assert today[bs.BASELINE].args == [] and not today[bs.BASELINE].skipped
    assert "--max-batch-size" in today["1 worker, batching"].skipped
    assert "--workers" in today["4 workers, no batching"].skipped


def test_plan_adds_the_asyncio_loop_rows_on_request():
    labels = [c.label for c in bs.plan(workers=2, max_batch_size=64, max_queue_delay_us=0, options=ALL | {"--loop"},
                                       asyncio_loop=True)]
    assert labels[4:] == ["1 worker, batching, asyncio loop", "2 workers, batching, asyncio loop"]
    old = {c.label: c for c in bs.plan(workers=2, max_batch_size=64, max_queue_delay_us=0, options=ALL,
                                       asyncio_loop=True)}
    assert "--loop" in old["2 workers, batching, asyncio loop"].skipped


def _cell(config, connections, rps, p99, errors=0):
    return bs.Cell(config=config, connections=connections, requests_per_second=rps, p50_ms=p99 / 2, p99_ms=p99,
                   max_ms=p99, requests=int(rps), errors=errors, non_2xx=0, seconds=1.0)


def test_table_and_verdicts_compare_with_the_baseline_at_the_same_connections():
    cells = [_cell(bs.BASELINE, 64, 3000, 30), _cell("2 workers, batching", 64, 6600, 20),
             _cell("1 worker, batching", 64, 5000, 10), _cell("2 workers, no batching", 64, 7000, 40),
             _cell("2 workers, batching", 16, 9000, 5, errors=3)]
    base = {c.connections: c.requests_per_second for c in cells if c.config == bs.BASELINE}
    for c in cells:
        c.ratio = c.requests_per_second / base[c.connections] if c.connections in base else None
    result = {"cells": cells}
    table = bs.markdown(result)
    assert "| 2 workers, batching | 64 | 6,600 | 10.00 | 20.00 | 0 | 2.20x |" in table
    assert "| 2 workers, batching | 16 | 9,000 | 2.50 | 5.00 | 3 | - |" in table
    lines = bs.verdicts(result)
    assert len(lines) == 3  # the three non-baseline cells at 64 connections
    assert lines[0].startswith("meets ") and "2.20x" in lines[0]
    assert lines[1].startswith("MISSES") and "1.67x" in lines[1]  # too slow
    assert lines[2].startswith("MISSES") and "p99 40.0" in lines[2]  # fast enough, p99 too high


@pytest.mark.slow
@pytest.mark.integration
def test_one_tiny_cell_against_the_real_server(require_system_tool, trained_mlp, tmp_path_factory, mnist_dir,
                                               cache_dir, capsys):
    require_system_tool("wrk", "wrk, the HTTP load generator")
    folder = onnx_artifacts(trained_mlp, tmp_path_factory.mktemp("bench-serve"), mnist_dir, cache_dir)
    configs = [bs.ServerConfig(bs.BASELINE, []),
               bs.ServerConfig("rejected", ["--no-such-option"])]  # the server exits: reported, not fatal
    result = bs.bench(artifacts=folder, configs=configs, connections=(2,), seconds=1, warmup=0, data_dir=mnist_dir)
    (cell,) = result["cells"]
    assert cell.config == bs.BASELINE and cell.connections == 2
    assert cell.requests > 0 and cell.errors == 0 and cell.ratio == pytest.approx(1.0)
    assert 0 < cell.p50_ms <= cell.p99_ms <= cell.max_ms
    assert "did not start" in configs[1].skipped and "no-such-option" in configs[1].skipped
    assert "| 1 worker, no batching | 2 |" in bs.markdown(result)
