"""Timing for bench: per-call durations with ``time.perf_counter_ns()``, latency statistics, and the
roofline reference (the fp32 matmul peak). Knows nothing of formats or artifacts."""

from __future__ import annotations

import array
import time
from collections.abc import Callable, Sequence

import numpy as np

PEAK_SIZES = (1024, 2048)  # square fp32 matrix products for the roofline reference (CPU)
CUDA_PEAK_SIZES = (4096, 8192)


def time_calls(run: Callable, prepared, *, warmup: int, min_time: float, min_calls: int,
               sync: Callable | None = None) -> np.ndarray:
    """Per-call durations in ns of ``run(prepared)`` (then ``sync()`` when given), after ``warmup`` calls."""
    for _ in range(warmup):
        run(prepared)
    if sync is not None:
        sync()
    clock = time.perf_counter_ns
    times = array.array("q")
    append = times.append
    deadline = clock() + int(min_time * 1e9)
    if sync is None:
        while True:
            t0 = clock()
            run(prepared)
            t1 = clock()
            append(t1 - t0)
            if t1 >= deadline and len(times) >= min_calls:
                break
    else:
        while True:
            t0 = clock()
            run(prepared)
            sync()
            t1 = clock()
            append(t1 - t0)
            if t1 >= deadline and len(times) >= min_calls:
                break
    return np.frombuffer(times, dtype=np.int64).copy()


def latency_stats(times_ns: np.ndarray, batch_size: int, flops_per_example: int) -> dict:
    """Percentiles of one call in ms; throughput and GFLOP/s from total work over total timed time."""
    ms = times_ns.astype(np.float64) / 1e6
    total_s = float(times_ns.sum()) / 1e9
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()), "max_ms": float(ms.max()), "std_ms": float(ms.std()), "n_calls": int(len(ms)),
        "throughput_per_s": batch_size * len(ms) / total_s,
        "gflops": flops_per_example * batch_size * len(ms) / total_s / 1e9,
    }


def cpu_gemm_library() -> str:
    """The library torch's CPU matmul runs on in this build, asked of torch rather than assumed: MKL in
    the x86-64 wheels, something else (OpenBLAS, Arm's) on other builds."""
    import torch

    return "MKL" if torch.backends.mkl.is_available() else "BLAS"


def measure_peak(device: str = "cpu", threads: int | None = None, *, sizes: Sequence[int] | None = None,
                 repeats: int = 5) -> dict:
    """The roofline reference: fp32 GFLOP/s of square matrix products, median of ``repeats`` calls.

    On CPU both PyTorch's GEMM (MKL) and ONNX Runtime's (MLAS, with B a constant that it prepacks,
    as it does a model's weights) are measured at each size with the same thread count, and the
    best median is the peak: the machine's, not one library's (a library that picks a slow kernel
    for this CPU would understate it). On CUDA, torch.mm (cuBLAS) with TF32 off.
    """
    cuda = device.startswith("cuda")
    candidates: dict[str, dict] = {}
    for n in sizes or (CUDA_PEAK_SIZES if cuda else PEAK_SIZES):
        for name, ns in _peak_at(n, device, threads, repeats):
            flops = 2.0 * n ** 3
            candidates[f"{name} {n}"] = {"gflops": flops / float(np.median(ns)), "best_gflops": flops / float(ns.min()),
                                         "n": n, "calls": int(len(ns))}
    best = max(candidates, key=lambda k: candidates[k]["gflops"])
    return {"gflops": candidates[best]["gflops"], "method": best.rsplit(" ", 1)[0], "n": candidates[best]["n"],
            "threads": threads, "candidates": candidates}


def _peak_at(n: int, device: str, threads: int | None, repeats: int):
    """Yield (library, per-call ns) for an n x n fp32 product on ``device``."""
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    timing = {"warmup": 2, "min_time": 1e-9, "min_calls": repeats}
    if device.startswith("cuda"):
        dev = torch.device(device)
        ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield "torch.mm (cuBLAS)", time_calls(lambda _: torch.mm(ta, tb), None, **timing,
                                                  sync=lambda: torch.cuda.synchronize(dev))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    with torch.inference_mode():
        yield f"torch.mm ({cpu_gemm_library()})", time_calls(lambda _: torch.mm(ta, tb), None, **timing)
    try:
        session = _ort_matmul_session(b, threads)
    except ImportError:
        return
    feeds = {"A": a}
    yield "onnxruntime MatMul (MLAS)", time_calls(lambda _: session.run(None, feeds), None, **timing)


def _ort_matmul_session(b: np.ndarray, threads: int | None):
    """A one-node ONNX graph ``A @ B`` with B a constant, prepacked like a layer's weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ..formats import DEFAULT_OPSET

    shape = list(b.shape)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "peak",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def best_peak(*measurements: dict | None) -> dict | None:
    """The highest of several peak measurements of one device (a slow moment understates a peak;
    nothing overstates it), with every measured value kept for the record."""
    valid = [m for m in measurements if m and m.get("gflops")]
    if not valid:
        return next((m for m in measurements if m), None)
    best = dict(max(valid, key=lambda m: m["gflops"]))
    best["measurements_gflops"] = [m["gflops"] for m in valid]
    return best


__all__ = ["CUDA_PEAK_SIZES", "PEAK_SIZES", "best_peak", "latency_stats", "measure_peak", "time_calls"]
