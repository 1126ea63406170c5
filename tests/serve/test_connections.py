"""Slowloris against the real `mnist-deploy serve` process, with real sockets on 127.0.0.1 (issue 9, item 4).

Connections that send half their headers (or half their body) and stop must be timed out; connections
over the limit must be closed at once, with one log line for the episode, not one per connection; and
the server must answer /health again once the slow clients are gone. Bounded: 48 sockets, ~10 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from _serving import serve_process, wait_ready

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


# -- issue 18, item 10: a graceful drain on SIGTERM ---------------------------------------------

GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def _responses(s: socket.socket, wait: float) -> tuple[list[tuple[bytes, bytes]], str]:
    """Every response read from ``s`` until the server closes it: ([(head, body)], how it ended:
    "eof", "reset" or "timeout")."""
    s.settimeout(wait)
    data, out = b"", []
    deadline = time.monotonic() + wait
    end = "timeout"
    try:
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                end = "eof"
                break
            data += chunk
    except ConnectionResetError:
        end = "reset"
    except TimeoutError:
        pass
    while b"\r\n\r\n" in data:
        head, rest = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        out.append((head.lower(), rest[:length]))
        data = rest[length:]
    assert not data, f"a response was cut short: {data[:200]!r}"
    return out, end


def test_sigterm_drains_keep_alive_clients_without_a_reset(served, mnist_dir):
    from _serving import mnist_test_digits

    images, _ = mnist_test_digits(mnist_dir, 64)
    body = json.dumps({"pixels": [a.ravel().tolist() for a in images]}).encode()
    post = (b"POST /predict/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    with serve_process(served, "--workers", "2", "--drain-timeout", "10", "--log-level", "info") as (url, proc):
        socks = [_open(url, GET_HEALTH) for _ in range(16)]  # 16 kept-alive clients, each answered once
        for s in socks:
            _until_ready(s)
        for s in socks[:8]:
            s.sendall(post)  # sent, and then the signal
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.4)
        for s in socks[8:12]:
            s.sendall(GET_HEALTH)  # sent after the signal, while the server drains
        ended = [_responses(s, 30) for s in socks]  # socks[12:] stay idle
        rc = proc.wait(40)
        log = proc.log_path.read_text()
    for s in socks:
        s.close()
    assert [end for _, end in ended] == ["eof"] * 16, ended  # closed cleanly, never reset
    for answers, _ in ended[:8]:
        assert len(answers) == 1 and answers[0][0].startswith((b"http/1.1 200", b"http/1.1 503")), answers
        if answers[0][0].startswith(b"http/1.1 200"):
            assert len(json.loads(answers[0][1])["predictions"]) == 64
    for answers, _ in ended[8:12]:
        assert len(answers) == 1, answers
        head = answers[0][0]
        assert head.startswith((b"http/1.1 503", b"http/1.1 200")), head
        if head.startswith(b"http/1.1 503"):  # readiness has turned: the answer closes the connection
            assert b"connection: close" in head and b"draining" in answers[0][1]
    assert all(answers == [] for answers, _ in ended[12:])
    assert rc == 0, log
    assert "Traceback" not in log, log


def _until_ready(s: socket.socket, timeout: float = 20.0) -> None:
    """Read the answer to the GET /health already sent on ``s``, and ask again until it is 200: each kept-alive
    connection stays with one worker, and each worker turns ready only after its own warm-up."""
    deadline = time.monotonic() + timeout
    while True:
        head, _ = _responses_until_one(s)
        if head.startswith(b"HTTP/1.1 200"):
            return
        assert head.startswith(b"HTTP/1.1 503") and time.monotonic() < deadline, head
        time.sleep(0.05)
        s.sendall(GET_HEALTH)


def _responses_until_one(s: socket.socket) -> tuple[bytes, bytes]:
    s.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        rest += s.recv(65536)
    return head, rest


def test_a_request_that_would_outlast_the_drain_gets_a_clean_503(live, model):
    import anyio

    from mnist_deploy.serve import create_app

    app = create_app(model=model)
    with live(app, drain_timeout=1.5) as url:
        limiter = app.fastapi.state.decoders = anyio.CapacityLimiter(1)
        holder = object()

        async def hold() -> None:  # on the server's loop: every decoder busy, an upload waits for ever
            limiter.acquire_on_behalf_of_nowait(holder)

        asyncio.run_coroutine_threadsafe(hold(), app.live_server.servers[0].get_loop()).result(10)
        png = _png_digit()
        upload = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(png), png))
        s = _open(url, upload)
        time.sleep(0.3)
        t0 = time.monotonic()
        app.live_server.should_exit = True  # the drain begins
        answers, end = _responses(s, 10)
        waited = time.monotonic() - t0
        s.close()
    assert end == "eof" and len(answers) == 1, (answers, end)
    head, body = answers[0]
    assert head.startswith(b"http/1.1 503") and b"connection: close" in head, head
    assert b"shutting down" in body
    assert waited < 10


def _png_digit() -> bytes:
    import numpy as np
    from _serving import png_bytes

    a = np.zeros((28, 28), np.uint8)
    a[6:22, 12:16] = 255
    return png_bytes(a)


def test_readiness_turns_503_when_the_drain_begins(model):
    from starlette.testclient import TestClient

    from mnist_deploy.serve import create_app

    app = create_app(model=model)
    name = model.manifest["model"]["name"]
    with TestClient(app) as c:
        assert wait_ready(c).status_code == 200 and c.get("/v2/health/ready").status_code == 200
        app.service.begin_drain()
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        assert c.get("/v2/health/ready").status_code == 400  # the spec: a 4xx is "not ready"
        assert c.get(f"/v2/models/{name}/ready").status_code == 400
        assert c.post("/predict", json={"pixels": [0] * 784}).status_code == 200  # what arrives is answered


def test_the_uvicorn_internals_the_protocol_relies_on_are_there():
    import importlib.metadata
    import inspect

    import uvicorn
    from uvicorn.protocols.http import httptools_impl

    from mnist_deploy.serve.connections import UVICORN_INTERNALS

    version = tuple(int(p) for p in importlib.metadata.version("uvicorn").split(".")[:2])
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    lo, hi = re.search(r'"uvicorn\[standard\]>=([\d.]+),<([\d.]+)"', pyproject).groups()
    assert tuple(int(p) for p in lo.split(".")[:2]) <= version < tuple(int(p) for p in hi.split(".")[:2])
    cls = httptools_impl.HttpToolsProtocol
    for name in UVICORN_INTERNALS["HttpToolsProtocol"]:
        assert callable(getattr(cls, name, None)), f"uvicorn's HttpToolsProtocol has no {name}()"
    init = inspect.getsource(cls.__init__)
    for name in UVICORN_INTERNALS["HttpToolsProtocol()"]:
        assert f"self.{name} " in init or f"self.{name}:" in init, f"uvicorn's HttpToolsProtocol has no .{name}"
    cycle = inspect.getsource(httptools_impl.RequestResponseCycle)
    for name in UVICORN_INTERNALS["RequestResponseCycle()"]:
        assert f"self.{name} =" in cycle, f"uvicorn's RequestResponseCycle has no {name}"
    assert "if not self.keep_alive" in cycle  # keep_alive False still means Connection: close, then close
    shutdown = inspect.getsource(uvicorn.Server.shutdown)
    assert "connection.shutdown()" in shutdown and "timeout_graceful_shutdown" in shutdown
    assert list(inspect.signature(uvicorn.Server.handle_exit).parameters) == ["self", "sig", "frame"]


# -- issue 21: SIGTERM in the middle of load -----------------------------------------------------


class _Client(threading.Thread):
    """A keep-alive client sending POST /predict one after another on one connection, reconnecting when
    an answer says ``Connection: close``, until a connection is refused (the server has stopped listening).

    Records how each request it sent ended: "200", "503", "reset" (the connection was reset after the
    request was sent), "unanswered" (closed without an answer) -- and "refused" connects, which are fine."""

    def __init__(self, url: str, request: bytes, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        host, port = url.removeprefix("http://").split(":")
        self.addr, self.request, self.stop = (host, int(port)), request, stop
        self.outcomes: list[tuple[float, str]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                s = socket.create_connection(self.addr, timeout=30)
            except ConnectionRefusedError:
                self.outcomes.append((time.monotonic(), "refused"))
                return
            with s:
                while not self.stop.is_set():
                    end = self._one(s)
                    self.outcomes.append((time.monotonic(), end))
                    if end != "200":
                        break

    def _one(self, s: socket.socket) -> str:
        try:
            s.sendall(self.request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    return "unanswered"
                data += chunk
            head, rest = data.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(rest) < length:
                chunk = s.recv(65536)
                if not chunk:
                    return "unanswered"
                rest += chunk
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        except TimeoutError:
            return "unanswered"
        status = head.split(b" ", 2)[1].decode()
        if b"connection: close" in head.lower():
            return f"{status}-close" if status != "200" else "200-close"
        return status


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_under_load_answers_every_request_sent_and_exits_0_within_the_drain(served, workers):
    body = json.dumps({"pixels": [0] * 784}).encode()
    request = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
               % (len(body), body))
    drain = 6.0
    with serve_process(served, "--workers", workers, "--drain-timeout", str(drain), "--log-level", "info") as (url, proc):
        stop = threading.Event()
        clients = [_Client(url, request, stop) for _ in range(32)]
        for c in clients:
            c.start()
        time.sleep(1.5)  # under load
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(drain + 10)
        finally:
            exited = time.monotonic() - t_signal
            stop.set()
            for c in clients:
                c.join(35)
        log = proc.log_path.read_text()
    outcomes = [o for c in clients for o in c.outcomes]
    counts = {k: sum(1 for _, o in outcomes if o == k) for k in {o for _, o in outcomes}}
    before = sum(1 for t, o in outcomes if t < t_signal and o.startswith("200"))
    after = sum(1 for t, o in outcomes if t >= t_signal and o.startswith("200"))
    assert before > 32 and after > 0, counts  # load before the signal; requests in flight answered after it
    bad = {k: v for k, v in counts.items() if k not in ("200", "200-close", "503-close", "refused")}
    assert not bad, f"requests already sent were not answered cleanly: {counts}"
    assert rc == 0, log
    assert exited < drain + 3, f"exited {exited:.1f} s after SIGTERM with --drain-timeout {drain}"
    assert "Traceback" not in log, log


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux socket filter")
def test_stop_accepting_drops_new_handshakes_and_waits_for_the_queued_ones():
    # Closing a listening socket resets the connections queued on it, whose clients have sent their
    # requests; stop_accepting first stops new handshakes, then waits until the queue is taken.
    import select

    from mnist_deploy.serve.connections import _queued, stop_accepting

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    addr = listener.getsockname()
    queued = [socket.create_connection(addr, timeout=5) for _ in range(3)]
    for s in queued:
        s.sendall(GET_HEALTH)
    time.sleep(0.05)
    assert _queued(listener) == 3

    async def scenario():
        waiting = asyncio.create_task(stop_accepting([listener], timeout=5))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the queue is not empty yet
        late = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        late.setblocking(False)
        late.connect_ex(addr)
        await asyncio.sleep(0.3)
        connected = bool(select.select([], [late], [], 0)[1])
        accepted = [listener.accept()[0] for _ in range(3)]  # what the event loop's accept callback does
        return await waiting, connected, accepted, late

    done, late_connected, accepted, late = asyncio.run(scenario())
    try:
        assert done is True
        assert not late_connected, "a new connection was let in after stop_accepting"
        assert all(a.recv(1024) == GET_HEALTH for a in accepted)  # the queued requests, intact
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        for s in [*queued, *accepted, late, listener]:
            s.close()
