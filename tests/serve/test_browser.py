"""The drawing page in a real headless Chromium, served by the real `mnist-deploy serve` process.

Uses Debian's /usr/bin/chromium through Playwright's Python package (never a downloaded browser).
Screenshots go to test-artifacts/ (gitignored). With MNIST_DEPLOY_DOCS_SCREENSHOT=docs/screenshot.png
the test also writes the README's screenshot there.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from _serving import onnx_artifacts, serve_process

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.usefixtures("need_chromium")]

# Strokes in canvas coordinates (the canvas is 280 x 280), as a person would draw them.
ONE = [[(140, 45), (140, 235)]]
SEVEN = [[(75, 60), (205, 60), (185, 100), (150, 170), (125, 240)], [(110, 150), (185, 150)]]


def _arc(cx: float, cy: float, r: float, start: float, end: float, n: int = 14) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(math.radians(start + (end - start) * i / n)),
             cy + r * math.sin(math.radians(start + (end - start) * i / n))) for i in range(n + 1)]


THREE = [_arc(140, 95, 50, -150, 90) + _arc(140, 190, 45, -90, 150)]


@pytest.fixture(scope="module")
def server(trained_mlp, tmp_path_factory, mnist_dir, cache_dir):
    folder = onnx_artifacts(trained_mlp, tmp_path_factory.mktemp("browser"), mnist_dir, cache_dir)
    with serve_process(folder) as (url, _proc):
        yield url


def _open(browser, url, **context_args):
    context = browser.new_context(viewport={"width": 800, "height": 520}, **context_args)
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url + "/")
    # Locator waits, not wait_for_function: a string predicate that has to poll is eval'd in the page,
    # which the page's CSP (script-src 'self', no unsafe-eval) refuses, so it failed whenever /model was slow.
    page.locator("#model", has_text="runtime onnx").wait_for()
    return context, page, requests, errors


def _canvas_origin(page) -> tuple[float, float, float]:
    box = page.locator("#pad").bounding_box()
    return box["x"], box["y"], box["width"] / 280


def _draw_mouse(page, strokes) -> None:
    x0, y0, scale = _canvas_origin(page)
    for stroke in strokes:
        page.mouse.move(x0 + stroke[0][0] * scale, y0 + stroke[0][1] * scale)
        page.mouse.down()
        for (xa, ya), (xb, yb) in zip(stroke, stroke[1:], strict=False):
            page.mouse.move(x0 + xb * scale, y0 + yb * scale, steps=max(2, int(abs(xb - xa) + abs(yb - ya)) // 12))
        page.mouse.up()


def _draw_touch(page, strokes) -> None:
    """Finger strokes through the DevTools protocol (touchStart / touchMove / touchEnd)."""
    cdp = page.context.new_cdp_session(page)
    x0, y0, scale = _canvas_origin(page)
    for stroke in strokes:
        pts = []
        for (xa, ya), (xb, yb) in zip(stroke, stroke[1:], strict=False):
            n = max(2, int(abs(xb - xa) + abs(yb - ya)) // 12)
            pts += [(xa + (xb - xa) * i / n, ya + (yb - ya) * i / n) for i in range(n)]
        pts.append(stroke[-1])
        first = {"x": x0 + pts[0][0] * scale, "y": y0 + pts[0][1] * scale}
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [first]})
        for x, y in pts[1:]:
            cdp.send("Input.dispatchTouchEvent",
                     {"type": "touchMove", "touchPoints": [{"x": x0 + x * scale, "y": y0 + y * scale}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def _settled_digit(page, expected: str | None = None) -> str:
    """The digit shown once the answer for the finished drawing has arrived."""
    if expected is not None:
        try:
            page.locator(f"#digit[data-digit='{expected}']").wait_for(state="attached", timeout=15_000)
        except Exception:  # noqa: BLE001 - report what the page shows instead of a bare timeout
            pass
    else:
        page.locator("#digit:not([data-digit=''])[data-digit]").wait_for(state="attached", timeout=15_000)
    page.wait_for_timeout(300)  # let a last in-flight answer land
    return page.locator("#digit").get_attribute("data-digit")


def _bars(page) -> dict[int, float]:
    return {int(li.get_attribute("data-digit")): float(li.get_attribute("data-p") or 0)
            for li in page.locator("#bars li").all()}


def test_drawing_a_vertical_stroke_with_the_mouse_reads_one(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    context, page, requests, errors = _open(browser, server)
    try:
        assert page.locator("#digit").get_attribute("data-digit") == ""
        _draw_mouse(page, ONE)
        digit = _settled_digit(page, "1")
        page.screenshot(path=str(ARTIFACTS / "browser-one.png"))
        assert digit == "1", f"page shows {digit!r}; screenshot in test-artifacts/browser-one.png"
        bars = _bars(page)
        assert max(bars, key=bars.get) == 1 and abs(sum(bars.values()) - 1) < 1e-3
        assert "top" in page.locator('#bars li[data-digit="1"]').get_attribute("class")
        assert "ms on the server" in page.locator("#status").text_content()
        # Clear empties the canvas and the answer.
        page.click("#clear")
        assert page.locator("#digit").get_attribute("data-digit") == ""
        assert all(v == 0 for v in _bars(page).values()) or not page.locator("#bars li.top").count()
        assert page.evaluate("""() => {
            const c = document.getElementById('pad');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            for (let i = 0; i < d.length; i += 4) if (d[i] !== 0) return false;
            return true; }""")
        # Live: answers arrived while drawing, and the page talked to nobody but this server.
        posts = [u for u in requests if u.endswith("/predict")]
        assert len(posts) >= 1
        assert all(u.startswith(server) for u in requests), [u for u in requests if not u.startswith(server)]
        assert not errors, errors
    finally:
        context.close()


def test_drawing_a_seven_with_the_mouse(server, browser):
    context, page, _requests, errors = _open(browser, server)
    try:
        _draw_mouse(page, SEVEN)
        digit = _settled_digit(page, "7")
        page.screenshot(path=str(ARTIFACTS / "browser-seven.png"))
        assert digit == "7", f"page shows {digit!r}; screenshot in test-artifacts/browser-seven.png"
        assert not errors, errors
    finally:
        context.close()


def test_drawing_with_a_finger(server, browser):
    context, page, _requests, errors = _open(browser, server, has_touch=True, is_mobile=False)
    try:
        _draw_touch(page, ONE)
        digit = _settled_digit(page, "1")
        page.screenshot(path=str(ARTIFACTS / "browser-touch.png"))
        assert digit == "1", f"page shows {digit!r}; screenshot in test-artifacts/browser-touch.png"
        assert not errors, errors
    finally:
        context.close()


def test_docs_screenshot(server, browser):
    """Writes the README screenshot when MNIST_DEPLOY_DOCS_SCREENSHOT names a path (else only test-artifacts/)."""
    target = os.environ.get("MNIST_DEPLOY_DOCS_SCREENSHOT")
    context, page, _requests, _errors = _open(browser, server, device_scale_factor=2)
    try:
        page.set_viewport_size({"width": 760, "height": 500})
        _draw_mouse(page, THREE)
        digit = _settled_digit(page, "3")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
        assert digit == "3", f"page shows {digit!r}; screenshot in test-artifacts/page.png"
        if target:
            path = Path(target) if Path(target).is_absolute() else REPO / target
            page.screenshot(path=str(path), full_page=True)
    finally:
        context.close()
