"""v2 (Open Inference Protocol) against our own JSON routes: wrk at the same connection count, one server, one run.

    python benchmarks/bench_v2.py --artifacts artifacts [--connections 64] [--seconds 3] [--rounds 3]
                                  [--server-args "--workers 1 --max-batch-size 1"] [--json results.json]

Starts the real `mnist-deploy serve` once (by default the baseline of benchmarks/bench_serve.py: 1
worker, no batching, ONNX Runtime with 1 thread), checks every request body once end to end, then
runs wrk (keep-alive, benchmarks/wrk_predict.lua: one fixed body per case, the same MNIST test digits)
against each case in turn, ``--rounds`` times round-robin so that a burst of load elsewhere on the
machine hits every case alike; each cell is the median of its rounds. The cases:

* ``/predict`` JSON (one digit, ``{"pixels": [784 ints]}``), the baseline, and ``/predict/batch`` JSON (64);
* v2 JSON: ``pixels`` UINT8 to ``<name>-pixels``, 1 and 64 digits (the 1-digit body is about as large as
  ``/predict``'s: the same 784 integers);
* v2 binary (the binary tensor data extension, tritonclient's default): the same pixels as raw bytes
  after the JSON header, and the logits back as binary (``binary_data_output``), 1 and 64 digits.

Prints req/s, rows/s, p50/p99 and errors per case, and the ratios: v2 JSON / ``/predict`` req/s (issue
21's target: >= 0.85), v2 binary / ``/predict`` req/s, and v2 binary / v2 JSON rows/s at 64 rows (>= 3).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve  # noqa: E402  (run_wrk)
import load_test  # noqa: E402  (serve_subprocess)

PREDICT = "/predict JSON"


@dataclass
class Case:
    label: str
    path: str
    body: bytes
    rows: int
    content_type: str = "application/json"
    header_length: int | None = None  # Inference-Header-Content-Length: a binary tensor request


@dataclass
class Cell:
    label: str
    rows: int
    body_bytes: int
    requests_per_second: float
    rows_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    rounds: list[float]


def digits(data_dir: str | os.PathLike | None, n: int = 64) -> np.ndarray:
    """``n`` MNIST test digits as uint8 (n, 784); drawn strokes if MNIST is not available."""
    try:
        from mnist_deploy.data.mnist import load_raw

        return load_raw(data_dir, allow_download=False).arrays["test-images"][:n].reshape(n, 784).astype(np.uint8)
    except Exception:  # noqa: BLE001 - no MNIST files here: any plausible digits will do for load
        return np.array([[255 if (12 + k % 3) <= i % 28 <= 15 else 0 for i in range(784)] for k in range(n)], np.uint8)


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def cases(model: str, images: np.ndarray, v2_model: str | None = None) -> list[Case]:
    """The request bodies; v2 requests go to ``v2_model`` (default ``<model>-pixels``)."""
    v2 = f"/v2/models/{v2_model or model + '-pixels'}/infer"
    out = [Case(PREDICT, "/predict", _dumps({"pixels": images[0].tolist()}), 1),
           Case("/predict/batch JSON", "/predict/batch", _dumps({"pixels": images.tolist()}), len(images))]
    for rows in (1, len(images)):
        x = images[:rows]
        tensor = {"name": "pixels", "datatype": "UINT8", "shape": [rows, 784]}
        out.append(Case("v2 JSON", v2, _dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}), rows))
        head = _dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}})
        out.append(Case("v2 binary", v2, head + x.tobytes(), rows, "application/octet-stream", len(head)))
    return out


def check(url: str, case: Case, label: int) -> None:
    """One request of ``case``: 200, and the first digit read as ``label`` (a bad body is not a benchmark)."""
    headers = {"Content-Type": case.content_type}
    if case.header_length is not None:
        headers["Inference-Header-Content-Length"] = str(case.header_length)
    req = urllib.request.Request(url + case.path, data=case.body, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 (loopback URL we built)
        body, length = r.read(), r.headers.get("Inference-Header-Content-Length")
    if case.path.startswith("/predict"):
        answer = json.loads(body)
        digit = (answer["predictions"][0] if "predictions" in answer else answer)["digit"]
    elif length is not None:
        digit = int(np.frombuffer(body[int(length):int(length) + 40], "<f4").argmax())
    else:
        digit = int(np.argmax(json.loads(body)["outputs"][0]["data"][:10]))
    if digit != label:
        raise RuntimeError(f"{case.label} ({case.rows} rows): the server answered {digit} for a {label}")


def bench(*, artifacts: str | os.PathLike, server_args: list[str], connections: int = 64, seconds: float = 3.0,
          warmup: float = 1.0, rounds: int = 3, data_dir=None, log=print) -> dict:
    """Every case ``rounds`` times round-robin against one server; medians per case, and the ratios."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk not found; install it (Debian: apt-get install wrk, or scripts/system_deps.sh)")
    manifest = json.loads((Path(artifacts) / "manifest.json").read_text())
    images = digits(data_dir)
    from mnist_deploy.data.mnist import load_raw

    label = int(load_raw(data_dir, allow_download=False).arrays["test-labels"][0])
    todo = cases(manifest["model"]["name"], images)
    figures: dict[int, list[dict]] = {i: [] for i in range(len(todo))}
    with tempfile.TemporaryDirectory() as tmp, \
            load_test.serve_subprocess(artifacts, server_args, startup_timeout=120, stop_timeout=20) as (url, _p):
        paths = []
        for i, case in enumerate(todo):
            check(url, case, label)
            paths.append(Path(tmp) / f"body{i}")
            paths[-1].write_bytes(case.body)
        for r in range(rounds):
            for i, case in enumerate(todo):
                env = {"MNIST_WRK_CONTENT_TYPE": case.content_type,
                       "MNIST_WRK_HEADER_LENGTH": "" if case.header_length is None else str(case.header_length)}
                kw = {"connections": connections, "threads": 1, "wrk": wrk, "env": env}
                if warmup > 0:
                    bench_serve.run_wrk(url + case.path, paths[i], seconds=warmup, **kw)
                f = bench_serve.run_wrk(url + case.path, paths[i], seconds=seconds, **kw)
                figures[i].append(f)
                rps = f["requests"] / (f["duration_us"] / 1e6)
                log(f"round {r + 1}  {case.label:<20} {case.rows:>3} rows  {rps:9,.0f} req/s  "
                    f"p50 {f['p50_us'] / 1e3:6.2f} ms  p99 {f['p99_us'] / 1e3:7.2f} ms")
    cells = [_cell(case, figures[i]) for i, case in enumerate(todo)]
    command = re.sub(r"http://\S+", "URL", figures[0][0]["command"])
    return {"cells": cells, "ratios": ratios(cells), "server": "mnist-deploy serve " + shlex.join(server_args),
            "wrk": command, "connections": connections, "seconds": seconds, "rounds": rounds}


def _cell(case: Case, runs: list[dict]) -> Cell:
    rps = [f["requests"] / (f["duration_us"] / 1e6) for f in runs]
    errors = sum(f["connect"] + f["read"] + f["write"] + f["timeout"] + f["status"] for f in runs)
    med = statistics.median(rps)
    return Cell(case.label, case.rows, len(case.body), med, med * case.rows,
                statistics.median(f["p50_us"] for f in runs) / 1e3, statistics.median(f["p99_us"] for f in runs) / 1e3,
                errors, [round(x, 1) for x in rps])


def ratios(cells: list[Cell]) -> dict[str, float]:
    by = {(c.label, c.rows): c for c in cells}
    base = by[(PREDICT, 1)].requests_per_second
    big = max(c.rows for c in cells)
    return {
        "v2 JSON / /predict req/s (1 row)": by[("v2 JSON", 1)].requests_per_second / base,
        "v2 binary / /predict req/s (1 row)": by[("v2 binary", 1)].requests_per_second / base,
        f"v2 binary / v2 JSON rows/s ({big} rows)": by[("v2 binary", big)].rows_per_second
        / by[("v2 JSON", big)].rows_per_second,
        f"v2 JSON / /predict/batch rows/s ({big} rows)": by[("v2 JSON", big)].rows_per_second
        / by[("/predict/batch JSON", big)].rows_per_second,
    }


def markdown(result: dict) -> str:
    rows = ["| request | rows | body bytes | req/s | rows/s | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["cells"]:
        rows.append(f"| {c.label} | {c.rows} | {c.body_bytes:,} | {c.requests_per_second:,.0f} | "
                    f"{c.rows_per_second:,.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | {c.errors} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts", help="artifacts folder with an ONNX export")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell (after a 1 s warm-up)")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds; each cell is their median")
    ap.add_argument("--server-args", default="--runtime onnx --threads 1 --workers 1 --max-batch-size 1",
                    help="serve options (one string)")
    ap.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    server_args = [*shlex.split(args.server_args), "--log-level", "warning"]
    result = bench(artifacts=args.artifacts, server_args=server_args, connections=args.connections,
                   seconds=args.seconds, warmup=args.warmup, rounds=args.rounds, data_dir=args.data_dir,
                   log=lambda s: print(s, file=sys.stderr, flush=True))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\n{bench_serve.usable_cores()} usable CPUs, wrk on the same machine; {args.connections} connections, "
          f"{args.seconds:g} s per cell after a {args.warmup:g} s warm-up, median of {args.rounds} rounds; "
          f"{time.perf_counter() - t0:.0f} s in all\nuptime after: {load}")
    print(f"- server: `{result['server']}`\n- load: `{result['wrk']}`\n")
    print(markdown(result))
    print()
    for name, value in result["ratios"].items():
        print(f"- {name}: {value:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({**result, "cells": [asdict(c) for c in result["cells"]]}, indent=2))
    return 0 if all(c.errors == 0 for c in result["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
