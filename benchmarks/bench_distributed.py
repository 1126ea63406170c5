"""One process x 2 threads against 2 processes x 1 thread (torchrun, gloo, DDP) for `mnist-deploy train`.

(1 process x 1 thread is run too, to separate the effect of the threads from that of the processes,
and 1 process x 1 thread with `--step autograd`, the step DDP runs, to separate the step from both:
one process trains the MLP with the fused step by default, and torchrun ranks cannot.)

Same model, epochs, seed and global batch (64; 32 per rank with 2 processes). Whole-process wall
time, the training loop's time (metrics.json's train_seconds) and test accuracy, alternating runs,
medians.

    python benchmarks/bench_distributed.py --data-dir ../shared/data/mnist [--repeats 3] [--model mlp]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(cmd: list[str], env: dict, out: Path) -> dict:
    t0 = time.perf_counter_ns()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    wall = (time.perf_counter_ns() - t0) / 1e9
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall": wall, "loop": metrics["train_seconds"], "accuracy": metrics["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--model", default="mlp")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MNIST_DEPLOY_CACHE": str(Path(tmp) / "cache")}
        env.pop("OMP_NUM_THREADS", None)
        base = [sys.executable, "-m", "mnist_deploy", "train", "--quiet", "--no-download", "--model", args.model,
                "--epochs", str(args.epochs)]
        if args.data_dir:
            base += ["--data-dir", args.data_dir]
        setups = {
            "1 process x 2 threads": base + ["--threads", "2"],
            "1 process x 1 thread": base + ["--threads", "1"],
            "1 process x 1 thread, autograd": base + ["--threads", "1", "--step", "autograd"],
            "2 processes x 1 thread": base + ["--nproc-per-node", "2", "--threads", "1"],
        }
        out = Path(tmp) / "out"
        subprocess.run(base + ["--epochs", "1", "--subset", "64", "--out", str(out)], env=env, check=True,
                       capture_output=True)  # warms the preprocessed cache
        rows: dict[str, list[dict]] = {k: [] for k in setups}
        for _ in range(args.repeats):
            for name, cmd in setups.items():
                rows[name].append(_run(cmd + ["--out", str(out)], env, out))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {args.model}, {args.epochs} epochs, "
          f"global batch 64, {args.repeats} alternating runs, medians")
    print(f"{'':32}{'whole process (s)':>18}{'training loop (s)':>18}{'accuracy (%)':>14}")
    for name, rs in rows.items():
        wall, loop = statistics.median(r["wall"] for r in rs), statistics.median(r["loop"] for r in rs)
        acc = statistics.median(r["accuracy"] for r in rs)
        print(f"{name:<32}{wall:>18.2f}{loop:>18.2f}{100 * acc:>14.2f}")


if __name__ == "__main__":
    main()
