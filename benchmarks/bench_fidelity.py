"""Harness fidelity: ONNX Runtime batch-1 p50 from `mnist-deploy bench` against a bare `session.run` loop.

Both run in this one process on the same ONNX file (sha256-checked), the same real test image and the
same thread settings, alternating --repeats times so drift hits both; the bare loop is the
smallest honest timing of ONNX Runtime: perf_counter_ns() around `session.run(None, feed)`.

    python benchmarks/bench_fidelity.py --artifacts artifacts --data-dir ../shared/data/mnist

Target (issue 4): the bench's p50 within 10% of the bare loop's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np


def bare_loop_p50(path: str, x: np.ndarray, threads: int, warmup: int, min_time: float) -> tuple[float, int]:
    """p50 in ms of `session.run` alone on a session built with ONNX Runtime's own API."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    deadline = time.perf_counter_ns() + int(min_time * 1e9)
    while True:
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        t1 = time.perf_counter_ns()
        times.append(t1 - t0)
        if t1 >= deadline and len(times) >= 20:
            break
    return float(np.median(times)) / 1e6, len(times)


def main() -> None:
    from mnist_deploy.artifacts.manifest import load_manifest, verified_path
    from mnist_deploy.bench.run import default_threads, run_bench
    from mnist_deploy.data.mnist import load_splits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"))
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    path = str(verified_path(args.artifacts, "onnx", load_manifest(args.artifacts)))
    splits, _ = load_splits(args.data_dir, allow_download=False)
    x = np.ascontiguousarray(splits["test"].images.numpy()[:1], dtype=np.float32)  # what bench times at batch 1

    harness, bare, other = [], [], []
    for _ in range(args.repeats):
        result = run_bench(artifacts=args.artifacts, runtimes="onnxruntime", batch_sizes="1", device="cpu",
                           threads=args.threads, warmup=args.warmup, min_time=args.min_time, peak_sizes=(256,),
                           data_dir=args.data_dir, allow_download=False)
        row = result["records"][0]
        harness.append((row["p50_ms"], row["n_calls"]))
        other.append(result["environment"]["other_processes_cpu_percent"])
        bare.append(bare_loop_p50(path, x, args.threads, args.warmup, args.min_time))

    print(f"ONNX Runtime, batch 1, {args.threads} threads, {args.min_time} s per measurement, "
          f"{args.repeats} alternating repeats, python {sys.version.split()[0]}")
    print(f"{'repeat':<8}{'bench p50 (ms)':>16}{'calls':>9}{'bare p50 (ms)':>16}{'calls':>9}{'ratio':>8}")
    for i, ((h, hn), (b, bn)) in enumerate(zip(harness, bare, strict=True), 1):
        print(f"{i:<8}{h:>16.5f}{hn:>9}{b:>16.5f}{bn:>9}{h / b:>8.3f}")
    h = statistics.median(v for v, _ in harness)
    b = statistics.median(v for v, _ in bare)
    ratio = h / b
    print(f"{'median':<8}{h:>16.5f}{'':>9}{b:>16.5f}{'':>9}{ratio:>8.3f}")
    print(f"target: bench p50 within 10% of the bare loop: {'ok' if abs(ratio - 1) <= 0.10 else 'MISSED'}")
    if any(o is not None and o > 5 for o in other):
        print(f"warning: other processes used up to {max(o for o in other if o is not None):.0f}% of the CPU meanwhile")


if __name__ == "__main__":
    main()
