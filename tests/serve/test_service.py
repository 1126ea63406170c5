"""Uploads on the service (issue 18, item 5): PNG text inflation is bounded, image headers are read off
the event loop, and decoding is shared out an image at a time, so a small upload never waits for a
whole large batch."""

from __future__ import annotations

import asyncio
import io
import threading
import time
import zlib

import numpy as np
import pytest
from _serving import png_bytes
from starlette.testclient import TestClient

import mnist_deploy.serve.service as service_module
from mnist_deploy.serve import create_app

pytestmark = pytest.mark.integration


def _digit() -> np.ndarray:
    a = np.zeros((28, 28), np.uint8)
    a[6:22, 12:16] = 255  # a "1"
    return a


def _png_with_ztxt(chunks: int = 3, inflated: int = 1_000_000) -> bytes:
    """A valid 28x28 PNG with ``chunks`` zTXt chunks, each a few KB that inflate to ``inflated`` bytes."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for i in range(chunks):
        info.add_text(f"note{i}", "A" * inflated, zip=True)
    buf = io.BytesIO()
    Image.fromarray(_digit()).save(buf, "PNG", pnginfo=info)
    blob = buf.getvalue()
    assert len(blob) < 20_000 and zlib.compress(b"A" * inflated)  # small on the wire
    return blob


def test_png_text_chunks_are_not_inflated_past_a_small_cap(model):
    bomb = _png_with_ztxt()
    with TestClient(create_app(model=model)) as c:
        r = c.post("/predict", files={"file": ("bomb.png", bomb, "image/png")})
        assert r.status_code == 422, r.text
        assert "MAX_TEXT_CHUNK" in r.json()["detail"] or "text" in r.json()["detail"].lower()
        files = [("files", (f"b{i}.png", bomb, "image/png")) for i in range(32)]
        r = c.post("/predict/batch", files=files)
        assert r.status_code == 422 and r.json()["detail"].startswith("image 0"), r.text
        small = _png_with_ztxt(chunks=2, inflated=1000)  # ordinary metadata still reads
        assert c.post("/predict", files={"file": ("ok.png", small, "image/png")}).status_code == 200


def test_image_headers_are_read_off_the_event_loop(model, monkeypatch):
    on_loop: list[bool] = []
    real = service_module.check_image_header

    def recording(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "check_image_header", recording)
    digit = png_bytes(_digit())
    with TestClient(create_app(model=model)) as c:
        assert c.post("/predict", files={"file": ("d.png", digit, "image/png")}).status_code == 200
        assert c.post("/predict/batch", files=[("files", ("a.png", digit, "image/png"))] * 3).status_code == 200
    assert on_loop == [False] * 4


def test_a_small_upload_does_not_wait_for_whole_large_batches(model):
    side = 2048
    big = np.zeros((side, side), np.uint8)
    big[600:1400, 900:1100] = 255
    big_png = png_bytes(big)
    batch = [("files", (f"big{i}.png", big_png, "image/png")) for i in range(12)]
    small = png_bytes(_digit())
    app = create_app(model=model, max_body_bytes=8 << 20)
    finished: list[str] = []

    def post(client, name, **kw):
        r = client.post("/predict/batch" if name.startswith("big") else "/predict", **kw)
        assert r.status_code == 200, r.text
        finished.append(name)

    with TestClient(app) as c:
        limiter = app.fastapi.state.decoders
        bigs = [threading.Thread(target=post, args=(c, f"big{i}"), kwargs={"files": batch}) for i in range(2)]
        for t in bigs:
            t.start()
        deadline = time.monotonic() + 60
        while limiter.borrowed_tokens < limiter.total_tokens and time.monotonic() < deadline:
            time.sleep(0.005)  # both large batches are decoding: every decoder is busy
        assert limiter.borrowed_tokens == limiter.total_tokens
        try:
            post(c, "small", files={"file": ("small.png", small, "image/png")})
        finally:
            for t in bigs:
                t.join(120)
    assert finished[0] == "small", finished


# -- issue 21: readiness only after the warm-up; liveness at once -------------------------------


class _HeldFirstCall:
    """The served model's predictor, whose first call waits until the test lets it go: a model whose
    first call is slow (a runtime compiling or allocating), with the test deciding how slow."""

    def __init__(self, inner) -> None:
        self.inner, self.runtime = inner, inner.runtime
        self.release = threading.Event()
        self.sizes: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        self.threads.add(threading.current_thread().name)
        if len(self.sizes) == 1:
            assert self.release.wait(30), "the test never released the first call"
        return self.inner(x)


def test_readiness_turns_true_only_after_the_warm_up_while_liveness_answers_at_once(live, model):
    import dataclasses
    import logging
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    held = _HeldFirstCall(model.predictor)
    app = create_app(model=dataclasses.replace(model, predictor=held), max_batch_size=32, log_level="info")
    name = model.manifest["model"]["name"]
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    try:
        with live(app, log_level="info") as url, httpx.Client(base_url=url, timeout=30) as c, \
                ThreadPoolExecutor(1) as pool:
            logging.getLogger("uvicorn.error").addHandler(handler)  # after uvicorn's logging set-up
            for _ in range(3):  # the warm-up's first call is held: live, not ready, for as long as it takes
                assert c.get("/v2/health/live").json() == {"live": True}
                assert c.get("/v2/health/ready").status_code == 400
                r = c.get("/health")
                assert r.status_code == 503 and r.json() == {"status": "warming up"}
                assert c.get(f"/v2/models/{name}/ready").status_code == 400
                time.sleep(0.1)
            pending = pool.submit(httpx.post, url + "/predict", json={"pixels": _digit().ravel().tolist()}, timeout=30)
            time.sleep(0.3)
            assert not pending.done(), "a request ran while the model was warming up"
            assert held.sizes == [1]
            held.release.set()
            assert pending.result().status_code == 200
            deadline = time.monotonic() + 10
            while c.get("/v2/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "never ready after the warm-up"
                time.sleep(0.02)
            assert c.get("/health").json()["status"] == "ok"
            assert c.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
            metrics = c.get("/metrics").text
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    # 3 calls at batch 1, then 3 at the batcher's largest batch, in a worker thread; then the request
    assert held.sizes == [1, 1, 1, 32, 32, 32, 1], held.sizes
    assert len(held.threads) == 2  # the warm-up's thread and the event loop's
    warm = [line for line in lines if line.startswith("warm-up:")]
    assert len(warm) == 1 and "batch sizes [1, 32]" in warm[0] and "batch 32" in warm[0], lines
    # the warm-up is not counted as predictions: only the one request is
    assert 'mnist_deploy_predictions_total{runtime="onnx"} 1.0' in metrics


def test_a_failed_warm_up_leaves_the_server_live_and_not_ready(model):
    import dataclasses

    class Broken:
        runtime = model.predictor.runtime

        def __call__(self, x):
            raise RuntimeError("the runtime cannot run a batch\nsecond line")

    app = create_app(model=dataclasses.replace(model, predictor=Broken()))
    with TestClient(app) as c:
        deadline = time.monotonic() + 10
        while app.service.warm_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.get("/v2/health/live").status_code == 200
        r = c.get("/health")
        assert r.status_code == 503
        assert r.json() == {"status": "warm-up failed: RuntimeError: the runtime cannot run a batch"}
        assert c.get("/v2/health/ready").status_code == 400
