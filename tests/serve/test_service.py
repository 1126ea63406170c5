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
