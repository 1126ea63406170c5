"""bench.timing: per-call durations, latency statistics against an independent computation, the peak."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_deploy.bench.timing import best_peak, latency_stats, measure_peak, time_calls


def test_time_calls_warms_up_then_times_at_least_min_calls():
    calls, syncs = [], []
    times = time_calls(lambda x: calls.append(x), "input", warmup=3, min_time=1e-9, min_calls=7,
                       sync=lambda: syncs.append(1))
    assert times.dtype == np.int64 and len(times) >= 7 and (times >= 0).all()
    assert len(calls) == 3 + len(times) and set(calls) == {"input"}
    assert len(syncs) == 1 + len(times)  # once after the warm-up, then once inside every timed call


def test_time_calls_runs_until_min_time():
    import time

    times = time_calls(lambda _: None, None, warmup=0, min_time=0.02, min_calls=1)
    assert times.sum() > 0 and len(times) >= 1
    t0 = time.perf_counter()
    time_calls(lambda _: None, None, warmup=0, min_time=0.02, min_calls=1)
    assert time.perf_counter() - t0 >= 0.02


def test_latency_stats_against_numpy():
    rng = np.random.default_rng(0)
    ns = rng.integers(1_000_000, 3_000_000, size=101).astype(np.int64)  # 1 to 3 ms per call
    s = latency_stats(ns, batch_size=8, flops_per_example=1_000)
    ms = ns / 1e6
    assert s["p50_ms"] == pytest.approx(np.median(ms)) and s["min_ms"] == pytest.approx(ms.min())
    assert s["p99_ms"] == pytest.approx(np.percentile(ms, 99)) and s["n_calls"] == 101
    assert s["throughput_per_s"] == pytest.approx(8 * 101 / (ns.sum() / 1e9))
    assert s["gflops"] == pytest.approx(1_000 * 8 * 101 / (ns.sum() / 1e9) / 1e9)


def test_best_peak_keeps_the_highest_and_every_measurement():
    a, b = {"gflops": 10.0, "method": "x"}, {"gflops": 12.5, "method": "y"}
    best = best_peak(a, None, b)
    assert best["method"] == "y" and best["measurements_gflops"] == [10.0, 12.5]
    assert "measurements_gflops" not in b  # the inputs are not changed
    failed = {"gflops": None, "error": "boom"}
    assert best_peak(None, failed) == failed  # nothing valid: the first record, with its error
    assert best_peak(None, None) is None


def test_measure_peak_on_a_small_cpu_product():
    peak = measure_peak("cpu", 1, sizes=(64,), repeats=3)
    assert peak["gflops"] > 0 and peak["n"] == 64 and peak["threads"] == 1
    assert peak["method"] in {k.rsplit(" ", 1)[0] for k in peak["candidates"]}
    assert all(c["calls"] >= 3 for c in peak["candidates"].values())
    assert peak["gflops"] == max(c["gflops"] for c in peak["candidates"].values())
