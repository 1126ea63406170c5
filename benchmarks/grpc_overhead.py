"""Where one worker's gRPC time goes: grpcio's asyncio server with an empty handler, then our server.

    python benchmarks/grpc_overhead.py --artifacts artifacts [--duration 5] [--warmup 1]
                                       [--acceptors 1,4] [--windows 0,1000] [--connections 64]

Drives each server with h2load (the same ``ModelInfer`` message as benchmarks/compare_protocols.py: one
real MNIST digit, ``pixels`` UINT8 as ``raw_input_contents``), ``--connections`` clients, one call in
flight each, and reads the server's CPU time from ``/proc/PID/task/*/stat`` before and after, so each row
says how much CPU one call cost the process and its event-loop thread (the main thread), not only how
many calls a second came back:

    empty grpc.aio     grpcio's asyncio server on uvloop with a ModelInfer handler that returns a fixed
                       reply: the ceiling of the protocol stack itself, nothing of ours in it; one row
                       per ``--acceptors`` count K (K such servers on the port in one process, each
                       with its own loop of accepted calls: grpcio takes a server's calls one at a time)
    + interceptor      the same, one server, with a pass-through ``grpc.aio.ServerInterceptor``: what
                       an interceptor costs every call
    mnist-deploy serve the real server, --workers 1 --threads 1, one row per ``--acceptors`` count K
                       (--grpc-acceptors K) and ``--windows`` value W (--max-queue-delay-us W, the
                       dynamic batcher's window)

Per row: calls/s, p50/p99 ms
(h2load's --log-file), errors, CPU microseconds per call for the main thread and the whole process,
and for ours the rows per model call (its /metrics batch histogram, read before and after). Prints one
Markdown table with the CPU model and the load average before and after: the figures are only as quiet
as the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_mlserver  # noqa: E402  (digits)
import compare_protocols as cp  # noqa: E402  (the ModelInfer message, h2load)
import load_test  # noqa: E402  (free_port, serve_subprocess)

TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    server: str
    acceptors: int
    window_us: int | None
    calls_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    main_us: float | None = None  # CPU per call, the event loop's thread
    process_us: float | None = None  # CPU per call, every thread of the process
    rows_per_call: float | None = None  # rows per model call (ours)
    note: str = ""


# -- the empty server (run as a subprocess of this script) --------------------------------------------


def empty_server(port: int, acceptors: int, interceptor: bool = False) -> None:
    """grpcio's asyncio server on uvloop, ``acceptors`` of them on ``port``, answering a fixed reply
    (through a pass-through interceptor if ``interceptor``)."""

    import grpc
    import uvloop

    from mnist_deploy.serve.protos import load_protos

    pb2, _ = load_protos()
    reply = pb2.ModelInferResponse(model_name="mlp", model_version="1")
    reply.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
    reply.raw_output_contents.append(bytes(40))

    async def infer(request, context):
        return reply

    handler = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            infer, request_deserializer=pb2.ModelInferRequest.FromString,
            response_serializer=pb2.ModelInferResponse.SerializeToString)})

    class PassThrough(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, handler_call_details):
            return await continuation(handler_call_details)

    async def main() -> None:
        servers = []
        for _ in range(acceptors):
            server = grpc.aio.server(options=[("grpc.so_reuseport", 1)],
                                     interceptors=[PassThrough()] if interceptor else None)
            server.add_generic_rpc_handlers((handler,))
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            servers.append(server)
        print("ready", flush=True)
        await servers[0].wait_for_termination()

    uvloop.run(main())


@contextlib.contextmanager
def empty_process(acceptors: int, interceptor: bool = False) -> Iterator[tuple[int, subprocess.Popen]]:
    port = load_test.free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--empty-server", str(port), "--acceptors", str(acceptors),
                             *(["--interceptor"] if interceptor else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the empty server did not start: {line}{proc.stdout.read()[-400:]}")
        yield port, proc
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def our_process(artifacts: Path, acceptors: int, window: int, work: Path) -> Iterator[tuple[int, str, subprocess.Popen]]:
    port = load_test.free_port()
    args = ["--workers", "1", "--threads", "1", "--log-level", "warning", "--grpc-port", str(port),
            "--grpc-acceptors", str(acceptors), "--max-queue-delay-us", str(window)]
    with load_test.serve_subprocess(artifacts, args, log_path=work / "serve.log", startup_timeout=120) as (url, proc):
        yield port, url, proc


# -- measuring ------------------------------------------------------------------------------------------


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(main thread, whole process) user+system clock ticks of ``pid``."""
    total = main = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
            total += ticks
            if task.name == str(pid):
                main = ticks
    return main, total


def batch_counts(url: str) -> tuple[float, float]:
    """(model calls, rows) from our /metrics batch histogram."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    return get("mnist_deploy_batch_size_count"), get("mnist_deploy_batch_size_sum")


def drive(row: Row, pid: int, port: int, body: Path, work: Path, args, url: str | None = None) -> Row:
    t = cp.Target("gRPC", 1, f"http://127.0.0.1:{port}{cp.GRPC_METHOD}", b"",
                  {"content-type": "application/grpc", "te": "trailers"}, grpc=True)
    log = work / f"h2load-{len(row.server)}-{row.acceptors}-{row.window_us}.log"
    cmd = cp.h2load_command(t, body, log, connections=args.connections, duration=args.duration, warmup=0)
    # warm-up as a separate run, so that the CPU counters cover the measured run only
    warm = cp.h2load_command(t, body, work / "warm.log", connections=args.connections, duration=args.warmup,
                             warmup=0)
    subprocess.run(warm, capture_output=True, timeout=args.warmup + 60)
    before = cpu_ticks(pid), (batch_counts(url) if url else None)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60)
    after = cpu_ticks(pid), (batch_counts(url) if url else None)
    counts = cp.parse_h2load(r.stdout)
    if r.returncode != 0 or counts.get("req_s") is None:
        row.note = f"h2load failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-160:]}"
        return row
    row.errors, row.calls_s = cp.errors_and_rate(counts)
    done = max(1, counts.get("done", 0) - row.errors)
    per_call = lambda ticks: ticks / TICK / done * 1e6  # noqa: E731
    row.main_us = per_call(after[0][0] - before[0][0])
    row.process_us = per_call(after[0][1] - before[0][1])
    if url:
        calls, rows = (a - b for a, b in zip(after[1], before[1], strict=True))
        row.rows_per_call = rows / calls if calls else None
    ms = cp.latencies_ms(log)
    if len(ms):
        row.p50_ms, row.p99_ms = (float(v) for v in np.percentile(ms, [50, 99]))
    return row


def run(args) -> list[Row]:
    artifacts = Path(args.artifacts)
    pixels, _ = compare_mlserver.digits(Path(args.data_dir) if args.data_dir else None, artifacts)
    from mnist_deploy.artifacts.manifest import load_manifest
    from mnist_deploy.serve.v2_core import PIXELS_SUFFIX

    name = str(load_manifest(artifacts)["model"]["name"]) + PIXELS_SUFFIX  # the model that takes pixels
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        body = work / "infer.body"
        body.write_bytes(cp.grpc_frame(cp.grpc_infer_message(name, pixels[:1])))
        for k in args.acceptors:
            with empty_process(k) as (port, proc):
                rows.append(drive(Row("empty grpc.aio", k, None), proc.pid, port, body, work, args))
        with empty_process(1, interceptor=True) as (port, proc):
            rows.append(drive(Row("empty grpc.aio + interceptor", 1, None), proc.pid, port, body, work, args))
        for k in args.acceptors:
            for w in args.windows:
                with our_process(artifacts, k, w, work) as (port, url, proc):
                    rows.append(drive(Row("mnist-deploy serve", k, w), proc.pid, port, body, work, args, url))
    return rows


def table(rows: list[Row]) -> str:
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    out = ["| server | acceptors | window us | calls/s | p50 ms | p99 ms | errors | main thread CPU us/call | "
           "process CPU us/call | rows per model call | note |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r.server} | {r.acceptors} | {num(r.window_us, 'd')} | {num(r.calls_s, ',.0f')} | "
                   f"{num(r.p50_ms, '.2f')} | {num(r.p99_ms, '.2f')} | {r.errors} | {num(r.main_us, '.0f')} | "
                   f"{num(r.process_us, '.0f')} | {num(r.rows_per_call, '.1f')} | {r.note} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"))
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--acceptors", type=cp.int_list(1), default="1,4", help="grpcio servers per process, comma-separated")
    parser.add_argument("--windows", type=cp.int_list(0), default="0,1000", help="our batcher's --max-queue-delay-us values")
    parser.add_argument("--empty-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--interceptor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.empty_server:
        empty_server(args.empty_server, args.acceptors[0], args.interceptor)
        return 0
    if not (Path(args.artifacts) / "mnist_model.onnx").exists():
        print(f"error: {args.artifacts}/mnist_model.onnx not found; run `mnist-deploy export` first", file=sys.stderr)
        return 2
    from mnist_deploy.devices import cpu_model
    from mnist_deploy.errors import MnistDeployError

    before, t0 = os.getloadavg(), time.time()
    try:
        rows = run(args)
    except (RuntimeError, load_test.ServerError, MnistDeployError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    after = os.getloadavg()
    print(table(rows))
    print(f"\nh2load, {args.connections} connections x 1 call in flight, {args.duration:g} s per row after "
          f"{args.warmup:g} s of warm-up; {cpu_model()}, {os.cpu_count()} CPUs; load average {before[0]:.2f} "
          f"before, {after[0]:.2f} after; {time.time() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
