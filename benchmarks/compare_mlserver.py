"""Our Open Inference Protocol routes beside Seldon MLServer, the reference implementation, request for request.

    bash scripts/mlserver_env.sh          # once: MLServer in its own venv (.venv-mlserver)
    python benchmarks/compare_mlserver.py --artifacts artifacts [--data-dir DIR] [--mlserver-venv DIR]
                                          [--json results.json]

Starts the real `mnist-deploy serve --artifacts DIR --port P --workers 1` and the real MLServer (from
its venv, serving the same ``mnist_model.onnx`` through benchmarks/mlserver/mnist_runtime.py with our
model's name, version and tensors) on free loopback ports, waits until both are ready, sends each the
same probes -- valid requests and the cases where the KServe v2 spec is silent or loose -- and prints a
Markdown table: probe, our status, MLServer's, and how the bodies differ. Logits from the valid probes
are compared numerically (the same ONNX file, so they should agree to float32 rounding).

Bounded: one request per probe and server, 10 s timeout each, both servers stopped at the end, also
on error. ``ALLOWED`` lists the probes where the two servers' status classes (2xx/4xx) differ on
purpose, with the reason; tests/serve/test_mlserver.py fails on any other difference.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load_test  # noqa: E402  (benchmarks/load_test.py: free_port, serve_subprocess)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUNTIME_DIR = HERE / "mlserver"
TIMEOUT = 10.0

# Probes whose status class (2xx/4xx) differs between the two servers on purpose; docs/mlserver.md
# gives each line. Any other difference fails tests/serve/test_mlserver.py.
ALLOWED = {
    "empty batch [0,784]": "an empty batch is refused with 400 as everywhere in our server (the dynamic batcher "
                           "takes >= 1 row); MLServer hands it to the runtime, where ONNX Runtime returns [0, 10]",
    "wrong content-type": "we read the body as JSON whatever its Content-Type (curl -d sends "
                          "x-www-form-urlencoded); MLServer's FastAPI body binding refuses it with 422",
}


@dataclass
class Probe:
    name: str
    method: str
    path: str  # {name} and {version} are filled in with the model's
    body: object = None  # JSON-able object, raw bytes, or None
    headers: dict = field(default_factory=dict)
    valid: bool = False  # both must answer 200 with matching logits


@dataclass
class Reply:
    status: int
    body: object  # parsed JSON, or the text when not JSON
    seconds: float


@dataclass
class Row:
    probe: str
    ours: Reply
    mlserver: Reply
    note: str
    valid: bool
    max_abs_diff: float | None = None  # logits and probabilities, where both have them

    @property
    def same_class(self) -> bool:
        return self.ours.status // 100 == self.mlserver.status // 100


def _tensor(name: str, arr: np.ndarray, *, nested: bool = False) -> dict:
    dtype = "UINT8" if arr.dtype == np.uint8 else "FP32"
    return {"name": name, "shape": list(arr.shape), "datatype": dtype,
            "data": arr.tolist() if nested else arr.ravel().tolist()}


def _req(*inputs: dict, outputs: list[str] | None = None, **extra) -> dict:
    req = {"inputs": list(inputs), **extra}
    if outputs is not None:
        req["outputs"] = [{"name": n} for n in outputs]
    return req


def probes(pixels: np.ndarray, normalised: np.ndarray) -> list[Probe]:
    """The probe list, from 64 real test digits (uint8 (64, 28, 28)) and the same digits normalised."""
    infer = "/v2/models/{name}/infer"
    p1, p64 = pixels[:1], pixels[:64]
    x1, x64 = normalised[:1], normalised[:64]
    logits = ["logits"]
    good = _req(_tensor("input", x1), outputs=logits)
    return [
        Probe("infer pixels batch 1", "POST", infer, _req(_tensor("pixels", p1), outputs=logits), valid=True),
        Probe("infer pixels batch 64", "POST", infer, _req(_tensor("pixels", p64), outputs=logits), valid=True),
        Probe("infer input batch 64", "POST", infer, _req(_tensor("input", x64), outputs=logits), valid=True),
        Probe("infer by version", "POST", "/v2/models/{name}/versions/{version}/infer", good, valid=True),
        Probe("nested data (input)", "POST", infer, _req(_tensor("input", x1, nested=True), outputs=logits),
              valid=True),
        Probe("nested data (pixels)", "POST", infer, _req(_tensor("pixels", p1, nested=True), outputs=logits),
              valid=True),
        Probe("pixels shape [1,784]", "POST", infer, _req(_tensor("pixels", p1.reshape(1, 784)), outputs=logits),
              valid=True),
        Probe("outputs omitted", "POST", infer, _req(_tensor("input", x1)), valid=True),
        Probe("outputs: probabilities", "POST", infer,
              _req(_tensor("input", x1), outputs=["logits", "probabilities"]), valid=True),
        Probe("outputs: unknown name", "POST", infer, _req(_tensor("input", x1), outputs=["nope"])),
        Probe("id echoed", "POST", infer, {**good, "id": "req-42"}, valid=True),
        Probe("parameters present", "POST", infer,
              {**good, "parameters": {"priority": 1}, "inputs": [{**good["inputs"][0], "parameters": {"x": 1}}]},
              valid=True),
        Probe("binary_data_output parameter", "POST", infer, {**good, "parameters": {"binary_data_output": True}},
              valid=True),
        Probe("missing inputs", "POST", infer, {"outputs": [{"name": "logits"}]}),
        Probe("two inputs", "POST", infer, _req(_tensor("input", x1), _tensor("pixels", p1))),
        Probe("unknown input name", "POST", infer, _req({**_tensor("input", x1), "name": "image"})),
        Probe("wrong datatype (input as INT32)", "POST", infer, _req({**_tensor("input", x1), "datatype": "INT32"})),
        Probe("unknown datatype (FLOAT)", "POST", infer, _req({**_tensor("input", x1), "datatype": "FLOAT"})),
        Probe("wrong shape [1,100]", "POST", infer,
              _req({"name": "input", "shape": [1, 100], "datatype": "FP32", "data": [0.0] * 100})),
        Probe("shape/data count mismatch", "POST", infer, _req({**_tensor("input", x1), "shape": [2, 784]})),
        Probe("UINT8 value 300", "POST", infer,
              _req({**_tensor("pixels", p1), "data": [300] + p1.ravel().tolist()[1:]})),
        Probe("empty batch [0,784]", "POST", infer,
              _req({"name": "input", "shape": [0, 784], "datatype": "FP32", "data": []})),
        Probe("unknown model", "POST", "/v2/models/no-such-model/infer", good),
        Probe("unknown version", "POST", "/v2/models/{name}/versions/99/infer", good),
        Probe("non-JSON body", "POST", infer, b"this is not json", {"content-type": "application/json"}),
        Probe("wrong content-type", "POST", infer, json.dumps(good).encode(), {"content-type": "text/plain"}),
        Probe("gzip body", "POST", infer, gzip.compress(json.dumps(good).encode()),
              {"content-type": "application/json", "content-encoding": "gzip"}, valid=True),
        Probe("unsupported Content-Encoding (br)", "POST", infer, json.dumps(good).encode(),
              {"content-type": "application/json", "content-encoding": "br"}),
        Probe("GET on infer", "GET", infer),
        Probe("server metadata", "GET", "/v2"),
        Probe("server live", "GET", "/v2/health/live"),
        Probe("server ready", "GET", "/v2/health/ready"),
        Probe("model metadata", "GET", "/v2/models/{name}"),
        Probe("model metadata by version", "GET", "/v2/models/{name}/versions/{version}"),
        Probe("model metadata, unknown model", "GET", "/v2/models/no-such-model"),
        Probe("model ready", "GET", "/v2/models/{name}/ready"),
        Probe("model ready, unknown version", "GET", "/v2/models/{name}/versions/99/ready"),
    ]


def send(client, base: str, probe: Probe, name: str, version: str) -> Reply:
    import httpx

    url = base + probe.path.format(name=name, version=version)
    body = probe.body
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    headers = dict(probe.headers)
    if content is not None and "content-type" not in headers:
        headers["content-type"] = "application/json"
    t0 = time.perf_counter()
    try:
        r = client.request(probe.method, url, content=content, headers=headers)
    except httpx.HTTPError as exc:  # no reply at all: status 0, kept in the table rather than raised
        return Reply(0, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    length = r.headers.get("inference-header-content-length")
    try:
        parsed = r.json() if length is None else binary_reply(r.content, int(length))
    except ValueError:
        parsed = r.text
    return Reply(r.status_code, parsed, seconds)


def binary_reply(content: bytes, length: int) -> dict:
    """A binary-extension response (JSON part, then the tensors) as its JSON form: each binary output's
    bytes put back as FP32 ``data``, so that it compares with a JSON answer."""
    head = json.loads(content[:length])
    offset = length
    for out in head.get("outputs", []):
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            out["data"] = np.frombuffer(content[offset:offset + size], "<f4").tolist()
            offset += size
    return head


def _outputs(body: object) -> dict[str, dict]:
    outs = body.get("outputs") if isinstance(body, dict) else None
    return {o["name"]: o for o in outs or [] if isinstance(o, dict) and "name" in o}


def _error(body: object) -> str | None:
    """An error body in a few words: its key and the start of its text (or a FastAPI detail's type@loc)."""
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("error"), str):
        text = body["error"]
        return f'error "{text[:60]}{"..." if len(text) > 60 else ""}"'
    detail = body.get("detail")
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        loc = ".".join(str(p) for p in detail[0].get("loc", []))
        return f"detail [{detail[0].get('type')}@{loc}]"
    if isinstance(detail, str):
        return f'detail "{detail[:60]}"'
    return None


def _keys(body: object) -> set[str]:
    return set(body) if isinstance(body, dict) else set()


def compare_bodies(ours: Reply, theirs: Reply) -> tuple[str, float | None]:
    """A short note of how the two bodies differ, and the largest |difference| of matching outputs."""
    notes: list[str] = []
    a, b = ours.body, theirs.body
    ea, eb = _error(a), _error(b)
    if ea or eb:
        notes.append(f"ours {ea or 'no error'}; MLServer {eb or 'no error'}")
    elif b == "" and a != "":
        notes.append(f"MLServer: empty body, ours {{{', '.join(sorted(_keys(a)))}}}")
    else:
        only_a, only_b = sorted(_keys(a) - _keys(b)), sorted(_keys(b) - _keys(a))
        if "id" in only_b:
            only_b[only_b.index("id")] = "id (generated)"
        if only_b:
            notes.append(f"only MLServer: {', '.join(only_b)}")
        if only_a:
            notes.append(f"only ours: {', '.join(only_a)}")
    oa, ob = _outputs(a), _outputs(b)
    if oa and ob and list(oa) != list(ob):
        notes.append(f"outputs ours {list(oa)}, MLServer {list(ob)}")
    diff, extra_fields = None, set()
    for name in set(oa) & set(ob):
        xa, xb = oa[name], ob[name]
        extra_fields |= set(xb) - set(xa)
        if xa.get("shape") != xb.get("shape") or xa.get("datatype") != xb.get("datatype"):
            notes.append(f"{name}: ours {xa.get('datatype')} {xa.get('shape')}, "
                         f"MLServer {xb.get('datatype')} {xb.get('shape')}")
        elif "data" in xa and "data" in xb:  # model metadata lists outputs without data
            d = float(np.max(np.abs(np.asarray(xa["data"], np.float64) - np.asarray(xb["data"], np.float64)),
                             initial=0.0))
            diff = d if diff is None else max(diff, d)
    if extra_fields:
        notes.append(f"MLServer outputs add {', '.join(sorted(extra_fields))}")
    if isinstance(a, dict) and isinstance(b, dict):
        if "id" in a and "id" in b and a["id"] != b["id"]:
            notes.append(f"id ours {a['id']!r}, MLServer {b['id']!r}")
        for key in ("model_version", "versions", "platform", "name"):
            if key in a and key in b and a[key] != b[key]:
                notes.append(f"{key} ours {a[key]!r}, MLServer {b[key]!r}")
        if "inputs" in a and "inputs" in b:
            ia = {t["name"]: (t["datatype"], t["shape"]) for t in a["inputs"]}
            ib = {t["name"]: (t["datatype"], t["shape"]) for t in b["inputs"]}
            if ia != ib:
                notes.append(f"metadata inputs ours {ia}, MLServer {ib}")
    if diff is not None:
        notes.append(f"max abs diff {diff:.1e}")
    return "; ".join(notes) or "same", diff


def _ready(url: str) -> bool:
    with contextlib.suppress(OSError):
        return load_test._get(url)[0] == 200
    return False


def write_repository(root: Path, artifacts: Path, http_port: int, grpc_port: int, *, max_batch_size: int = 0,
                     max_batch_time: float = 0.0) -> tuple[str, str]:
    """MLServer's settings.json and <model>/model-settings.json under ``root``; returns (name, version).

    ``max_batch_size`` (requests merged into one call, > 1) and ``max_batch_time`` (seconds, > 0) turn on
    MLServer's adaptive batching for the model; left at 0 they are not written and it stays off."""
    from mnist_deploy.artifacts.manifest import load_manifest
    from mnist_deploy.data.mnist import manifest_normalization
    from mnist_deploy.serve import v2_core

    manifest = load_manifest(artifacts)
    shim = SimpleNamespace(manifest=manifest)  # v2_core's helpers read only .manifest
    name, version = v2_core.base_name(shim), v2_core.model_version(shim)
    input_shape = [int(d) for d in manifest["model"].get("input_shape", [784])]
    settings = {"host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port, "metrics_endpoint": None,
                "parallel_workers": 0, "debug": False, "server_name": "mlserver"}
    tensors = lambda specs: [{"name": n, "datatype": d, "shape": s} for n, d, s in specs]  # noqa: E731
    model = {
        "name": name, "implementation": "mnist_runtime.MnistOnnxRuntime", "platform": "onnxruntime",
        "versions": [version],
        "inputs": tensors([("input", "FP32", [-1, *input_shape]), ("pixels", "UINT8", [-1, 28, 28])]),
        "outputs": tensors([("logits", "FP32", [-1, 10]), ("probabilities", "FP32", [-1, 10])]),
        "parameters": {"uri": str((artifacts / "mnist_model.onnx").resolve()), "version": version,
                       "extra": {**manifest_normalization(manifest), "input_shape": input_shape}},
    }
    if max_batch_size > 1 and max_batch_time > 0:  # MLServer batches only with both (mlserver.batching.hooks)
        model.update(max_batch_size=int(max_batch_size), max_batch_time=float(max_batch_time))
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    (root / name / "model-settings.json").write_text(json.dumps(model, indent=2))
    return name, version


@contextlib.contextmanager
def mlserver_process(root: Path, venv: Path, http_port: int, model: str, *,
                     startup_timeout: float = 120.0) -> Iterator[str]:
    """`mlserver start ROOT` from its venv; yields the base URL once the model is ready, stops it on exit."""
    exe = venv / "bin" / "mlserver"
    if not exe.exists():
        raise RuntimeError(f"{exe} not found: run `bash scripts/mlserver_env.sh` first")
    env = {**os.environ, "PYTHONPATH": str(RUNTIME_DIR)}
    log = open(root / "mlserver.log", "w+b")  # closed below
    proc = subprocess.Popen([str(exe), "start", str(root)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=root)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while not _ready(f"{url}/v2/models/{model}/ready"):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                why = f"exited with {proc.returncode}" if proc.poll() is not None else "not ready in time"
                raise RuntimeError(f"MLServer {why}:\n{log.read().decode(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def digits(data_dir: Path | None, artifacts: Path) -> tuple[np.ndarray, np.ndarray]:
    """64 real MNIST test digits (uint8) and the same normalised as the manifest says."""
    from mnist_deploy.artifacts.manifest import load_manifest
    from mnist_deploy.data.mnist import load_raw, manifest_normalization, normalize_pixels

    raw = load_raw(data_dir, allow_download=False)
    pixels = raw.arrays["test-images"][:64].astype(np.uint8)
    return pixels, normalize_pixels(pixels, **manifest_normalization(load_manifest(artifacts)))


def compare(*, artifacts: str | os.PathLike, data_dir: str | os.PathLike | None = None,
            venv: str | os.PathLike = REPO / ".venv-mlserver") -> list[Row]:
    """Run both servers and every probe; returns one :class:`Row` per probe."""
    import httpx

    artifacts, venv = Path(artifacts).resolve(), Path(venv).resolve()
    pixels, normalised = digits(Path(data_dir) if data_dir else None, artifacts)
    with tempfile.TemporaryDirectory(prefix="mlserver-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        ports = [load_test.free_port() for _ in range(3)]
        name, version = write_repository(root, artifacts, ports[1], ports[2])
        ours, _proc = stack.enter_context(load_test.serve_subprocess(
            artifacts, ["--workers", "1", "--log-level", "warning"], port=ports[0], log_path=root / "ours.log",
            startup_timeout=120, stop_timeout=15))
        theirs = stack.enter_context(mlserver_process(root, venv, ports[1], name))
        client = stack.enter_context(httpx.Client(timeout=TIMEOUT))
        rows = []
        for probe in probes(pixels, normalised):
            a = send(client, ours, probe, name, version)
            b = send(client, theirs, probe, name, version)
            note, diff = compare_bodies(a, b)
            rows.append(Row(probe.name, a, b, note, probe.valid, diff))
        return rows


def table(rows: list[Row]) -> str:
    lines = ["| probe | ours | MLServer | body difference |", "|---|---|---|---|"]
    for r in rows:
        mark = "" if r.same_class else (" (allowed)" if r.probe in ALLOWED else " (DIFFERS)")
        note = r.note.replace("|", "\\|")
        lines.append(f"| {r.probe} | {r.ours.status} | {r.mlserver.status}{mark} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default="artifacts", help="an artifacts folder with mnist_model.onnx")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"),
                        help="MNIST folder for the probe digits (default: $MNIST_DEPLOY_DATA)")
    parser.add_argument("--mlserver-venv", default=os.environ.get("MLSERVER_VENV", str(REPO / ".venv-mlserver")))
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if not (Path(args.artifacts) / "mnist_model.onnx").exists():
        print(f"error: {args.artifacts}/mnist_model.onnx not found; run `mnist-deploy export` first", file=sys.stderr)
        return 2
    try:
        rows = compare(artifacts=args.artifacts, data_dir=args.data_dir, venv=args.mlserver_venv)
    except (RuntimeError, load_test.ServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(rows))
    for probe, reason in ALLOWED.items():
        print(f"\nallowed: {probe}: {reason}", end="")
    differing = [r.probe for r in rows if not r.same_class and r.probe not in ALLOWED]
    print(f"\n\n{len(rows)} probes; status class differs (not allowed): {differing or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
