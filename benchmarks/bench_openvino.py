"""Harness cross-check for OpenVINO: `mnist-deploy bench`'s throughput against OpenVINO's own benchmark_app.

Both measure the same sha256-checked IR (.xml + .bin) in one run, at batch 1024, f32 inference precision
pinned (`-infer_precision f32`), one stream and synchronous requests (what the LATENCY mode the bench's
predictor uses gives; benchmark_app wants `-hint none` with `-nthreads`) and the same thread count; they
alternate --repeats times so drift hits both.
benchmark_app reshapes the model to the static batch shape (`-shape`), as the bench's predictor compiles a
static shape per batch size it is called with repeatedly (benchmarks/bench_openvino_shapes.py); its
images/s is computed from the iterations and duration it prints (its own FPS figure counts a batch as
one frame when the model has no layout), and its Throughput line is printed beside.

    python benchmarks/bench_openvino.py --artifacts artifacts --data-dir ../shared/data/mnist

Target (issue 8): the bench's throughput within 15% of benchmark_app's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

BATCH = 1024


def benchmark_app(xml: str, threads: int, seconds: float) -> dict:
    """Run OpenVINO's benchmark_app (shipped in the openvino wheel) and parse what it reports."""
    exe = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    cmd = [exe, "-m", xml, "-d", "CPU", "-shape", f"[{BATCH},784]", "-infer_precision", "f32",
           "-hint", "none", "-nstreams", "1", "-api", "sync", "-nthreads", str(threads), "-t", f"{seconds:g}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise SystemExit(f"benchmark_app failed ({out.returncode}):\n{text[-2000:]}")
    count = int(re.search(r"Count:\s+(\d+) iterations", text).group(1))
    duration_ms = float(re.search(r"Duration:\s+([\d.]+) ms", text).group(1))
    fps = float(re.search(r"Throughput:\s+([\d.]+) FPS", text).group(1))
    value, unit = re.search(r"Median:\s+([\d.]+) (ms|us)", text).groups()  # us when fast
    median = float(value) / (1000.0 if unit == "us" else 1.0)
    return {"images_per_s": BATCH * count / (duration_ms / 1e3), "iterations": count, "fps_line": fps,
            "median_ms": median, "command": " ".join(cmd)}


def main() -> None:
    from mnist_deploy.artifacts.manifest import load_manifest, verified_path
    from mnist_deploy.bench.run import default_threads, run_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"))
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement, both tools")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    xml = str(verified_path(args.artifacts, "openvino", load_manifest(args.artifacts)))
    ours, theirs, other = [], [], []
    for _ in range(args.repeats):
        result = run_bench(artifacts=args.artifacts, runtimes="openvino", batch_sizes=str(BATCH), device="cpu",
                           threads=args.threads, warmup=args.warmup, min_time=args.seconds, peak_sizes=(256,),
                           data_dir=args.data_dir, allow_download=False)
        row = result["records"][0]
        if row["status"] != "ok":
            raise SystemExit(f"bench row {row['status']}: {row['reason']}")
        ours.append(row)
        other.append(result["environment"]["other_processes_cpu_percent"])
        theirs.append(benchmark_app(xml, args.threads, args.seconds))

    row = ours[0]
    print(f"OpenVINO {result['environment'].get('openvino')}, {xml}, batch {BATCH}, {args.threads} threads, "
          f"precision applied {row['precision']}, performance mode {row['performance_mode']}, "
          f"{args.seconds:g} s per measurement, {args.repeats} alternating repeats")
    print(f"benchmark_app: {theirs[0]['command']}")
    print(f"{'repeat':<8}{'bench images/s':>16}{'calls':>8}{'benchmark_app images/s':>24}{'iters':>8}"
          f"{'(its FPS line)':>16}{'ratio':>8}")
    for i, (o, t) in enumerate(zip(ours, theirs, strict=True), 1):
        print(f"{i:<8}{o['throughput_per_s']:>16,.0f}{o['n_calls']:>8}{t['images_per_s']:>24,.0f}"
              f"{t['iterations']:>8}{t['fps_line']:>16,.1f}{o['throughput_per_s'] / t['images_per_s']:>8.3f}")
    a = statistics.median(o["throughput_per_s"] for o in ours)
    b = statistics.median(t["images_per_s"] for t in theirs)
    ratio = a / b
    print(f"{'median':<8}{a:>16,.0f}{'':>8}{b:>24,.0f}{'':>8}{'':>16}{ratio:>8.3f}")
    print(f"target: bench throughput within 15% of benchmark_app's: {'ok' if abs(ratio - 1) <= 0.15 else 'MISSED'}")
    if any(o is not None and o > 5 for o in other):
        print(f"warning: other processes used up to {max(o for o in other if o is not None):.0f}% of the CPU meanwhile")


if __name__ == "__main__":
    main()
