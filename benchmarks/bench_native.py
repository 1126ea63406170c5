"""Harness fidelity for the runner rows: batch-1 p50 of `mnist-deploy bench`'s torchscript-cpp / aoti-cpp /
onnxruntime-node rows against a bare loop in the same language over the same calls.

The bench drives the runner as a persistent subprocess (mnist_deploy.formats.framed: the C++ runner,
the Node runner) and has it time its own loop; the bare loop is the runner's one-shot `bench` mode in
a fresh process: the same file (sha256-checked), the same real test image, the same threads, per-call
clock reads around the call (`p50`; steady_clock in C++, process.hrtime.bigint around
`await session.run` in Node), and also one clock read at each end of the loop (`mean`), which shows
what reading the clock per call costs. Alternating --repeats times so drift hits both.

    python benchmarks/bench_native.py --artifacts artifacts --data-dir ../shared/data/mnist
    python benchmarks/bench_native.py --runtimes onnxruntime-node --artifacts artifacts

Target: the bench's p50 within 10% of the bare loop's (as benchmarks/bench_fidelity.py for ONNX Runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

KINDS = {"torchscript-cpp": "torchscript", "aoti-cpp": "aoti"}


def bare_command(runtime: str) -> list[str]:
    """The one-shot `bench` command of the runner behind ``runtime`` (the options follow)."""
    if runtime == "onnxruntime-node":
        from mnist_deploy.formats.js_node import RUNNER, js_dir, probe

        found = probe()
        if isinstance(found, str):
            sys.exit(f"{runtime}: {found}")
        return [found["node_path"], str(js_dir() / RUNNER), "bench"]
    from mnist_deploy.formats.native import ensure_runner

    return [str(ensure_runner(progress=print)), "bench", "--kind", KINDS[runtime]]


def bare_loop(command: list[str], model: str, x_path: str, shape: str, threads: int, warmup: int,
              min_time: float) -> dict:
    """The runner's own one-shot bench in a fresh process: JSON with p50_ms and bare_loop_mean_ms."""
    out = subprocess.run([*command, "--model", model, "--input", x_path,
                          "--shape", shape, "--threads", str(threads), "--warmup", str(warmup),
                          "--min-time", str(min_time), "--min-calls", "20"],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out)


def main() -> None:
    from mnist_deploy.artifacts.manifest import load_manifest, verified_path
    from mnist_deploy.bench.run import default_threads, run_bench
    from mnist_deploy.data.mnist import load_splits
    from mnist_deploy.formats import resolve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"))
    ap.add_argument("--runtimes", default="torchscript-cpp,aoti-cpp")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    manifest = load_manifest(args.artifacts)
    splits, _ = load_splits(args.data_dir, allow_download=False)
    input_shape = tuple(manifest["model"]["input_shape"])
    x = np.ascontiguousarray(splits["test"].images.numpy()[:1].reshape(1, *input_shape), dtype=np.float32)
    shape = ",".join(map(str, (1, *input_shape)))  # what bench times at batch 1
    with tempfile.NamedTemporaryFile(suffix=".f32", delete=False) as fh:
        fh.write(x.tobytes())
        x_path = fh.name
    print(f"batch 1, {args.threads} threads, {args.min_time} s per measurement, {args.repeats} alternating "
          f"repeats, python {sys.version.split()[0]}")
    try:
        for runtime in [r.strip() for r in args.runtimes.split(",") if r.strip()]:
            model = str(verified_path(args.artifacts, resolve(runtime).key, manifest))
            command = bare_command(runtime)
            rows = []
            for _ in range(args.repeats):
                result = run_bench(artifacts=args.artifacts, runtimes=runtime, batch_sizes="1", device="cpu",
                                   threads=args.threads, warmup=args.warmup, min_time=args.min_time,
                                   peak_sizes=(256,), data_dir=args.data_dir, allow_download=False)
                row = result["records"][0]
                if row["status"] != "ok":
                    sys.exit(f"{runtime}: {row['status']}: {row['reason']}")
                bare = bare_loop(command, model, x_path, shape, args.threads, args.warmup, args.min_time)
                rows.append((row["p50_ms"], row["n_calls"], bare["p50_ms"], bare["n_calls"], bare["bare_loop_mean_ms"]))
            print(f"\n{runtime}")
            print(f"{'repeat':<8}{'bench p50 (ms)':>16}{'calls':>9}{'bare p50 (ms)':>16}{'calls':>9}"
                  f"{'bare mean (ms)':>16}{'ratio':>8}")
            for i, (h, hn, b, bn, m) in enumerate(rows, 1):
                print(f"{i:<8}{h:>16.5f}{hn:>9}{b:>16.5f}{bn:>9}{m:>16.5f}{h / b:>8.3f}")
            h = statistics.median(r[0] for r in rows)
            b = statistics.median(r[2] for r in rows)
            m = statistics.median(r[4] for r in rows)
            print(f"{'median':<8}{h:>16.5f}{'':>9}{b:>16.5f}{'':>9}{m:>16.5f}{h / b:>8.3f}")
            print(f"target: bench p50 within 10% of the bare loop's: {'ok' if abs(h / b - 1) <= 0.10 else 'MISSED'}")
    finally:
        os.unlink(x_path)


if __name__ == "__main__":
    main()
