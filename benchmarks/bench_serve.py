"""Serving load benchmark: wrk against `mnist-deploy serve`, batching off/on x 1/N workers, one run.

    python benchmarks/bench_serve.py --artifacts artifacts [--connections 1 16 64 256] [--seconds 3]
                                     [--workers N] [--max-batch-size 64] [--max-queue-delay-us 0]
                                     [--wrk-threads 1] [--asyncio] [--json results.json]

For each server configuration -- 1 worker without batching (the baseline: today's server), 1 worker
with dynamic batching, N workers without, N workers with (N: the usable cores) -- starts the real
`mnist-deploy serve` on a free loopback port, checks one request end to end, then runs wrk
(keep-alive, benchmarks/wrk_predict.lua POSTing one real MNIST test digit as JSON to /predict) at
each connection count: a 1 s warm-up, then ``--seconds`` measured. Prints one Markdown table with
req/s, p50/p99 and errors (connect/read/write/timeout and non-2xx) per cell, and req/s as a ratio
to the baseline at the same connection count, measured in the same run.

A configuration whose options the server does not take (`serve --help` does not list them, or the
server exits at start) is reported as skipped, so the script runs against any version of the server.
Target (issue 10): at 64 connections, >= 2x the baseline's req/s with p99 <= 25 ms and zero errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load_test  # noqa: E402  (benchmarks/load_test.py: serve_subprocess, pixel_body)

LUA_SCRIPT = Path(__file__).resolve().parent / "wrk_predict.lua"
CONNECTIONS = (1, 16, 64, 256)
TARGET_CONNECTIONS = 64
TARGET_RATIO = 2.0
TARGET_P99_MS = 25.0
BASELINE = "1 worker, no batching"


@dataclass
class ServerConfig:
    label: str
    args: list[str]
    needs: tuple[str, ...] = ()  # serve options this configuration cannot run without
    skipped: str = ""


@dataclass
class Cell:
    config: str
    connections: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    non_2xx: int
    seconds: float
    ratio: float | None = None
    error_detail: dict = field(default_factory=dict)


def usable_cores() -> int:
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def serve_options(python: str = sys.executable) -> set[str]:
    """The long options `mnist-deploy serve --help` lists."""
    out = subprocess.run([python, "-m", "mnist_deploy", "serve", "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out))


def plan(*, workers: int, max_batch_size: int, max_queue_delay_us: int, options: set[str],
         asyncio_loop: bool = False) -> list[ServerConfig]:
    """The four configurations, with the options the server takes. Batching off is an explicit
    ``--max-batch-size 1`` where the option exists (a server may batch by default); one worker is an
    explicit ``--workers 1`` where it exists (a server may default to every core). ``asyncio_loop``
    adds the two batching configurations again on asyncio's own event loop (``--loop asyncio``)."""
    one = ["--workers", "1"] if "--workers" in options else []
    off = ["--max-batch-size", "1"] if "--max-batch-size" in options else []
    on = ["--max-batch-size", str(max_batch_size), "--max-queue-delay-us", str(max_queue_delay_us)]
    many = ["--workers", str(workers)]
    batching = ("--max-batch-size", "--max-queue-delay-us")
    configs = [
        ServerConfig(BASELINE, one + off),
        ServerConfig("1 worker, batching", one + on, batching),
        ServerConfig(f"{workers} workers, no batching", many + off, ("--workers",)),
        ServerConfig(f"{workers} workers, batching", many + on, ("--workers", *batching)),
    ]
    if asyncio_loop:
        aio = ["--loop", "asyncio"]
        configs += [ServerConfig("1 worker, batching, asyncio loop", one + on + aio, (*batching, "--loop")),
                    ServerConfig(f"{workers} workers, batching, asyncio loop", many + on + aio,
                                 ("--workers", *batching, "--loop"))]
    for c in configs:
        missing = [o for o in c.needs if o not in options]
        if missing:
            c.skipped = f"the server has no {', '.join(missing)}"
    return configs


def run_wrk(url: str, body_path: Path, *, connections: int, seconds: float, threads: int = 1,
            wrk: str = "wrk", timeout_s: float = 10.0, env: dict[str, str] | None = None) -> dict:
    """One wrk run; the figures wrk_predict.lua prints, plus the command. ``env``: more of the script's
    settings (MNIST_WRK_CONTENT_TYPE, MNIST_WRK_HEADER_LENGTH)."""
    threads = max(1, min(threads, connections))
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={timeout_s:g}s",
           "-s", str(LUA_SCRIPT), url]
    env = {**os.environ, **(env or {}), "MNIST_WRK_BODY": str(body_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + timeout_s + 60)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-500:]}")
    figures = json.loads(line[len("WRK_JSON "):])
    figures["command"] = " ".join(["wrk", *cmd[1:]]).replace(str(LUA_SCRIPT), "benchmarks/wrk_predict.lua")
    return figures


def _cell(config: str, connections: int, f: dict) -> Cell:
    seconds = f["duration_us"] / 1e6
    socket_errors = f["connect"] + f["read"] + f["write"] + f["timeout"]
    return Cell(config=config, connections=connections, requests_per_second=f["requests"] / seconds,
                p50_ms=f["p50_us"] / 1e3, p99_ms=f["p99_us"] / 1e3, max_ms=f["max_us"] / 1e3,
                requests=f["requests"], errors=socket_errors + f["status"], non_2xx=f["status"], seconds=seconds,
                error_detail={k: f[k] for k in ("connect", "read", "write", "timeout", "status") if f[k]})


def _check_one(url: str, body: bytes, label: int | None) -> None:
    req = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 (loopback URL we built)
        answer = json.loads(r.read())
    if label is not None and answer.get("digit") != label:
        raise RuntimeError(f"the server answered {answer.get('digit')} for a {label}: {answer}")


def bench(*, artifacts: str | os.PathLike, configs: list[ServerConfig], connections: tuple[int, ...] = CONNECTIONS,
          seconds: float = 3.0, warmup: float = 1.0, wrk_threads: int = 1, runtime: str = "onnx",
          data_dir: str | os.PathLike | None = None, log=print) -> dict:
    """Run every configuration at every connection count; return cells, skipped configs and the commands."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk not found; install it (Debian: apt-get install wrk, or scripts/system_deps.sh)")
    body = load_test.pixel_body(data_dir)
    label = None
    with contextlib.suppress(Exception):
        from mnist_deploy.data.mnist import load_raw

        label = int(load_raw(data_dir, allow_download=False).arrays["test-labels"][0])
    cells: list[Cell] = []
    commands: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        body_path = Path(tmp) / "body.json"
        body_path.write_bytes(body)
        for config in configs:
            if config.skipped:
                log(f"skip  {config.label}: {config.skipped}")
                continue
            args = ["--runtime", runtime, "--threads", "1", "--log-level", "warning", *config.args]
            commands[config.label] = "mnist-deploy serve " + " ".join(args)
            try:
                with load_test.serve_subprocess(artifacts, args, startup_timeout=120, stop_timeout=20) as (url, _p):
                    _check_one(url, body, label)
                    for c in connections:
                        if warmup > 0:
                            run_wrk(url + "/predict", body_path, connections=c, seconds=warmup, threads=wrk_threads,
                                    wrk=wrk)
                        f = run_wrk(url + "/predict", body_path, connections=c, seconds=seconds,
                                    threads=wrk_threads, wrk=wrk)
                        commands.setdefault("wrk", re.sub(r"-c\d+", "-cC", f["command"]).replace(url, "URL"))
                        cell = _cell(config.label, c, f)
                        cells.append(cell)
                        log(f"{config.label:<28} c={c:<4} {cell.requests_per_second:9,.0f} req/s  "
                            f"p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:7.2f} ms  errors {cell.errors}")
            except load_test.ServerError as exc:
                config.skipped = f"the server did not start ({exc.problem}): {_last_line(exc.log)}"
                log(f"skip  {config.label}: {config.skipped}")
    base = {c.connections: c.requests_per_second for c in cells if c.config == BASELINE}
    for c in cells:
        if base.get(c.connections):
            c.ratio = c.requests_per_second / base[c.connections]
    return {"cells": cells, "configs": configs, "commands": commands, "cpus": usable_cores(),
            "connections": list(connections), "seconds": seconds}


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "(no output)"


def markdown(result: dict) -> str:
    rows = ["| server | connections | req/s | p50 ms | p99 ms | errors | req/s vs baseline |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for c in result["cells"]:
        ratio = f"{c.ratio:.2f}x" if c.ratio is not None else "-"
        rows.append(f"| {c.config} | {c.connections} | {c.requests_per_second:,.0f} | {c.p50_ms:.2f} | "
                    f"{c.p99_ms:.2f} | {c.errors} | {ratio} |")
    return "\n".join(rows)


def verdicts(result: dict) -> list[str]:
    """One line per configuration at the target's connection count: meets or misses the target."""
    out = []
    for c in result["cells"]:
        if c.connections != TARGET_CONNECTIONS or c.config == BASELINE or c.ratio is None:
            continue
        ok = c.ratio >= TARGET_RATIO and c.p99_ms <= TARGET_P99_MS and c.errors == 0
        out.append(f"{'meets ' if ok else 'MISSES'} the target with {c.config}: {c.ratio:.2f}x the baseline's "
                   f"req/s (>= {TARGET_RATIO:g}x), p99 {c.p99_ms:.1f} ms (<= {TARGET_P99_MS:g}), {c.errors} errors")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts", help="artifacts folder with an ONNX export")
    ap.add_argument("--connections", type=int, nargs="+", default=list(CONNECTIONS))
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per cell (after a 1 s warm-up)")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=usable_cores(), help="N for the N-worker configurations")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-queue-delay-us", type=int, default=0)
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk -t (the load generator shares the CPUs)")
    ap.add_argument("--runtime", default="onnx")
    ap.add_argument("--asyncio", action="store_true",
                    help="also run the batching configurations on asyncio's event loop (serve --loop asyncio)")
    ap.add_argument("--only", nargs="+", default=None, help="run only these configuration labels (baseline first)")
    ap.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"))
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)

    configs = plan(workers=args.workers, max_batch_size=args.max_batch_size,
                   max_queue_delay_us=args.max_queue_delay_us, options=serve_options(), asyncio_loop=args.asyncio)
    if args.only:
        configs = [c for c in configs if c.label in args.only]
    t0 = time.perf_counter()
    result = bench(artifacts=args.artifacts, configs=configs, connections=tuple(args.connections),
                   seconds=args.seconds, warmup=args.warmup, wrk_threads=args.wrk_threads, runtime=args.runtime,
                   data_dir=args.data_dir, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"\n{result['cpus']} usable CPUs, load generator on the same machine; {args.seconds:g} s per cell after "
          f"a {args.warmup:g} s warm-up; {time.perf_counter() - t0:.0f} s in all")
    for label, cmd in result["commands"].items():
        print(f"- {label}: `{cmd}`")
    print()
    print(markdown(result))
    skipped = [f"skipped: {c.label} ({c.skipped})" for c in result["configs"] if c.skipped]
    if skipped:
        print()
        print("\n".join(skipped))
    lines = verdicts(result)
    if lines:
        print()
        print("\n".join(lines))
    if args.json:
        payload = {**result, "cells": [asdict(c) for c in result["cells"]],
                   "configs": [asdict(c) for c in result["configs"]]}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0 if all(c.errors == 0 for c in result["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
