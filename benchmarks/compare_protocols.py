"""Every protocol side by side: the same load generator, the same concurrency, the same ONNX file.

    bash scripts/mlserver_env.sh          # once: MLServer in its own venv (.venv-mlserver)
    python benchmarks/compare_protocols.py --artifacts artifacts [--data-dir DIR] [--duration 10]
                                           [--connections 64] [--batches 1,64] [--batch-window-us 0]
                                           [--json out.json]

Starts the real `mnist-deploy serve --workers 1 --threads 1` (with ``--grpc-port`` when the server has it) and the
real MLServer (benchmarks/compare_mlserver.py's set-up: the same ``mnist_model.onnx``, one process, REST
and gRPC), then drives each target with h2load (Debian's nghttp2-client), ``--connections`` clients,
one request in flight each, for ``--duration`` seconds after a warm-up:

    ours /predict        our JSON (/predict at batch 1, /predict/batch above)   HTTP/1.1 keep-alive
    ours v2 JSON         /v2/models/NAME/infer, pixels UINT8 as JSON numbers     HTTP/1.1
    ours v2 binary       the binary tensor extension: a JSON header, then the raw bytes
                         (Inference-Header-Content-Length), binary output asked for   HTTP/1.1
    ours gRPC            inference.GRPCInferenceService/ModelInfer, raw_input_contents   HTTP/2
    MLServer v2 REST     the v2 JSON body                                        HTTP/1.1
    MLServer gRPC        the same ModelInfer message                             HTTP/2

Each request is 1 or 64 real MNIST test digits (``pixels``, UINT8 [N, 28, 28]). Before its load, every
target gets one sample request checked in full (status, the answer's tensors; gRPC through real grpcio
from MLServer's venv, since h2load sees only HTTP 200 and the gRPC status travels in the trailers); a
target that fails the sample is an error row with the reason, never a crash. Per-request latencies come
from h2load's --log-file. Prints one Markdown table: req/s, rows/s, p50/p99 ms, errors (non-2xx and
failed streams), with the machine's load average before and after.

``--batch-window-us N`` (default 0) gives both servers the same dynamic-batching window: ours is started
with ``--max-batch-size 64 --max-queue-delay-us N``, MLServer's model with adaptive batching
(``max_batch_size: 64``, ``max_batch_time: N / 1e6`` seconds). With 0, ours batches only what is already
queued when its model is free (delay 0) and MLServer does not batch at all. The two count a batch
differently: ours in rows (a 64-digit request fills a batch alone), MLServer in requests (up to 64
requests of any size merged).
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_mlserver  # noqa: E402  (the MLServer set-up)
import load_test  # noqa: E402  (free_port, serve_subprocess)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GRPC_METHOD = "/inference.GRPCInferenceService/ModelInfer"
BINARY_HEADER = "Inference-Header-Content-Length"
MAX_BATCH = 64  # with a batch window: ours --max-batch-size (rows), MLServer's max_batch_size (requests)


# -- request bodies ---------------------------------------------------------------------------------


def predict_body(pixels: np.ndarray) -> tuple[str, bytes, dict]:
    """Our JSON route: (path, body, headers) for a batch of uint8 (N, 28, 28) digits."""
    rows = pixels.reshape(len(pixels), 784).tolist()
    path, data = ("/predict", rows[0]) if len(pixels) == 1 else ("/predict/batch", rows)
    return path, json.dumps({"pixels": data}).encode(), {"content-type": "application/json"}


def v2_json_body(pixels: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
                                   "data": pixels.ravel().tolist()}],
                       "outputs": [{"name": "logits"}]}).encode()


def v2_binary_body(pixels: np.ndarray) -> tuple[bytes, dict]:
    """The binary tensor extension: the JSON header, then the tensor's raw bytes; the header's length in
    ``Inference-Header-Content-Length``; the output asked for as binary too."""
    raw = np.ascontiguousarray(pixels, np.uint8).tobytes()
    header = json.dumps({"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return header + raw, {"content-type": "application/octet-stream", BINARY_HEADER.lower(): str(len(header))}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): strings, bytes, messages, packed repeated."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def grpc_infer_message(model: str, pixels: np.ndarray) -> bytes:
    """A KServe v2 ``ModelInferRequest`` (grpc_predict_v2.proto), encoded by hand: model_name (1), one
    input (5: name 1, datatype 2, shape 3 packed int64), one requested output (6: name 1), and the
    tensor's bytes in raw_input_contents (7)."""
    shape = b"".join(_varint(int(d)) for d in pixels.shape)
    tensor = _field(1, b"pixels") + _field(2, b"UINT8") + _field(3, shape)
    raw = np.ascontiguousarray(pixels, np.uint8).tobytes()
    return _field(1, model.encode()) + _field(5, tensor) + _field(6, _field(1, b"logits")) + _field(7, raw)


def grpc_frame(message: bytes) -> bytes:
    """gRPC's length-prefixed message: not compressed (0), the length (4 bytes, big-endian), the message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


# -- the targets ------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    batch: int
    url: str  # the full URL h2load requests
    body: bytes  # what h2load posts, as it is
    headers: dict
    grpc: bool = False
    check: Callable[[], str | None] | None = None  # one sample request: None if it was answered right
    unavailable: str | None = None  # why the target cannot be measured at all


@dataclass
class Result:
    target: str
    batch: int
    req_s: float | None = None
    rows_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    requests: int = 0
    errors: int = 0
    note: str = ""
    batch_window_us: int = 0  # both servers' batching window in this run (0: none)


def check_rest(url: str, body: bytes, headers: dict, batch: int, *, binary: bool = False) -> str | None:
    """One request; None if it was answered 200 with ``batch`` rows of logits, else what went wrong."""
    import httpx

    try:
        r = httpx.post(url, content=body, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:160]}"
    if binary:
        length = r.headers.get(BINARY_HEADER.lower())
        if length is None:
            return "answered without a binary output (no Inference-Header-Content-Length)"
        head = json.loads(r.content[: int(length)])
        size = head["outputs"][0]["parameters"]["binary_data_size"]
        return None if size == batch * 10 * 4 else f"binary output of {size} bytes for batch {batch}"
    answer = r.json()
    rows = (len(answer["outputs"][0]["data"]) // 10 if "outputs" in answer
            else len(answer.get("predictions", [answer])))
    return None if rows == batch else f"answered {rows} rows for a batch of {batch}"


def check_grpc(host: str, port: int, message: bytes, batch: int, venv: Path) -> str | None:
    """One ModelInfer call through real grpcio (in MLServer's venv): None if OK with [batch, 10] logits."""
    with tempfile.NamedTemporaryFile(suffix=".pb") as f:
        f.write(message)
        f.flush()
        r = subprocess.run([str(venv / "bin" / "python"), str(HERE / "mlserver" / "grpc_check.py"), f"{host}:{port}",
                            f.name], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return f"grpc_check failed: {r.stderr.strip().splitlines()[-1:]}"
    answer = json.loads(r.stdout)
    if answer["code"] != "OK":
        return f"gRPC {answer['code']}: {answer['details']}"
    outputs = answer["outputs"]
    if not outputs or outputs[0][2] != [batch, 10]:
        return f"answered outputs {outputs}"
    return None


def targets(batch: int, pixels: np.ndarray, model: str, ours: str, ours_grpc: int | None, mlserver: str,
            mlserver_grpc: int, venv: Path) -> list[Target]:
    x = pixels[:batch]
    path, body, headers = predict_body(x)
    v2_json = v2_json_body(x)
    binary, binary_headers = v2_binary_body(x)
    message = grpc_infer_message(model, x)
    json_headers = {"content-type": "application/json"}
    grpc_headers = {"content-type": "application/grpc", "te": "trailers"}
    infer = f"/v2/models/{model}/infer"
    out = [
        Target("ours /predict", batch, ours + path, body, headers,
               check=lambda: check_rest(ours + path, body, headers, batch)),
        Target("ours v2 JSON", batch, ours + infer, v2_json, json_headers,
               check=lambda: check_rest(ours + infer, v2_json, json_headers, batch)),
        Target("ours v2 binary", batch, ours + infer, binary, binary_headers,
               check=lambda: check_rest(ours + infer, binary, binary_headers, batch, binary=True)),
        Target("ours gRPC", batch, f"http://127.0.0.1:{ours_grpc}{GRPC_METHOD}", grpc_frame(message), grpc_headers,
               grpc=True, check=lambda: check_grpc("127.0.0.1", ours_grpc, message, batch, venv),
               unavailable=None if ours_grpc else "this server has no --grpc-port (gRPC not built in yet)"),
        Target("MLServer v2 REST", batch, mlserver + infer, v2_json, json_headers,
               check=lambda: check_rest(mlserver + infer, v2_json, json_headers, batch)),
        Target("MLServer gRPC", batch, f"http://127.0.0.1:{mlserver_grpc}{GRPC_METHOD}", grpc_frame(message),
               grpc_headers, grpc=True, check=lambda: check_grpc("127.0.0.1", mlserver_grpc, message, batch, venv)),
    ]
    return out


# -- h2load -----------------------------------------------------------------------------------------


def h2load_duration(seconds: float) -> str:
    """h2load's <DURATION>: an integer with a unit (``1.5`` -> ``1500ms``; ``0.5`` alone is refused)."""
    return f"{max(0, round(seconds * 1000))}ms"


def h2load_command(t: Target, body_path: Path, log_path: Path, *, connections: int, duration: float,
                   warmup: float) -> list[str]:
    cmd = ["h2load", "-c", str(connections), "-t", "1", "-m", "1", "-D", h2load_duration(duration),
           "--warm-up-time", h2load_duration(warmup), "-d", str(body_path), "--log-file", str(log_path)]
    if not t.grpc:
        cmd.append("--h1")  # HTTP/1.1 keep-alive, one request in flight per connection
    for key, value in t.headers.items():
        cmd += ["-H", f"{key}: {value}"]
    return [*cmd, t.url]


def parse_h2load(stdout: str) -> dict:
    """The counts from h2load's summary: total, succeeded, failed, errored, timeout, each status class and the req/s."""
    out = {}
    m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", stdout)
    out["req_s"] = float(m.group(1)) if m else None
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
                  r"(\d+) timeout", stdout)
    if m:
        out.update(zip(("total", "done", "succeeded", "failed", "errored", "timeout"), map(int, m.groups()),
                       strict=True))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", stdout)
    if m:
        out.update(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups()), strict=True))
    return out


def errors_and_rate(counts: dict) -> tuple[int, float]:
    """(errors, successful req/s) from :func:`parse_h2load`'s counts.

    An error is what h2load counts as ``failed`` (non-2xx/3xx answers, and streams reset or connections
    lost: ``errored``, of which ``timeout`` is a part) plus any 3xx (a redirect is no prediction). Not
    ``done - 2xx``: with ``--warm-up-time``, h2load zeroes its status-code counts when the measurement
    starts, so a request answered 200 across that moment is counted in ``done`` and ``succeeded`` but
    not in ``2xx`` (its --log-file line says status 0), or the other way round; that made a stray
    "1 error" (or -1) in rows where every request had succeeded."""
    done = counts.get("done", 0)
    errors = counts.get("failed", 0) + counts.get("3xx", 0)
    ok = max(0, done - errors)
    return errors, counts["req_s"] * ok / max(1, done)


def latencies_ms(log_path: Path) -> np.ndarray:
    """Milliseconds of every 2xx response in an h2load --log-file (start us, status, duration us)."""
    out = []
    for line in log_path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].startswith("2"):
            out.append(int(parts[2]) / 1000)
    return np.asarray(out, np.float64)


def measure(t: Target, work: Path, *, connections: int, duration: float, warmup: float) -> Result:
    result = Result(t.name, t.batch)
    why = t.unavailable or (t.check() if t.check else None)
    if why:
        result.note = f"not measured: {why}"
        result.errors = 1
        return result
    stem = re.sub(r"\W+", "-", f"{t.name}-{t.batch}")
    body_path, log_path = work / f"{stem}.body", work / f"{stem}.log"
    body_path.write_bytes(t.body)
    cmd = h2load_command(t, body_path, log_path, connections=connections, duration=duration, warmup=warmup)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 120)
    counts = parse_h2load(r.stdout)
    if r.returncode != 0 or counts.get("req_s") is None:
        result.note = f"h2load failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-200:]}"
        result.errors = 1
        return result
    ms = latencies_ms(log_path)
    result.requests = counts.get("done", 0)  # those still in flight when the time ran out are not counted
    result.errors, result.req_s = errors_and_rate(counts)  # failed streams and non-2xx; answered per second
    result.rows_s = result.req_s * t.batch
    if len(ms):
        result.p50_ms, result.p99_ms = (float(v) for v in np.percentile(ms, [50, 99]))
    return result


# -- the run ------------------------------------------------------------------------------------------


def grpc_option() -> bool:
    """Whether this checkout's `mnist-deploy serve` has ``--grpc-port``."""
    from mnist_deploy.cli import cli

    return any("--grpc-port" in p.opts for p in cli.commands["serve"].params)


def serve_args(*, workers: int, grpc_port: int | None, batch_window_us: int = 0) -> list[str]:
    """Our `mnist-deploy serve` options (less --artifacts and --port); a window adds our batcher's settings."""
    args = ["--workers", str(workers), "--threads", "1", "--log-level", "warning"]
    if grpc_port:
        args += ["--grpc-port", str(grpc_port)]
    if batch_window_us:
        args += ["--max-batch-size", str(MAX_BATCH), "--max-queue-delay-us", str(batch_window_us)]
    return args


def mlserver_batching(batch_window_us: int) -> dict:
    """write_repository's keyword arguments for MLServer's adaptive batching with this window (none for 0)."""
    return {"max_batch_size": MAX_BATCH, "max_batch_time": batch_window_us / 1e6} if batch_window_us else {}


@contextlib.contextmanager
def servers(artifacts: Path, venv: Path, work: Path, workers: int, batch_window_us: int = 0) -> Iterator[tuple]:
    """Ours and MLServer, both started and ready: (name, ours URL, ours gRPC port or None, MLServer URL,
    MLServer gRPC port)."""
    ports = [load_test.free_port() for _ in range(4)]
    name, _version = compare_mlserver.write_repository(work, artifacts, ports[1], ports[2],
                                                       **mlserver_batching(batch_window_us))
    grpc = grpc_option()
    args = serve_args(workers=workers, grpc_port=ports[3] if grpc else None, batch_window_us=batch_window_us)
    with contextlib.ExitStack() as stack:
        ours, _ = stack.enter_context(load_test.serve_subprocess(artifacts, args, port=ports[0],
                                                                 log_path=work / "ours.log", startup_timeout=120))
        theirs = stack.enter_context(compare_mlserver.mlserver_process(work, venv, ports[1], name))
        yield name, ours, ports[3] if grpc else None, theirs, ports[2]


def compare(*, artifacts: str | os.PathLike, data_dir: str | os.PathLike | None = None,
            venv: str | os.PathLike = REPO / ".venv-mlserver", connections: int = 64, duration: float = 10.0,
            warmup: float = 2.0, batches: tuple[int, ...] = (1, 64), workers: int = 1,
            batch_window_us: int = 0) -> list[Result]:
    if shutil.which("h2load") is None:
        raise RuntimeError("h2load not found: install Debian's nghttp2-client (scripts/system_deps.sh)")
    artifacts, venv = Path(artifacts).resolve(), Path(venv).resolve()
    pixels, _ = compare_mlserver.digits(Path(data_dir) if data_dir else None, artifacts)
    results = []
    with tempfile.TemporaryDirectory(prefix="protocols-") as tmp:
        work = Path(tmp)
        with servers(artifacts, venv, work, workers, batch_window_us) as (name, ours, ours_grpc, theirs,
                                                                          theirs_grpc):
            for batch in batches:
                for t in targets(batch, pixels, name, ours, ours_grpc, theirs, theirs_grpc, venv):
                    results.append(measure(t, work, connections=connections, duration=duration, warmup=warmup))
    for r in results:
        r.batch_window_us = batch_window_us
    return results


def table(results: list[Result]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| target | batch | req/s | rows/s | p50 ms | p99 ms | requests | errors | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        note = r.note.replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {r.target} | {r.batch} | {num(r.req_s, ',.0f')} | {num(r.rows_s, ',.0f')} | "
                     f"{num(r.p50_ms, '.2f')} | {num(r.p99_ms, '.2f')} | {r.requests:,} | {r.errors:,} | {note} |")
    return "\n".join(lines)


def footer(*, connections: int, duration: float, warmup: float, workers: int, batch_window_us: int,
           load: tuple[float, float]) -> str:
    """The line under the table: the load, both servers' set-up and batching window, the machine."""
    if batch_window_us:
        batching = (f"batch window {batch_window_us} us on both: ours --max-batch-size {MAX_BATCH} (rows) "
                    f"--max-queue-delay-us {batch_window_us}, MLServer adaptive batching max_batch_size {MAX_BATCH} "
                    f"(requests) max_batch_time {batch_window_us / 1e6:g} s")
    else:
        batching = ("batch window 0: ours --max-queue-delay-us 0 (batches only what is already queued), "
                    "MLServer adaptive batching off")
    return (f"h2load, {connections} connections x 1 request in flight, {duration:g} s each after "
            f"{warmup:g} s of warm-up; our server --workers {workers}, MLServer one process; {batching}; "
            f"{os.cpu_count()} CPUs, load average {load[0]:.2f} before, {load[1]:.2f} after")


def int_list(least: int):
    """An argparse type: comma-separated integers, each at least ``least`` (a bad one: argparse's one line)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < least:
            raise argparse.ArgumentTypeError(f"each value must be at least {least}, got {text!r}")
        return values
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default="artifacts", help="an artifacts folder with mnist_model.onnx")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"))
    parser.add_argument("--mlserver-venv", default=os.environ.get("MLSERVER_VENV", str(REPO / ".venv-mlserver")))
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the measurement")
    parser.add_argument("--batches", type=int_list(1), default="1,64", help="images per request, comma-separated")
    parser.add_argument("--workers", type=int, default=1, help="our server's worker processes (MLServer: one)")
    parser.add_argument("--batch-window-us", type=int, default=0,
                        help="both servers' dynamic-batching window in microseconds (0: ours delay 0, MLServer off)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if not 0 <= args.batch_window_us <= 1_000_000:  # our serve's --max-queue-delay-us range
        print(f"error: --batch-window-us must lie in 0..1000000, got {args.batch_window_us}", file=sys.stderr)
        return 2
    if not (Path(args.artifacts) / "mnist_model.onnx").exists():
        print(f"error: {args.artifacts}/mnist_model.onnx not found; run `mnist-deploy export` first", file=sys.stderr)
        return 2
    from mnist_deploy.errors import MnistDeployError

    before = os.getloadavg()
    try:
        results = compare(artifacts=args.artifacts, data_dir=args.data_dir, venv=args.mlserver_venv,
                          connections=args.connections, duration=args.duration, warmup=args.warmup,
                          batches=tuple(args.batches), workers=args.workers,
                          batch_window_us=args.batch_window_us)
    except (RuntimeError, load_test.ServerError, MnistDeployError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    after = os.getloadavg()
    print(table(results))
    print("\n" + footer(connections=args.connections, duration=args.duration, warmup=args.warmup,
                        workers=args.workers, batch_window_us=args.batch_window_us, load=(before[0], after[0])))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
