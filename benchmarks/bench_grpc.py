"""gRPC infer against v2 JSON infer on the same server, one run: latency of one caller, and throughput of many.

    python benchmarks/bench_grpc.py --artifacts artifacts [--requests 2000] [--concurrency 16] [--batches 1 64]

Starts the real `mnist-deploy serve --workers 1 --grpc-port P` (batching on, as by default) on loopback,
checks that both transports give the same logits for a real MNIST digit, then for each batch size:
``--requests`` calls one after another from one caller (p50/p99 latency), and ``--requests`` calls from
``--concurrency`` threads at once, each with its own connection (req/s, rows/s, p50/p99, errors), each
after a warm-up. The baseline is v2 JSON (`POST /v2/models/<name>-pixels/infer`, httpx, keep-alive, the body
encoded once); gRPC is `ModelInfer` with `raw_input_contents` (grpcio's stub generated from our .proto). Prints one Markdown
table with each gRPC figure as a ratio to the baseline measured in the same run. Both clients are Python
in one process beside the server, on the same cores: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load_test  # noqa: E402  (benchmarks/load_test.py: serve_subprocess, free_port)

JSON = {"content-type": "application/json"}


def _digits(data_dir: str | None, n: int) -> np.ndarray:
    from mnist_deploy.data.mnist import load_raw

    images = load_raw(data_dir, allow_download=False).arrays["test-images"]
    return np.resize(images, (n, 28, 28)).astype(np.uint8)


def _pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.array(samples) * 1000, q))


class _Clients:
    """One HTTP (v2 JSON) and one gRPC caller for the same model, each with its own connection."""

    def __init__(self, url: str, grpc_port: int, model: str) -> None:
        import grpc
        import httpx

        from mnist_deploy.serve.protos import load_protos

        self.pb2, self.pb2_grpc = load_protos()
        self.url, self.port, self.model = url, grpc_port, model
        self.http = httpx.Client(timeout=30)
        # a connection of its own (channels to one target otherwise share one), as each HTTP client has
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = self.pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def json_body(self, images: np.ndarray) -> bytes:
        """Encoded once: the JSON client's own encoding is not what is measured."""
        return json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(images.shape),
                                       "data": images.ravel().tolist()}]}).encode()

    def grpc_request(self, images: np.ndarray):
        req = self.pb2.ModelInferRequest(model_name=self.model, raw_input_contents=[images.tobytes()])
        req.inputs.add(name="pixels", datatype="UINT8", shape=list(images.shape))
        return req

    def http_logits(self, body: bytes) -> np.ndarray:
        r = self.http.post(f"{self.url}/v2/models/{self.model}/infer", content=body, headers=JSON)
        r.raise_for_status()
        out = r.json()["outputs"][0]
        return np.array(out["data"], np.float32).reshape(out["shape"])

    def grpc_logits(self, req) -> np.ndarray:
        reply = self.stub.ModelInfer(req, timeout=30)
        return np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(list(reply.outputs[0].shape))


def _sequential(call, n: int) -> list[float]:
    for _ in range(min(100, n)):
        call()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def _concurrent(make_call, n: int, concurrency: int) -> tuple[float, list[float], int]:
    """``n`` calls from ``concurrency`` threads, each with a client of its own: (seconds, latencies, errors)."""
    calls = [make_call() for _ in range(concurrency)]
    for call in calls:  # warm-up: every connection made
        call()
    todo = iter(range(n))
    lock = threading.Lock()
    times, errors = [], []

    def caller(call):
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            t0 = time.perf_counter()
            try:
                call()
                times.append(time.perf_counter() - t0)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=caller, args=(c,)) for c in calls]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, times, len(errors)


def _measure(c: _Clients, images: np.ndarray, requests: int, concurrency: int) -> list[dict]:
    """Both transports at one batch size: one caller, then ``concurrency`` callers."""
    body, req = c.json_body(images), c.grpc_request(images)
    np.testing.assert_allclose(c.grpc_logits(req), c.http_logits(body), atol=1e-5)  # the same answers

    def http_call():
        mine = _Clients(c.url, c.port, c.model)
        return lambda: mine.http_logits(body)

    def grpc_call():
        mine = _Clients(c.url, c.port, c.model)
        return lambda: mine.grpc_logits(req)

    rows = []
    for label, seq, conc in (("v2 JSON", lambda: c.http_logits(body), http_call),
                             ("gRPC raw", lambda: c.grpc_logits(req), grpc_call)):
        lat = _sequential(seq, requests)
        seconds, times, errors = _concurrent(conc, requests, concurrency)
        n = len(images)
        rows.append({"transport": label, "batch": n, "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
                     "req_s": len(times) / seconds, "rows_s": len(times) * n / seconds,
                     "conc_p50_ms": _pct(times, 50), "conc_p99_ms": _pct(times, 99), "errors": errors})
    return rows


def run(*, artifacts: str, data_dir: str | None, requests: int, concurrency: int, batches: list[int]) -> list[dict]:
    import httpx

    port = load_test.free_port()
    args = ["--workers", "1", "--grpc-port", str(port), "--log-level", "warning"]
    rows = []
    with load_test.serve_subprocess(artifacts, args) as (url, _proc):
        name = httpx.get(f"{url}/model").json()["model"]["name"] + "-pixels"
        clients = _Clients(url, port, name)
        for batch in batches:
            rows += _measure(clients, _digits(data_dir, batch), requests, concurrency)
    return rows


def table(rows: list[dict], concurrency: int) -> str:
    base = {r["batch"]: r for r in rows if r["transport"] == "v2 JSON"}
    out = [f"| transport | batch | 1 caller p50 ms | p99 ms | {concurrency} callers req/s | rows/s | p50 ms | "
           "p99 ms | errors | req/s vs v2 JSON |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["req_s"] / base[r["batch"]]["req_s"]
        out.append(f"| {r['transport']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['req_s']:,.0f} | "
                   f"{r['rows_s']:,.0f} | {r['conc_p50_ms']:.2f} | {r['conc_p99_ms']:.2f} | {r['errors']} | "
                   f"{ratio:.2f}x |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: $MNIST_DEPLOY_DATA)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    a = p.parse_args()
    rows = run(artifacts=a.artifacts, data_dir=a.data_dir, requests=a.requests, concurrency=a.concurrency,
               batches=a.batches)
    print(table(rows, a.concurrency))


if __name__ == "__main__":
    main()
