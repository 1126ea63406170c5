"""serve under bad input (issue 9): each test failed before its fix.

Huge JSON integers, images Pillow opens but cannot convert, made-up methods and paths in the
metrics, booleans among pixels, 405 without Allow, and large legal images queued behind the decoders.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time

import anyio
import numpy as np
import pytest
from _serving import mnist_test_digits, png_bytes
from click.testing import CliRunner
from PIL import Image
from starlette.testclient import TestClient

from mnist_deploy.cli import cli
from mnist_deploy.data.images import MAX_IMAGE_PIXELS
from mnist_deploy.predict import load_model
from mnist_deploy.serve import create_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digit(mnist_dir):
    images, _labels = mnist_test_digits(mnist_dir, 1)
    return images[0]


@pytest.fixture(params=[True, False], ids=["fast-path", "fastapi-route"])
def any_client(request, model):
    with TestClient(create_app(model=model, fast_path=request.param)) as c:
        yield c


@pytest.fixture
def client(model):
    with TestClient(create_app(model=model)) as c:
        yield c


def _lab_tiff() -> bytes:
    """A LAB-mode TIFF: Pillow opens and decodes it, but cannot convert LAB to L."""
    buf = io.BytesIO()
    lab = np.zeros((28, 28, 3), np.uint8)
    lab[6:22, 12:16, 0] = 255  # a bright stroke in the lightness channel
    Image.fromarray(lab, mode="LAB").save(buf, "TIFF")
    return buf.getvalue()


# -- 1. a JSON integer over Python's 4,300-digit limit -----------------------------------------


@pytest.mark.parametrize("route", ["/predict", "/predict/batch"])
def test_huge_json_integer_is_400_not_500(any_client, route):
    body = '{"pixels": [' + "9" * 5000 + "]}"
    r = any_client.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert "not valid JSON" in r.json()["detail"]


# -- 2. an image Pillow opens but cannot convert -----------------------------------------------


def test_lab_tiff_upload_is_422(client):
    r = client.post("/predict", files={"file": ("lab.tif", _lab_tiff(), "image/tiff")})
    assert r.status_code == 422, r.text
    assert "cannot convert a LAB image" in r.json()["detail"]


def test_predict_cli_reports_the_lab_tiff_and_predicts_the_rest(served, digit, tmp_path):
    (tmp_path / "a_good.png").write_bytes(png_bytes(digit))
    (tmp_path / "b_lab.tif").write_bytes(_lab_tiff())
    (tmp_path / "c_good.png").write_bytes(png_bytes(digit))
    r = CliRunner().invoke(cli, ["predict", str(tmp_path), "--artifacts", str(served), "--json"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    records = json.loads(r.stdout)
    assert [("error" in rec) for rec in records] == [False, True, False]
    assert "cannot convert a LAB image" in records[1]["error"]
    assert records[0]["digit"] == records[2]["digit"]


# -- 3. metrics labels from a fixed set ---------------------------------------------------------


def test_made_up_methods_and_paths_do_not_grow_the_metrics(client):
    def made_up(start: int) -> str:
        for i in range(start, start + 40):
            client.request(f"MADEUP{i}" * 20, "/predict")
            client.get(f"/no/such/path/{i}")
            client.request(f"BREW{i}", f"/pot/{i}")
        return client.get("/metrics").text

    client.get("/metrics")  # its own series exist from here on
    first = made_up(0)
    text = made_up(1000)
    # New names add no series: the second round leaves the same lines, only the counts grow.
    assert len(text.splitlines()) == len(first.splitlines())
    methods = set(re.findall(r'method="([^"]*)"', text))
    routes = set(re.findall(r'route="([^"]*)"', text))
    assert methods <= {"GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}, methods
    assert not any("no/such" in r or "pot" in r for r in routes), routes
    counted = sum(float(v) for v in re.findall(r'mnist_deploy_http_requests_total\{method="other"[^}]*\} (\S+)', text))
    assert counted == 160  # the made-up methods are counted, as "other"


# -- 11. booleans among pixels; 405 with Allow --------------------------------------------------


@pytest.mark.parametrize("route, body", [
    ("/predict", {"pixels": [True] + [0] * 783}),
    ("/predict", {"pixels": [0.5] * 783 + [False]}),
    ("/predict/batch", {"pixels": [[0] * 784, [0] * 783 + [True]]}),
], ids=["first-true", "last-false", "batch"])
def test_booleans_among_pixels_are_refused(any_client, route, body):
    r = any_client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "booleans" in r.json()["detail"]


def test_a_string_true_is_not_a_boolean(any_client):
    r = any_client.post("/predict", content=json.dumps({"note": "true", "pixels": [0] * 784}),
                        headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("method, path, allow", [("GET", "/predict", "POST"), ("PUT", "/predict/batch", "POST"),
                                                 ("POST", "/health", "GET"), ("DELETE", "/metrics", "GET")])
def test_405_carries_allow(client, method, path, allow):
    r = client.request(method, path)
    assert r.status_code == 405, r.text
    assert allow in [m.strip() for m in r.headers["allow"].split(",")]


# -- 12. expensive legal images: a lower cap, answered at once ----------------------------------


def test_pixel_cap_is_much_lower_than_16_megapixels():
    assert MAX_IMAGE_PIXELS <= 2048 * 2048


def test_big_legal_image_is_refused_without_waiting_for_a_decoder(model):
    side = 3000  # 9 MP: a real, valid PNG (mostly black, so small) under the old 16 MP cap
    big = np.zeros((side, side), np.uint8)
    big[1000:2000, 1400:1600] = 255
    blob = png_bytes(big)
    app = create_app(model=model)
    with TestClient(app) as c:
        limiter = app.fastapi.state.decoders = anyio.CapacityLimiter(1)
        holder = object()
        c.portal.call(limiter.acquire_on_behalf_of, holder)  # every decoder busy
        answer: dict = {}

        def post() -> None:
            t0 = time.perf_counter()
            answer["r"] = c.post("/predict", files={"file": ("big.png", blob, "image/png")})
            answer["s"] = time.perf_counter() - t0

        worker = threading.Thread(target=post, daemon=True)
        worker.start()
        worker.join(timeout=10)
        c.portal.call(limiter.release_on_behalf_of, holder)
        worker.join(timeout=30)
    r = answer["r"]
    assert r.status_code == 422, r.text
    assert "more than the limit" in r.json()["detail"]
    assert answer["s"] < 10


# -- issue 8: one preprocessing -------------------------------------------------------------------


def test_train_predict_and_serve_normalise_to_the_same_bits(model):
    from mnist_deploy.data import mnist as data
    from mnist_deploy.data.images import pixels_to_array
    from mnist_deploy.serve.service import Service

    values = np.resize(np.arange(256), 784)  # every pixel value
    train = data.normalize(values.astype(np.uint8).reshape(1, 28, 28))  # what the cached tensors hold
    served_x = Service(model).normalize(
        model, pixels_to_array(values.tolist()))
    image_x = data.normalize_pixels(values.astype(np.float32))  # predict_image's last step
    assert train.dtype == served_x.dtype == image_x.dtype == np.float32
    assert np.array_equal(train, served_x) and np.array_equal(train, image_x)
    # The cache's tensors are those of the training-order formula, bit for bit, so its key need not change.
    legacy = (values.astype(np.float32).reshape(1, -1) / 255.0 - np.float32(0.1307)) / np.float32(0.3081)
    assert np.array_equal(train, legacy)


def test_serve_and_predict_read_mean_and_std_from_the_manifest(served, digit, tmp_path):
    import shutil

    from mnist_deploy.data.images import mnist_image
    from mnist_deploy.data.mnist import normalize_pixels
    from mnist_deploy.predict import predict_files

    folder = tmp_path / "art"
    shutil.copytree(served, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["preprocessing"].update(mean=0.5, std=0.25)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    m = load_model(artifacts=folder, runtime="onnx")
    want = m.probabilities(normalize_pixels(digit, mean=0.5, std=0.25))[0]
    default = m.probabilities(normalize_pixels(digit))[0]
    # One image on each side, one batch shape: the same kernels, so a tight atol holds on any BLAS; the
    # guard must hold at that atol (a confident model's probabilities saturate: 1e-3 cannot tell them apart)
    atol = 2e-6
    assert np.abs(want - default).max() > 10 * atol  # the test can tell the two apart
    with TestClient(create_app(model=m)) as c:
        got = c.post("/predict", json={"pixels": digit.ravel().tolist()}).json()["probabilities"]
    np.testing.assert_allclose(got, want, atol=atol)
    (tmp_path / "d.png").write_bytes(png_bytes(digit))
    rec = predict_files([tmp_path / "d.png"], model=m)[0]
    x = normalize_pixels(mnist_image(tmp_path / "d.png"), mean=0.5, std=0.25)
    assert rec["confidence"] == pytest.approx(float(m.probabilities(x)[0].max()), abs=1e-6)
