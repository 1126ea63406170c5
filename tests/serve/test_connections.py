"""Slowloris against the real `mnist-deploy serve` process, with real sockets on 127.0.0.1 (issue 9, item 4).

Connections that send half their headers (or half their body) and stop must be timed out; connections
over the limit must be closed at once, with one log line for the episode, not one per connection; and
the server must answer /health again once the slow clients are gone. Bounded: 48 sockets, ~10 s.
"""

from __future__ import annotations

import contextlib
import socket
import time

import httpx
import pytest
from _serving import serve_process

pytestmark = pytest.mark.integration

LIMIT = 24
TIMEOUT_S = 2.0
HALF_HEADERS = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def _open(url: str, payload: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=5)
    with contextlib.suppress(OSError):
        s.sendall(payload)
    return s


def _closed_by_server(s: socket.socket, wait: float) -> tuple[bool, bytes]:
    """(whether the server closed it within ``wait`` seconds, what it sent before closing)."""
    s.settimeout(wait)
    got = b""
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                return True, got
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return True, got
    except TimeoutError:
        return False, got
    return False, got


def test_slow_clients_are_bounded_timed_out_and_logged_once(served):
    args = ("--max-connections", str(LIMIT), "--request-timeout", str(TIMEOUT_S), "--log-level", "info")
    with serve_process(served, *args) as (url, proc):
        socks = []
        try:
            t0 = time.monotonic()
            for _ in range(2 * LIMIT):
                socks.append(_open(url, HALF_HEADERS))
                time.sleep(0.005)
            # The connections over the limit are closed at once (well before the request timeout).
            over = [s for s in socks[LIMIT + 2:]]
            assert all(_closed_by_server(s, 1.0)[0] for s in over), "connections over the limit were kept open"
            # Those within the limit are answered 408 and closed once the request timeout passes.
            held = socks[: LIMIT - 2]
            results = [_closed_by_server(s, TIMEOUT_S + 5) for s in held]
            assert all(closed for closed, _ in results), "a half-sent request was never timed out"
            assert all(got.startswith(b"HTTP/1.1 408") for _, got in results), results[0]
            assert time.monotonic() - t0 < TIMEOUT_S + 6
            # A body that stops halfway is timed out too.
            slow_body = _open(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 100\r\n\r\n{\"pixels\": [")
            closed, got = _closed_by_server(slow_body, TIMEOUT_S + 5)
            assert closed and got.startswith(b"HTTP/1.1 408"), got
            # The server answers normally again.
            assert httpx.get(url + "/health", timeout=5).status_code == 200
        finally:
            for s in socks:
                s.close()
        time.sleep(0.3)
        log = proc.log_path.read_text()
    assert log.count("refusing new connections") == 1, log
    assert "Traceback" not in log, log


def test_a_normal_keep_alive_client_is_not_cut_off(served):
    # The deadline covers receiving a request, never the wait between requests of a kept-alive client
    # (uvicorn's keep-alive timeout does that) nor the time the app takes.
    with serve_process(served, "--request-timeout", "1") as (url, _proc):
        with httpx.Client(timeout=5) as c:
            for _ in range(3):
                assert c.get(url + "/health").status_code == 200
                time.sleep(0.6)
            assert c.post(url + "/predict", json={"pixels": [0] * 784}).status_code == 200
