"""serve: the HTTP API against the real app (TestClient) and the real `mnist-deploy serve` process."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from _serving import mnist_test_digits, png_bytes, serve_process, wait_ready
from _tolerance import PROBABILITIES_ATOL
from click.testing import CliRunner
from PIL import Image
from starlette.testclient import TestClient

from mnist_deploy.cli import cli
from mnist_deploy.data.mnist import normalize
from mnist_deploy.predict import load_model
from mnist_deploy.serve import MAX_BODY_BYTES, create_app, is_loopback

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits(mnist_dir):
    return mnist_test_digits(mnist_dir, 16)


@pytest.fixture
def client(model):
    with TestClient(create_app(model=model)) as c:
        yield c


@pytest.fixture(params=[True, False], ids=["fast-path", "fastapi-route"])
def any_client(request, model):
    """The JSON hot path answered by the guard, and the same request through the FastAPI route."""
    with TestClient(create_app(model=model, fast_path=request.param)) as c:
        yield c


def _pixels(a: np.ndarray) -> dict:
    return {"pixels": a.ravel().tolist()}


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


# ---------------------------------------------------------------------------------------------
# Predictions.


def test_json_pixels_predict_like_the_model(any_client, model, digits):
    images, labels = digits
    expected = model.probabilities(normalize(images))
    for a, p in zip(images, expected, strict=True):
        r = any_client.post("/predict", json=_pixels(a))
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"digit", "confidence", "probabilities", "runtime", "latency_ms"}
        assert body["digit"] == int(p.argmax()) and body["runtime"] == "onnx"
        np.testing.assert_allclose(body["probabilities"], p, atol=PROBABILITIES_ATOL)
        assert body["confidence"] == pytest.approx(p.max(), abs=PROBABILITIES_ATOL)
        assert 0 <= body["latency_ms"] < 10_000
    assert (expected.argmax(1) == labels).mean() > 0.9


def test_square_pixels_and_charset_are_accepted(client, digits):
    a = digits[0][0]
    flat = client.post("/predict", json=_pixels(a)).json()
    square = client.post("/predict", content=json.dumps({"pixels": a.tolist()}),
                         headers={"content-type": "application/json; charset=utf-8"}).json()
    assert flat["probabilities"] == square["probabilities"]


def test_uploaded_images_predict_like_the_tensor(client, model, digits):
    images, _ = digits
    expected = model.probabilities(normalize(images)).argmax(1)
    for a, want in zip(images[:6], expected[:6], strict=True):
        r = client.post("/predict", files={"file": ("digit.png", png_bytes(255 - a), "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["digit"] == want
    r = client.post("/predict", content=png_bytes(images[0]), headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["digit"] == expected[0]


def test_batch_json_and_multipart(client, model, digits):
    images, _ = digits
    expected = model.probabilities(normalize(images))
    r = client.post("/predict/batch", json={"pixels": [a.ravel().tolist() for a in images]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(images) == len(body["predictions"]) and body["runtime"] == "onnx"
    np.testing.assert_allclose([p["probabilities"] for p in body["predictions"]], expected, atol=PROBABILITIES_ATOL)
    files = [("files", (f"d{i}.png", png_bytes(a), "image/png")) for i, a in enumerate(images[:3])]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["file"] for p in preds] == ["d0.png", "d1.png", "d2.png"]
    assert [p["digit"] for p in preds] == expected[:3].argmax(1).tolist()


def test_batch_limits_and_bad_items(client, digits):
    a = digits[0][0].ravel().tolist()
    r = client.post("/predict/batch", json={"pixels": [a] * 257})
    assert r.status_code == 422 and "at most 256" in r.json()["detail"]
    r = client.post("/predict/batch", json={"pixels": [a, a[:-1]]})
    assert r.status_code == 422
    files = [("files", ("good.png", png_bytes(digits[0][0]), "image/png")),
             ("files", ("bad.png", b"nope", "image/png"))]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 422 and "image 1 (bad.png: not an image" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------
# Bad input: always a 4xx with a JSON detail, never a 500.


def _chunks(total: int, size: int = 64 * 1024):
    sent = 0
    while sent < total:
        yield b"1" * min(size, total - sent)
        sent += size


BAD_JSON = [
    ("wrong count", json.dumps({"pixels": [0] * 783}), 422, "784 values"),
    ("out of range", json.dumps({"pixels": [0] * 783 + [300]}), 422, "0..255"),
    ("negative", json.dumps({"pixels": [-5] + [0] * 783}), 422, "0..255"),
    # NaN and Infinity are not JSON (RFC 8259), so the parser refuses them before any pixel check.
    ("NaN", '{"pixels": [NaN' + ", 0" * 783 + "]}", 400, "not valid JSON"),
    ("Infinity", '{"pixels": [Infinity' + ", 0" * 783 + "]}", 400, "not valid JSON"),
    ("strings", json.dumps({"pixels": ["a"] * 784}), 422, "numbers"),
    ("null", json.dumps({"pixels": None}), 422, "numbers"),
    ("not json", "{pixels: 1", 400, "not valid JSON"),
    ("not an object", json.dumps([0] * 784), 422, '"pixels" field'),
    ("no pixels", json.dumps({"pixel": [0] * 784}), 422, '"pixels" field'),
    ("empty", "", 400, "empty body"),
    ("deep nesting", "[" * 100_000 + "]" * 100_000, 400, "not valid JSON"),
]


@pytest.mark.parametrize("name, body, status, message", BAD_JSON, ids=[b[0] for b in BAD_JSON])
def test_bad_json_is_a_clear_4xx(any_client, name, body, status, message):
    r = any_client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message in r.json()["detail"]


def test_invalid_utf8_json(any_client):
    r = any_client.post("/predict", content=b'{"pixels": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "UTF-8" in r.json()["detail"]


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        ({"files": {"file": ("x.png", b"this is text", "image/png")}}, 422, "not an image"),
        ({"files": {"file": ("bomb.png", _png_header_only(100_000, 100_000), "image/png")}}, 422, "refusing"),
        ({"files": {"file": ("big.png", _png_header_only(8000, 8000), "image/png")}}, 422, "refusing to decode"),
        ({"files": {"file": ("blank.png", png_bytes(np.zeros((50, 50), np.uint8)), "image/png")}}, 422, "no digit"),
        ({"data": {"note": "no file here"}, "files": {}}, 415, "Content-Type"),
        ({"content": b"--xx\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nhello\r\n--xx--\r\n",
          "headers": {"content-type": "multipart/form-data; boundary=xx"}}, 422, "no file"),
        ({"content": b"garbage", "headers": {"content-type": "multipart/form-data"}}, 400, ""),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "text/plain"),
        ({"content": b"hello"}, 415, "(none)"),
        ({"content": b"GIF89a-not-really", "headers": {"content-type": "image/gif"}}, 422, "not"),
    ],
    ids=["text-as-png", "bomb-header", "over-max-pixels", "blank", "form-without-file", "multipart-no-file",
         "multipart-no-boundary", "text/plain", "no-content-type", "broken-gif"],
)
def test_bad_uploads_are_clear_4xx(client, kwargs, status, message):
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert message in r.json()["detail"]


def test_oversized_bodies_are_413(any_client):
    big = b"[" + b"0," * (MAX_BODY_BYTES // 2) + b"0]"
    r = any_client.post("/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    # No Content-Length: the streamed body is counted and cut off.
    r = any_client.post("/predict", content=_chunks(3 * MAX_BODY_BYTES), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    r = any_client.post("/predict/batch", content=_chunks(2 * MAX_BODY_BYTES),
                        headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413
    r = any_client.post("/predict", content=b"{}", headers={"content-type": "application/json",
                                                            "content-length": "abc"})
    assert r.status_code in (400, 413)


def test_limits_are_configurable(model, digits):
    with TestClient(create_app(model=model, max_body_bytes=1024)) as c:
        r = c.post("/predict", json=_pixels(digits[0][0]))  # about 1.8 kB of compact JSON
        assert r.status_code == 413
    with TestClient(create_app(model=model, max_image_pixels=100)) as c:
        r = c.post("/predict", files={"file": ("d.png", png_bytes(digits[0][0]), "image/png")})
        assert r.status_code == 422 and "28x28 = 784 pixels" in r.json()["detail"]


def test_unknown_routes_and_methods_are_json(client):
    for method, path, status in [("GET", "/predict", 405), ("GET", "/nope", 404), ("GET", "/static/../manifest.json", 404),
                                 ("GET", "/static/index.html", 404), ("GET", "/static/manifest.json", 404)]:
        r = client.request(method, path)
        assert r.status_code == status, (path, r.text)
        assert "detail" in r.json()


# ---------------------------------------------------------------------------------------------
# Health, model, metrics, docs, page.


def test_health_is_503_until_the_model_is_loaded(served):
    app = create_app(artifacts=served, runtime="onnx")
    bare = TestClient(app)  # no `with`: the lifespan (which loads the model) has not run
    r = bare.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "loading"}
    assert bare.post("/predict", json={"pixels": [0] * 784}).status_code == 503
    with TestClient(app) as c:
        r = wait_ready(c)  # loaded, then warmed up in the background
        assert r.status_code == 200 and r.json() == {"status": "ok", "runtime": "onnx", "model": "mlp", "pid": os.getpid()}
        assert c.post("/predict", json={"pixels": [0] * 784}).status_code == 200


def test_model_reports_what_is_served(client, served):
    info = client.get("/model").json()
    manifest = json.loads((served / "manifest.json").read_text())
    entry = manifest["artifacts"]["onnx"]
    assert info["format"] == "onnx" and info["engine"] == "onnxruntime" and info["runtime"] == "onnx"
    assert info["sha256"] == entry["sha256"] == hashlib.sha256((served / entry["path"]).read_bytes()).hexdigest()
    assert info["metrics"]["accuracy"] == manifest["metrics"]["accuracy"]
    assert info["parity"] == entry.get("parity") and info["model"]["name"] == "mlp"
    assert info["limits"]["max_body_bytes"] == MAX_BODY_BYTES


_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
_SAMPLE = re.compile(rf'^{_NAME}(\{{{_NAME}="[^"]*"(,{_NAME}="[^"]*")*\}})? [0-9.e+-]+$')


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_errors_and_latency(model, digits):
    with TestClient(create_app(model=model)) as c:
        for a in digits[0][:3]:
            assert c.post("/predict", json=_pixels(a)).status_code == 200
        for _ in range(2):
            assert c.post("/predict", json={"pixels": [1]}).status_code == 422
        c.post("/predict/batch", json={"pixels": [a.ravel().tolist() for a in digits[0][:4]]})
        c.get("/nope")
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or _SAMPLE.match(line), line
    assert _metric(text, "mnist_deploy_http_requests_total", method="POST", route="/predict", status="200") == 3
    assert _metric(text, "mnist_deploy_http_requests_total", method="POST", route="/predict", status="422") == 2
    assert _metric(text, "mnist_deploy_http_request_errors_total", route="/predict", status="422") == 2
    assert _metric(text, "mnist_deploy_http_request_errors_total", route="other", status="404") == 1
    assert _metric(text, "mnist_deploy_predictions_total", runtime="onnx") == 3 + 4
    assert _metric(text, "mnist_deploy_model_ready") == 1
    name = "mnist_deploy_http_request_duration_seconds"
    buckets = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"{name}_bucket{{") and 'route="/predict"' in line]  # label order is free
    assert buckets == sorted(buckets) and buckets[-1] == 5
    assert _metric(text, f"{name}_count", route="/predict") == 5
    assert 0 < _metric(text, f"{name}_sum", route="/predict") < 60


def test_openapi_docs_describe_the_endpoints(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert {"/predict", "/predict/batch", "/health", "/model", "/metrics"} <= set(spec["paths"])


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    html = r.text
    assert '<canvas id="pad"' in html and 'id="clear"' in html and html.count('<li data-digit="') == 10
    texts = [html]
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert not re.match(r"(https?:)?//", ref), ref  # no CDN, no external resource
        if ref.startswith("/static/"):
            asset = client.get(ref)
            assert asset.status_code == 200, ref
            texts.append(asset.text)
    for text in texts:
        assert not re.search(r"https?://", text), "the page must not reference any external URL"


def test_pytorch_runtime_serves_too(served, digits):
    eager = load_model(artifacts=served, runtime="pytorch")
    with TestClient(create_app(model=eager)) as c:
        r = c.post("/predict", json=_pixels(digits[0][0]))
        assert r.status_code == 200 and r.json()["runtime"] == "pytorch" and r.json()["digit"] == 7


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")


# ---------------------------------------------------------------------------------------------
# The real process.


def _raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and b'"detail"' in data and data.rstrip().endswith(b"}"):
                break
    return data


def test_serve_process_over_http(served, digits, model):
    images, _ = digits
    with serve_process(served) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        r = httpx.get(url + "/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        want = model.probabilities(normalize(images[:4])).argmax(1).tolist()
        got = [httpx.post(url + "/predict", json=_pixels(a)).json()["digit"] for a in images[:4]]
        assert got == want
        r = httpx.post(url + "/predict", files={"file": ("d.png", png_bytes(255 - images[0]), "image/png")})
        assert r.status_code == 200 and r.json()["digit"] == want[0]
        assert httpx.get(url + "/").status_code == 200
        # A header claiming 100 MB is answered 413 at once: the server does not wait for (or read) the body.
        t0 = time.monotonic()
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {100 * 1024 * 1024}\r\n\r\n").encode()
        answer = _raw_request(port, head, b'{"pixels": [')
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"over the limit" in answer and time.monotonic() - t0 < 5
        # Chunked upload past the limit: cut off with a 413 too.
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n").encode()
        chunk = b"1" * 65536
        body = b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(20))
        answer = _raw_request(port, head, body)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        metrics = httpx.get(url + "/metrics").text
        assert 'mnist_deploy_http_requests_total{method="POST",route="/predict",status="413"} 2' in metrics
        _assert_not_reachable_from_outside(port)
    log = proc.log_path.read_text()
    assert f"page http://127.0.0.1:{port}/" in log and f"Uvicorn running on http://127.0.0.1:{port}" in log
    assert "Traceback" not in log


def _assert_not_reachable_from_outside(port: int) -> None:
    """The default bind is loopback: the machine's own non-loopback address must refuse the port."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outward interface
            addr = s.getsockname()[0]
    except OSError:
        return
    if addr.startswith("127.") or addr == "0.0.0.0":
        return
    with pytest.raises(OSError), socket.create_connection((addr, port), timeout=2):
        pass


def test_cli_serve_refuses_bad_artifacts(served, tmp_path):
    res = CliRunner().invoke(cli, ["serve", "--artifacts", str(tmp_path / "none"), "--port", "0"])
    assert res.exit_code == 2 and "no such artifacts folder" in res.stderr and "Traceback" not in res.output
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(served, folder)
    onnx = folder / "mnist_model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    res = CliRunner().invoke(cli, ["serve", "--artifacts", str(folder), "--port", "0"])
    assert res.exit_code == 1 and "sha256" in res.stderr and "refusing to load" in res.stderr
    res = CliRunner().invoke(cli, ["serve", "--port", "70000"])
    assert res.exit_code == 2 and "--port" in res.output


def test_images_are_preprocessed_not_loaded_from_paths(client, served):
    """A body naming a file is just bytes: nothing is read from disk or the network."""
    for content in (str(served / "manifest.json").encode(), b"http://127.0.0.1:1/x.png", b"file:///etc/passwd"):
        r = client.post("/predict", content=content, headers={"content-type": "image/png"})
        assert r.status_code == 422 and "not an image" in r.json()["detail"]
    r = client.post("/predict", json={"pixels": str(served / "manifest.json")})
    assert r.status_code == 422


def test_jpeg_upload(client, digits, model):
    a = digits[0][1]
    buf = io.BytesIO()
    Image.fromarray(255 - a).resize((112, 112)).save(buf, "JPEG", quality=90)
    r = client.post("/predict", files={"file": ("d.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 200 and r.json()["digit"] == int(model.probabilities(normalize(a[None])).argmax())


def test_startup_objects_are_frozen_out_of_the_collectors_reach(model):
    import gc

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        with TestClient(create_app(model=model)) as c:
            assert wait_ready(c).status_code == 200
            assert gc.get_freeze_count() > 10_000  # torch, the runtime, FastAPI, the model
    finally:
        gc.unfreeze()
