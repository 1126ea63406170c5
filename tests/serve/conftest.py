"""Fixtures of the serve tests: a real uvicorn server on 127.0.0.1 in a thread of the test process."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def live_server(app, **settings) -> Iterator[str]:
    """Serve ``app`` with uvicorn (httptools, the guarded protocol) on a free loopback port; yield its URL.

    Real sockets and the real HTTP stack, in a thread of this process, so a test can look at the app's
    state too. Stopped (gracefully) when the block exits."""
    import uvicorn

    from mnist_deploy.serve import ServeConfig
    from mnist_deploy.serve.app import uvicorn_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = ServeConfig(log_level="warning", loop="asyncio").replace(**settings)
    server = uvicorn.Server(uvicorn_config(app, config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("the live server did not start")
        time.sleep(0.02)
    app.live_server = server  # a test may start the drain itself: server.should_exit = True
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def live():
    """``with live(app) as url:`` -- see :func:`live_server`."""
    return live_server


@pytest.fixture(scope="session")
def model(served):
    """The served MLP loaded once on ONNX Runtime (read-only: share it, do not change it)."""
    from mnist_deploy.predict import load_model

    return load_model(artifacts=served, runtime="onnx")


@pytest.fixture(scope="session")
def served(request) -> Path:
    """The session's served artifacts (tests/conftest.py), or a folder made by it earlier, named in
    $MNIST_DEPLOY_TEST_SERVED: a local speed-up on a loaded machine (CI leaves it unset). Read-only."""
    prepared = os.environ.get("MNIST_DEPLOY_TEST_SERVED")
    if prepared:
        return Path(prepared)
    return request.getfixturevalue("served")


# -- the browser tests' Chromium (test_browser.py, test_in_browser.py) -----------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def need_chromium(require_system_tool) -> None:
    require_system_tool(str(CHROMIUM), "Debian's Chromium")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium (Playwright) for a test module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()
