"""Training speed: the origin's way (benchmarks/origin_train.py) against `mnist-deploy train`, side by side.

Both run as separate processes on the same data and machine, MLP, 5 epochs, batch 64, Adam; the
preprocessed-tensor cache is warmed first (a throw-away `mnist-deploy data`-like load). Each pair is
run --repeats times alternately and the medians are compared.

    python benchmarks/bench_train.py --data-dir ../shared/data/mnist [--repeats 3]

Targets (issue 2): training loop <= 0.4x the origin's; whole process <= 0.5x; accuracy >= 98.0%.
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

HERE = Path(__file__).resolve().parent


def _timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MNIST_DEPLOY_CACHE": str(Path(tmp) / "cache")}
        if args.data_dir:
            env["MNIST_DEPLOY_DATA"] = args.data_dir
        ours_cmd = [sys.executable, "-m", "mnist_deploy", "train", "--quiet", "--no-download",
                    "--epochs", str(args.epochs), "--out", str(Path(tmp) / "out")]
        origin_cmd = [sys.executable, str(HERE / "origin_train.py"), "--epochs", str(args.epochs)]
        if args.data_dir:
            origin_cmd += ["--data-dir", args.data_dir]
        subprocess.run([sys.executable, "-m", "mnist_deploy", "data", "--no-download"], env=env, check=True,
                       capture_output=True)  # verify the files once
        _timed(ours_cmd, env)  # warms the preprocessed cache
        origin, ours = [], []
        for _ in range(args.repeats):
            wall, out = _timed(origin_cmd, env)
            rec = json.loads(out.strip().splitlines()[-1])
            origin.append({"wall": wall, "loop": rec["train_loop_seconds"], "accuracy": rec["accuracy"]})
            wall, _ = _timed(ours_cmd, env)
            metrics = json.loads((Path(tmp) / "out" / "metrics.json").read_text())
            ours.append({"wall": wall, "loop": metrics["train_seconds"], "accuracy": metrics["accuracy"]})

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {args.repeats} alternating runs each, medians")
    print(f"{'':28}{'origin way':>12}{'mnist-deploy':>14}{'ratio':>8}{'target':>9}")
    for label, key, target in (("training loop, 5 epochs (s)", "loop", 0.4), ("whole process (s)", "wall", 0.5)):
        a, b = med(origin, key), med(ours, key)
        verdict = "ok" if b / a <= target else "MISSED"
        print(f"{label:<28}{a:>12.2f}{b:>14.2f}{b / a:>8.3f}{'<= ' + str(target):>9} {verdict}")
    a, b = med(origin, "accuracy"), med(ours, "accuracy")
    print(f"{'test accuracy (%)':<28}{100 * a:>12.2f}{100 * b:>14.2f}{'':>8}{'>= 98.0':>9} "
          f"{'ok' if b >= 0.98 else 'MISSED'}")


if __name__ == "__main__":
    main()
