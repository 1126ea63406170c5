"""SIGTERM under gRPC load: what each call got while the server drained, and how long the stop took.

    python benchmarks/grpc_drain.py --artifacts artifacts [--workers 1] [--clients 16] [--seconds 2]
        [--keep-sending | --rate R | --retry]

Starts the real `mnist-deploy serve --grpc-port P`, runs ``--clients`` threads, each with a connection of
its own, sending one-image `ModelInfer` calls back to back; after ``--seconds`` sends SIGTERM to the server
and counts each call's status until every client has been refused (UNAVAILABLE). The clients do not look
at readiness, so they keep sending through the whole drain: the worst case for the calls in transit when
the server stops. An UNAVAILABLE is counted apart when the draining server answered it itself (``refused``:
the call was not run) and when the connection failed (``no connection``: the port is closed). With
``--keep-sending`` a client sends again at once after a ``refused`` and stops only at ``no connection``
(a client that retries UNAVAILABLE without a pause, on the same server). With ``--rate R`` each client
sends R calls a second without waiting for the answers (an open-loop load generator), until its connection
fails. With ``--retry`` two servers run, each client's channel spreads its calls over both (round_robin)
with a retry policy for UNAVAILABLE (what a client of several replicas would set), and SIGTERM goes to
the first only: the calls it refuses should be answered by the other. Prints the counts, the exit code
and the seconds from SIGTERM to the exit.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load_test  # noqa: E402  (benchmarks/load_test.py: serve_subprocess, free_port)


def sigterm_under_load(proc, client, clients: int, seconds: float, *,
                       stop: threading.Event | None = None) -> tuple[int, float]:
    """``clients`` threads running ``client``; SIGTERM to ``proc`` after ``seconds``; its exit code and how
    long it took to exit. With ``stop``, the clients go on 1 s after the exit and are then told to stop
    (else they stop by themselves, when the server has gone)."""
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    took = time.monotonic() - t0
    if stop is not None:
        time.sleep(1.0)
        stop.set()
    for t in threads:
        t.join()
    return code, took


def run(*, artifacts: str, workers: int, clients: int, seconds: float, keep_sending: bool = False,
        rate: float = 0.0) -> dict:
    import grpc
    import httpx

    from mnist_deploy.serve.grpc_v2 import DRAIN_REFUSAL
    from mnist_deploy.serve.protos import load_protos

    pb2, pb2_grpc = load_protos()
    port = load_test.free_port()
    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()
    args = ["--workers", str(workers), "--grpc-port", str(port), "--log-level", "warning", "--drain-timeout", "10"]
    with load_test.serve_subprocess(artifacts, args) as (url, proc):
        name = httpx.get(f"{url}/model").json()["model"]["name"] + "-pixels"
        req = pb2.ModelInferRequest(model_name=name, raw_input_contents=[bytes(784)])
        req.inputs.add(name="pixels", datatype="UINT8", shape=[1, 28, 28])

        def status(call) -> str:
            try:
                call.result()
                return "OK"
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    return exc.code().name
                return "UNAVAILABLE (refused)" if exc.details() == DRAIN_REFUSAL else "UNAVAILABLE (no connection)"

        def count(code: str) -> None:
            with lock:
                counts[code] += 1

        def client():
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            stub = pb2_grpc.GRPCInferenceServiceStub(channel)
            while True:
                code = status(stub.ModelInfer.future(req, timeout=10))
                count(code)
                if code == "UNAVAILABLE (no connection)" or (code == "UNAVAILABLE (refused)" and not keep_sending):
                    return

        def open_loop_client():  # --rate: a call every 1/rate s, without waiting for the answers
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
            stub = pb2_grpc.GRPCInferenceServiceStub(channel)
            failed, calls, t = threading.Event(), [], time.monotonic()

            def done(call):
                code = status(call)
                count(code)
                if code == "UNAVAILABLE (no connection)":
                    failed.set()

            while not failed.wait(max(0.0, t - time.monotonic())):
                calls.append(stub.ModelInfer.future(req, timeout=10))
                calls[-1].add_done_callback(done)
                t += 1 / rate
            for call in calls:
                call.exception()  # every answer counted before the counts are read

        code, took = sigterm_under_load(proc, open_loop_client if rate else client, clients, seconds)
    return {"counts": dict(counts), "exit_code": code, "seconds_to_exit": round(took, 2)}


def run_with_retry(*, artifacts: str, workers: int, clients: int, seconds: float) -> dict:
    """``--retry``: two servers, each client's channel spread over both (round_robin) with a retry policy for
    UNAVAILABLE, SIGTERM to the first only; the clients stop 1 s after it has exited."""
    import grpc
    import httpx

    from mnist_deploy.serve.protos import load_protos

    pb2, pb2_grpc = load_protos()
    ports = load_test.free_port(), load_test.free_port()
    config = {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [{
        "name": [{"service": "inference.GRPCInferenceService"}], "retryPolicy": {
            "maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"]}}]}
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.service_config", json.dumps(config))]
    counts: collections.Counter = collections.Counter()
    lock, done = threading.Lock(), threading.Event()
    args = ["--workers", str(workers), "--log-level", "warning", "--drain-timeout", "10", "--grpc-port"]
    with load_test.serve_subprocess(artifacts, [*args, str(ports[0])]) as (url, proc), \
            load_test.serve_subprocess(artifacts, [*args, str(ports[1])]):
        name = httpx.get(f"{url}/model").json()["model"]["name"] + "-pixels"
        req = pb2.ModelInferRequest(model_name=name, raw_input_contents=[bytes(784)])
        req.inputs.add(name="pixels", datatype="UINT8", shape=[1, 28, 28])

        def client():
            with grpc.insecure_channel(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}", options=options) as channel:
                stub = pb2_grpc.GRPCInferenceServiceStub(channel)
                while not done.is_set():
                    try:
                        stub.ModelInfer(req, timeout=10)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                    with lock:
                        counts[code] += 1

        code, took = sigterm_under_load(proc, client, clients, seconds, stop=done)
    return {"counts": dict(counts), "exit_code": code, "seconds_to_exit": round(took, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--keep-sending", action="store_true", help="send again at once after a refusal; stop when "
                   "the connection fails")
    p.add_argument("--rate", type=float, default=0.0, help="calls per second per client, sent without waiting "
                   "for the answers, until the connection fails (default 0: one call at a time)")
    p.add_argument("--retry", action="store_true", help="two servers, clients with a retry policy for "
                   "UNAVAILABLE spread over both; SIGTERM to one")
    a = p.parse_args()
    if a.retry:
        print(run_with_retry(artifacts=a.artifacts, workers=a.workers, clients=a.clients, seconds=a.seconds))
        return
    print(run(artifacts=a.artifacts, workers=a.workers, clients=a.clients, seconds=a.seconds,
              keep_sending=a.keep_sending, rate=a.rate))


if __name__ == "__main__":
    main()
