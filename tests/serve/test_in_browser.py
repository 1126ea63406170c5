"""The drawing page running the model in the browser (onnxruntime-web, WASM), in a real headless Chromium
against the real `mnist-deploy serve` process: 20 MNIST test digits put on the pad (dropped as images,
as a user may), the in-browser digit equal to the server's for all 20, its logits within 1e-4 of ONNX
Runtime in Python on the same input, a tampered model file refused with a visible message, and the
switch disabled with the reason where ORT-web is not installed.

The in-page latency of each prediction is printed and written to test-artifacts/in-browser-latency.json
(reported, never asserted).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from _serving import mnist_test_digits, onnx_artifacts, png_bytes, serve_process

from mnist_deploy.formats.js_web import unavailable as ort_web_unavailable

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
N_DIGITS = 20

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(autouse=True)
def _need_chromium_and_ort_web(need_chromium, monkeypatch):
    reason = ort_web_unavailable()
    if reason:
        import os

        if os.environ.get("MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def folder(trained_mlp, tmp_path_factory, mnist_dir, cache_dir) -> Path:
    return onnx_artifacts(trained_mlp, tmp_path_factory.mktemp("in-browser"), mnist_dir, cache_dir)


@pytest.fixture(scope="module")
def server(folder):
    with serve_process(folder) as (url, _proc):
        yield url


def _open(browser, url):
    context = browser.new_context(viewport={"width": 900, "height": 640})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.locator("#model", has_text="runtime onnx").wait_for()
    return context, page, requests, errors


def _switch_on(page) -> str:
    """Turn "in this browser" on; the note once loading has ended (the radios are disabled meanwhile)."""
    page.locator("#where-browser:not([disabled])").wait_for(state="attached", timeout=15_000)
    page.click("#where-browser")  # a click, not check(): a refused model turns the switch back at once
    page.locator("#where-browser:not([disabled])").wait_for(state="attached", timeout=60_000)
    return page.locator("#browser-note").text_content()


def _drop(page, png: bytes) -> None:
    """Drop ``png`` on the pad as a file, the way a user drags an image onto it."""
    transfer = page.evaluate_handle(
        """(bytes) => { const dt = new DataTransfer();
           dt.items.add(new File([new Uint8Array(bytes)], 'digit.png', {type: 'image/png'})); return dt; }""",
        list(png))
    page.dispatch_event("#pad", "drop", {"dataTransfer": transfer})


def _answers(page) -> tuple[str, str]:
    page.locator("#server-digit:not([data-digit=''])").wait_for(state="attached", timeout=15_000)
    page.locator("#local-digit:not([data-digit=''])").wait_for(state="attached", timeout=15_000)
    return (page.locator("#server-digit").get_attribute("data-digit"),
            page.locator("#local-digit").get_attribute("data-digit"))


def test_twenty_test_digits_in_the_browser_match_the_server_and_onnxruntime(server, browser, folder, mnist_dir):
    import onnxruntime as ort

    from mnist_deploy.data.images import mnist_image

    images, labels = mnist_test_digits(mnist_dir, N_DIGITS)
    session = ort.InferenceSession(str(folder / "mnist_model.onnx"))
    context, page, requests, errors = _open(browser, server)
    try:
        note = _switch_on(page)
        assert "checked" in note and "onnxruntime-web" in note, note
        assert page.evaluate("() => self.crossOriginIsolated") is True
        rows = []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            page.click("#clear")
            _drop(page, png_bytes(np.kron(image, np.ones((10, 10), dtype=np.uint8))))
            server_digit, local_digit = _answers(page)
            last = page.evaluate("() => window.mnistDeployLocal.last")
            x = np.asarray(last["input"], dtype=np.float32).reshape(1, 784)
            expected = session.run(None, {session.get_inputs()[0].name: x})[0][0]
            # the page's preprocessing (mnist_image.js) against the server's, on the very canvas
            canvas_png = page.evaluate("() => document.getElementById('pad').toDataURL('image/png')")
            python_pixels = mnist_image(base64.b64decode(canvas_png.split(",", 1)[1])).ravel()
            rows.append({"label": int(label), "server": int(server_digit), "browser": int(local_digit),
                         "max_abs_logit_diff": float(np.abs(np.asarray(last["logits"]) - expected).max()),
                         "max_abs_pixel_diff": float(np.abs(np.asarray(last["pixels"]) - python_pixels).max()),
                         "ms": last["ms"]})
            assert int(local_digit) == int(np.argmax(expected)), (i, rows[-1])
        # and a digit drawn with the mouse, as a person would
        page.click("#clear")
        box = page.locator("#pad").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.16)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.84, steps=12)
        page.mouse.up()
        page.wait_for_timeout(500)  # the last answers for the finished stroke
        drawn = _answers(page)
        times = page.evaluate("() => window.mnistDeployLocal.times")
        totals = page.evaluate("() => window.mnistDeployLocal.totals")
        page.screenshot(path=str(ARTIFACTS / "in-browser.png"))
    finally:
        context.close()
    p50, total_p50 = float(np.median(times)), float(np.median(totals))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "in-browser-latency.json").write_text(json.dumps(
        {"session_run_ms_p50": p50, "with_preprocessing_ms_p50": total_p50, "n": len(times), "times_ms": times,
         "totals_ms": totals, "digits": rows}, indent=1))
    print(f"\nin-browser prediction over {len(times)} predictions (performance.now(), 5 us steps): session.run "
          f"p50 {p50:.3f} ms; canvas to logits (preprocessing included) p50 {total_p50:.3f} ms")
    assert drawn == ("1", "1"), drawn
    assert [r["browser"] for r in rows] == [r["server"] for r in rows], rows
    assert max(r["max_abs_logit_diff"] for r in rows) <= 1e-4, rows
    assert max(r["max_abs_pixel_diff"] for r in rows) <= 1e-3, rows  # the JS port of mnist_image (0..255)
    assert all(u.startswith(server) for u in requests), [u for u in requests if not u.startswith(server)]
    assert not errors, errors


def test_a_tampered_model_file_is_refused_with_a_visible_message(server, browser):
    context, page, _requests, _errors = _open(browser, server)
    try:
        def tamper(route):
            body = bytearray(route.fetch().body())
            body[len(body) // 2] ^= 0x01  # one bit of one weight
            route.fulfill(body=bytes(body), content_type="application/octet-stream")

        page.route("**/model.onnx", tamper)
        _switch_on(page)
        note = page.locator("#browser-note")
        assert "refused" in note.text_content() and "does not match" in note.text_content()
        assert "error" in note.get_attribute("class")
        assert note.is_visible()
        assert page.is_checked("#where-server") and not page.is_checked("#where-browser")
        _drop(page, png_bytes(np.kron(np.eye(28, dtype=np.uint8) * 255, np.ones((10, 10), dtype=np.uint8))))
        page.locator("#server-digit:not([data-digit=''])").wait_for(state="attached", timeout=15_000)
        assert page.locator("#local-digit").get_attribute("data-digit") == ""
        assert page.evaluate("() => window.mnistDeployLocal.last") is None
    finally:
        context.close()


def test_the_server_serves_the_model_and_ort_web_itself_cross_origin_isolated(server, folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    with httpx.Client(base_url=server, timeout=30) as client:
        info = client.get("/model").json()["browser"]
        assert info["sha256"] == manifest["artifacts"]["onnx"]["sha256"]
        model = client.get(info["model_url"])
        assert hashlib.sha256(model.content).hexdigest() == info["sha256"]
        page = client.get("/")
        assert page.headers["cross-origin-opener-policy"] == "same-origin"
        assert page.headers["cross-origin-embedder-policy"] == "require-corp"
        assert "'wasm-unsafe-eval'" in page.headers["content-security-policy"]
        module = client.get(info["ort_module"])
        assert module.status_code == 200 and module.headers["content-type"].startswith("text/javascript")
        # ORT-web's threads are module workers from these files: without COEP here the browser refuses them
        assert module.headers["cross-origin-embedder-policy"] == "require-corp"
        wasm = client.get(info["ort_path"] + "ort-wasm-simd-threaded.wasm")
        assert wasm.status_code == 200 and wasm.headers["content-type"] == "application/wasm"
        for name in ("ort.webgpu.min.mjs", "ort.min.js.map", "..%2Fpackage.json", "%2E%2E/package.json"):
            assert client.get(info["ort_path"] + name).status_code == 404, name


def test_without_ort_web_the_switch_is_disabled_with_the_reason(folder, browser, tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DEPLOY_JS", str(tmp_path))  # a folder with no node_modules
    with serve_process(folder) as (url, _proc):
        assert httpx.get(url + "/model.onnx").status_code == 404
        context, page, _requests, errors = _open(browser, url)
        try:
            page.locator("#browser-note", has_text="unavailable").wait_for(timeout=15_000)
            assert page.is_disabled("#where-browser")
            assert "scripts/js_env.sh" in page.locator("#browser-note").text_content()
            assert not errors, errors
        finally:
            context.close()
