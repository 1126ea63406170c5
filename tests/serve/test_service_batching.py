"""Dynamic batching in the served process: a burst of real concurrent requests runs as batches, each
caller gets its own rows (equal to the unbatched answer), and a bad request in the burst gets its 4xx
while its neighbours get 200."""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import pytest
from _serving import mnist_test_digits, serve_process
from _tolerance import LOGITS_ATOL, PROBABILITIES_ATOL
from starlette.testclient import TestClient

from mnist_deploy.data.mnist import manifest_normalization, normalize_pixels
from mnist_deploy.predict import load_model
from mnist_deploy.serve import create_app

pytestmark = pytest.mark.integration
BURST = 64
BAD = 31  # the index of the bad request in the burst


@pytest.fixture(scope="module")
def oracle(served):
    """The unbatched model: one image per call, in this process."""
    m = load_model(artifacts=served, runtime="onnx")
    norm = manifest_normalization(m.manifest)
    return lambda a: m.logits(normalize_pixels(a.reshape(1, 784).astype(np.float32), **norm))[0]


def _samples(text: str, name: str) -> dict[str, float]:
    """{le (a float): cumulative count} of one unlabelled histogram, plus "count"."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf'^{name}_bucket\{{le="([^"]+)"\}} (\S+)$', line)
        if m:
            out[float(m.group(1))] = float(m.group(2))
        elif line.startswith(f"{name}_count "):
            out["count"] = float(line.split()[1])
    return out


async def _burst(url: str, bodies: list[tuple[str, dict]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=30, limits=limits) as c:
        return await asyncio.gather(*(c.post(url + path, json=body) for path, body in bodies))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z.astype(np.float64) - z.max())
    return e / e.sum()


def test_a_burst_is_batched_answers_match_and_a_bad_request_fails_alone(served, mnist_dir, oracle):
    images, _ = mnist_test_digits(mnist_dir, BURST)
    args = ("--max-batch-size", "64", "--max-queue-delay-us", "20000", "--log-level", "warning")
    with serve_process(served, *args) as (url, _proc):
        for rounds in range(5):  # the burst must overlap in time; on a loaded machine try a few times
            bodies = [("/predict", {"pixels": a.ravel().tolist()}) for a in images]
            bodies[BAD] = ("/predict", {"pixels": [0] * 783})
            v2 = [("/v2/models/mlp/infer", {"id": f"r{i}", "inputs": [
                {"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": a.ravel().tolist()}]})
                for i, a in enumerate(images[:16])]
            v2[5] = ("/v2/models/mlp/infer", {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784],
                                                          "data": [0.0] * 784}]})
            answers = asyncio.run(_burst(url, bodies + v2))
            for i, r in enumerate(answers[:BURST]):
                if i == BAD:
                    assert r.status_code == 422 and "784" in r.json()["detail"], r.text
                    continue
                assert r.status_code == 200, r.text
                want = _softmax(oracle(images[i]))
                assert r.json()["digit"] == int(want.argmax())
                np.testing.assert_allclose(r.json()["probabilities"], want, atol=PROBABILITIES_ATOL)
            for i, r in enumerate(answers[BURST:]):
                if i == 5:
                    assert r.status_code == 400 and "UINT8" in r.json()["error"], r.text
                    continue
                assert r.status_code == 200, r.text
                assert r.json()["id"] == f"r{i}"
                np.testing.assert_allclose(r.json()["outputs"][0]["data"], oracle(images[i]), atol=LOGITS_ATOL)
            metrics = httpx.get(url + "/metrics").text
            sizes = _samples(metrics, "mnist_deploy_batch_size")
            queued = _samples(metrics, "mnist_deploy_batch_queue_seconds")
            assert queued["count"] == (rounds + 1) * (BURST - 1 + 15)  # the two bad requests never queued
            if sizes["count"] > sizes[1.0]:  # some batch held more than one row
                break
        assert sizes["count"] > sizes[1.0], sizes
        assert sizes["count"] < queued["count"]  # fewer model calls than requests


def test_batching_off_by_default_and_on_in_process(served, mnist_dir, oracle):
    images, _ = mnist_test_digits(mnist_dir, 4)
    model = load_model(artifacts=served, runtime="onnx")
    with TestClient(create_app(model=model)) as c:
        assert c.app.service.batcher.max_batch_size == 1  # a pass-through: one request per model call
    with TestClient(create_app(model=model, max_batch_size=8, max_queue_delay_us=100)) as c:
        assert c.app.service.batcher is not None and c.app.service.batcher.max_batch_size == 8
        r = c.post("/predict", json={"pixels": images[0].ravel().tolist()})
        assert r.status_code == 200
        np.testing.assert_allclose(r.json()["probabilities"], _softmax(oracle(images[0])), atol=PROBABILITIES_ATOL)
        assert _samples(c.get("/metrics").text, "mnist_deploy_batch_size")["count"] == 1


def _png(a: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_uploads_and_predict_batch_join_the_batches(served, mnist_dir):
    images, _ = mnist_test_digits(mnist_dir, 24)
    pngs = [_png(a) for a in images[:8]]
    lists = [images[8 + 2 * i : 10 + 2 * i] for i in range(8)]  # eight /predict/batch requests of 2 rows
    with TestClient(create_app(model=load_model(artifacts=served, runtime="onnx"))) as c:  # unbatched answers
        want_up = [c.post("/predict", files={"file": ("d.png", b, "image/png")}).json() for b in pngs]
        want_rows = [c.post("/predict/batch", json={"pixels": [a.ravel().tolist() for a in rows]}).json()
                     for rows in lists]

    async def burst(url):
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=16)) as c:
            up = [c.post(url + "/predict", files={"file": ("d.png", b, "image/png")}) for b in pngs]
            rows = [c.post(url + "/predict/batch", json={"pixels": [a.ravel().tolist() for a in r]}) for r in lists]
            return await asyncio.gather(*up, *rows)

    args = ("--workers", "1", "--max-batch-size", "64", "--max-queue-delay-us", "20000", "--log-level", "warning")
    with serve_process(served, *args) as (url, _proc):
        for rounds in range(5):  # the burst must overlap in time; on a loaded machine try a few times
            answers = asyncio.run(burst(url))
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
            for r, want in zip(answers[:8], want_up, strict=True):
                assert r.json()["digit"] == want["digit"]
                np.testing.assert_allclose(r.json()["probabilities"], want["probabilities"], atol=PROBABILITIES_ATOL)
            for r, want in zip(answers[8:], want_rows, strict=True):
                assert r.json()["count"] == 2
                for got, exp in zip(r.json()["predictions"], want["predictions"], strict=True):
                    np.testing.assert_allclose(got["probabilities"], exp["probabilities"], atol=PROBABILITIES_ATOL)
            metrics = httpx.get(url + "/metrics").text
            sizes = _samples(metrics, "mnist_deploy_batch_size")
            queued = _samples(metrics, "mnist_deploy_batch_queue_seconds")
            assert queued["count"] == (rounds + 1) * 16  # every upload and every list went through the batcher
            if sizes["count"] < queued["count"]:
                break
        assert sizes["count"] < queued["count"]  # fewer model calls than requests
