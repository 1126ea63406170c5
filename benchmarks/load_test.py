"""Load test: Apache Bench (`ab`) against `mnist-deploy serve` on loopback, JSON pixel requests.

    python benchmarks/load_test.py --artifacts artifacts [--requests 5000] [--concurrency 16]
                                   [--runtime onnx] [--keepalive] [--url http://127.0.0.1:8000] [--json]

Starts `mnist-deploy serve` on a free 127.0.0.1 port (unless --url names a running server), waits
for /health, then runs

    ab -n 5000 -c 16 -l -r -s 10 -p body.json -T application/json -e percentiles.csv URL/predict

where body.json is one real MNIST test digit as {"pixels": [784 values]} (a drawn stroke when the
MNIST files are not found). Prints requests per second, p50/p90/p99/max latency (ab's per-request
times, from its CSV), failed and non-2xx counts, and cross-checks the server's own request count in
/metrics. Target (issue 5): p99 <= 20 ms at 16 concurrent clients, 5,000 requests, zero errors.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

TARGET_P99_MS = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback URL we built)
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class ServerError(RuntimeError):
    """`mnist-deploy serve` exited, or was not healthy in time; ``problem`` says which, ``log`` holds its output."""

    def __init__(self, message: str, *, problem: str, log: str):
        super().__init__(message)
        self.problem, self.log = problem, log


@contextlib.contextmanager
def serve_subprocess(artifacts: str | os.PathLike, args: Sequence[str] = (), *, port: int | None = None,
                     log_path: str | os.PathLike | None = None, startup_timeout: float = 90.0,
                     stop_timeout: float = 10.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `mnist-deploy serve --artifacts ARTIFACTS --port PORT ARGS...` on loopback (a free port unless
    ``port`` is given); yield (base URL, process) once /health is 200, and terminate it on exit.

    Its output goes to ``log_path``, kept for a reader (the tests show it on failure), or else to a
    temporary file. Raises :class:`ServerError` with that output if it exits or is not healthy in time.
    tests/_serving.py builds the tests' ``serve_process`` on this.
    """
    port = port or free_port()
    if "--grpc-port" not in args:  # no gRPC unless asked: two servers at once would both want 8001
        args = [*args, "--grpc-port", "0"]
    cmd = [sys.executable, "-m", "mnist_deploy", "serve", "--artifacts", str(artifacts), "--port", str(port),
           *args]
    log = open(log_path, "w+b") if log_path is not None else tempfile.TemporaryFile()  # closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def output() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")

    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                text = output()
                raise ServerError(f"server exited with {proc.returncode}: {text}",
                                  problem=f"exited with {proc.returncode}", log=text)
            with contextlib.suppress(OSError):
                if _get(url + "/health")[0] == 200:
                    break
            if time.monotonic() > deadline:
                problem = f"not healthy after {startup_timeout:.0f} s"
                raise ServerError(f"server {problem}", problem=problem, log=output())
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def serve_process(artifacts: str | os.PathLike, *, runtime: str = "onnx", threads: int = 1,
                  startup_timeout: float = 90.0, extra: list[str] | None = None) -> Iterator[str]:
    """Run `mnist-deploy serve` on a free loopback port; yield its base URL once /health is 200."""
    args = ["--runtime", runtime, "--threads", str(threads), "--log-level", "warning", *(extra or [])]
    with serve_subprocess(artifacts, args, startup_timeout=startup_timeout) as (url, _proc):
        yield url


def pixel_body(data_dir: str | os.PathLike | None = None, index: int = 0) -> bytes:
    """One MNIST test digit as the JSON body; a drawn vertical stroke (a 1) if MNIST is not available."""
    try:
        from mnist_deploy.data.mnist import load_raw

        pixels = load_raw(data_dir, allow_download=False).arrays["test-images"][index].ravel().tolist()
    except Exception:  # noqa: BLE001 - no MNIST files here: any plausible digit will do for load
        pixels = [255 if 12 <= i % 28 <= 15 and 4 <= i // 28 <= 23 else 0 for i in range(784)]
    return json.dumps({"pixels": pixels}, separators=(",", ":")).encode()


def _ab_number(text: str, label: str) -> float | None:
    m = re.search(rf"^{re.escape(label)}:\s+([0-9.]+)", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def run_ab(url: str, body: bytes, *, requests: int = 5000, concurrency: int = 16, keepalive: bool = False,
           timeout_s: float = 300.0, ab: str = "ab") -> dict:
    """Run ab once against ``url`` (the /predict endpoint) and return its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        body_path = Path(tmp) / "body.json"
        body_path.write_bytes(body)
        csv_path = Path(tmp) / "percentiles.csv"
        cmd = [ab, "-q", "-n", str(requests), "-c", str(concurrency), "-l", "-r", "-s", "10",
               "-p", str(body_path), "-T", "application/json", "-e", str(csv_path)]
        if keepalive:
            cmd.append("-k")
        cmd.append(url)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"ab failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
        out = proc.stdout
        percentiles = {}
        with open(csv_path, newline="") as fh:
            for row in csv.reader(fh):
                if row and row[0].isdigit():
                    percentiles[int(row[0])] = float(row[1])
    return {
        "command": " ".join(["ab", *cmd[1:]]).replace(str(body_path), "body.json").replace(str(csv_path), "percentiles.csv"),
        "requests": requests, "concurrency": concurrency, "keepalive": keepalive,
        "complete": int(_ab_number(out, "Complete requests") or 0),
        "failed": int(_ab_number(out, "Failed requests") or 0),
        "non_2xx": int(_ab_number(out, "Non-2xx responses") or 0),
        "seconds": _ab_number(out, "Time taken for tests"),
        "requests_per_second": _ab_number(out, "Requests per second"),
        "p50_ms": percentiles.get(50), "p90_ms": percentiles.get(90), "p99_ms": percentiles.get(99),
        "max_ms": percentiles.get(100),
    }


def server_count(url: str, status: str = "200") -> int:
    """POST /predict answers with ``status`` as counted by the server itself (/metrics)."""
    _, text = _get(url + "/metrics")
    m = re.search(rf'^mnist_deploy_http_requests_total{{method="POST",route="/predict",status="{status}"}} (\d+)',
                  text.decode(), re.MULTILINE)
    return int(m.group(1)) if m else 0


def load_test(*, artifacts: str | os.PathLike = "artifacts", url: str | None = None, runtime: str = "onnx",
              requests: int = 5000, concurrency: int = 16, keepalive: bool = False, threads: int = 1,
              data_dir: str | os.PathLike | None = None, warmup: int = 200) -> dict:
    """Serve (or use ``url``), warm up, run ab, and return the figures plus the server's own count."""
    ab = shutil.which("ab")
    if ab is None:
        raise RuntimeError("ab (Apache Bench) not found; install apache2-utils")
    body = pixel_body(data_dir)
    with contextlib.ExitStack() as stack:
        if url is None:
            url = stack.enter_context(serve_process(artifacts, runtime=runtime, threads=threads))
        if warmup:
            run_ab(url + "/predict", body, requests=warmup, concurrency=min(concurrency, warmup), ab=ab)
        before = server_count(url)
        result = run_ab(url + "/predict", body, requests=requests, concurrency=concurrency, keepalive=keepalive,
                        ab=ab)
        result["server_200"] = server_count(url) - before
        _, model = _get(url + "/model")
    info = json.loads(model)
    result.update(runtime=info.get("runtime"), engine=info.get("engine"), model=(info.get("model") or {}).get("name"),
                  cpus=os.cpu_count(), target_p99_ms=TARGET_P99_MS,
                  meets_target=bool(result["p99_ms"] is not None and result["p99_ms"] <= TARGET_P99_MS
                                    and result["failed"] == 0 and result["non_2xx"] == 0))
    return result


def _print(r: dict) -> None:
    print(f"{r['command']}")
    print(f"model {r['model']} runtime {r['runtime']} ({r['engine']}), {r['cpus']} CPUs, "
          f"keep-alive {'on' if r['keepalive'] else 'off'}")
    print(f"  {r['complete']} requests in {r['seconds']:.2f} s: {r['requests_per_second']:.0f} req/s")
    print(f"  latency p50 {r['p50_ms']:.2f} ms  p90 {r['p90_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
          f"max {r['max_ms']:.2f} ms")
    print(f"  failed {r['failed']}  non-2xx {r['non_2xx']}  server-counted 200s {r['server_200']}")
    verdict = "meets" if r["meets_target"] else "MISSES"
    print(f"  {verdict} the target: p99 <= {r['target_p99_ms']:.0f} ms with zero errors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts", help="artifacts folder with an exported model")
    ap.add_argument("--url", default=None, help="a running server's base URL (default: start one)")
    ap.add_argument("--runtime", default="onnx")
    ap.add_argument("--requests", "-n", type=int, default=5000)
    ap.add_argument("--concurrency", "-c", type=int, default=16)
    ap.add_argument("--keepalive", "-k", action="store_true", help="ab -k (HTTP/1.0 keep-alive)")
    ap.add_argument("--both", action="store_true", help="run without and with keep-alive")
    ap.add_argument("--threads", type=int, default=1, help="serve --threads")
    ap.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"))
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    modes = (False, True) if args.both else (args.keepalive,)
    results = [load_test(artifacts=args.artifacts, url=args.url, runtime=args.runtime, requests=args.requests,
                         concurrency=args.concurrency, keepalive=k, threads=args.threads, data_dir=args.data_dir)
               for k in modes]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            _print(r)
    sys.exit(0 if all(r["failed"] == 0 and r["non_2xx"] == 0 for r in results) else 1)


if __name__ == "__main__":
    main()
