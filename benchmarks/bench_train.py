"""Training speed: `mnist-deploy train` against two yardsticks, as whole processes, in one run.

- the origin's way (benchmarks/origin_train.py --way pil): a per-sample Dataset doing a PIL round
  trip, ToTensor, Normalize and flatten, through a DataLoader;
- the leaner yardstick (origin_train.py --way numpy): the same per-sample Dataset without PIL
  (numpy slice, / 255, normalise, flatten per sample).

All three: MLP, 5 epochs, batch 64, Adam, same data and machine; the preprocessed-tensor cache is
warmed first. The three run alternately --repeats times and the medians are compared.

    python benchmarks/bench_train.py --data-dir ../shared/data/mnist [--repeats 3]

Targets: whole `mnist-deploy train` process <= 0.4x the leaner yardstick's whole script (issue 11),
and <= 0.5x the origin's (issue 2); accuracy >= 98.0%.
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
    t0 = time.perf_counter_ns()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return (time.perf_counter_ns() - t0) / 1e9, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every contestant (default: torch's)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MNIST_DEPLOY_CACHE": str(Path(tmp) / "cache")}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        if args.data_dir:
            env["MNIST_DEPLOY_DATA"] = args.data_dir
        ours_cmd = [sys.executable, "-m", "mnist_deploy", "train", "--quiet", "--no-download",
                    "--epochs", str(args.epochs), "--out", str(Path(tmp) / "out")]

        def yardstick(way: str) -> list[str]:
            cmd = [sys.executable, str(HERE / "origin_train.py"), "--epochs", str(args.epochs), "--way", way]
            return cmd + (["--data-dir", args.data_dir] if args.data_dir else [])

        subprocess.run([sys.executable, "-m", "mnist_deploy", "data", "--no-download"], env=env, check=True,
                       capture_output=True)  # verify the files once
        _timed(ours_cmd, env)  # warms the preprocessed cache
        rows: dict[str, list[dict]] = {"origin": [], "lean": [], "ours": []}
        for _ in range(args.repeats):
            for key, way in (("origin", "pil"), ("lean", "numpy")):
                wall, out = _timed(yardstick(way), env)
                rec = json.loads(out.strip().splitlines()[-1])
                rows[key].append({"wall": wall, "loop": rec["train_loop_seconds"], "accuracy": rec["accuracy"]})
            wall, _ = _timed(ours_cmd, env)
            metrics = json.loads((Path(tmp) / "out" / "metrics.json").read_text())
            rows["ours"].append({"wall": wall, "loop": metrics["train_seconds"], "accuracy": metrics["accuracy"]})

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in rows[key])

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, threads {args.threads or 'default'}, "
          f"{args.repeats} alternating runs each, medians")
    print(f"{'':26}{'origin (PIL)':>13}{'lean (numpy)':>13}{'mnist-deploy':>13}{'/origin':>9}{'/lean':>7}")
    for label, field in (("training loop (s)", "loop"), ("whole process (s)", "wall")):
        o, lean, ours = med("origin", field), med("lean", field), med("ours", field)
        print(f"{label:<26}{o:>13.2f}{lean:>13.2f}{ours:>13.2f}{ours / o:>9.3f}{ours / lean:>7.3f}")
    o, lean, ours = (100 * med(k, "accuracy") for k in ("origin", "lean", "ours"))
    print(f"{'test accuracy (%)':<26}{o:>13.2f}{lean:>13.2f}{ours:>13.2f}")
    whole_lean = med("ours", "wall") / med("lean", "wall")
    whole_origin = med("ours", "wall") / med("origin", "wall")
    print(f"targets: whole process <= 0.4x lean: {whole_lean:.3f} {'ok' if whole_lean <= 0.4 else 'MISSED'}; "
          f"<= 0.5x origin: {whole_origin:.3f} {'ok' if whole_origin <= 0.5 else 'MISSED'}; accuracy >= 98.0%: "
          f"{'ok' if ours >= 98.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
