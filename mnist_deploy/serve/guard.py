"""The guard: plain ASGI around the whole app, for what must happen before (or instead of) FastAPI.

* A ``Content-Length`` over the limit is answered 413 from the header, the body unread; a streamed
  body is counted and cut off with a 413 as soon as it passes the limit.
* Every request is counted and timed for ``/metrics`` (labels from fixed sets, see :mod:`.metrics`).
  A client that hangs up before its answer has started is counted as ``499`` (nginx's "client closed
  request"), whatever the app did next: no response reached anyone, and a client must not be able to
  raise the server's 5xx (or 4xx) rate by leaving.
* ``POST /predict`` with a JSON body (the hot path) is answered here by the same
  :func:`.routes.predict_json` the FastAPI route uses, skipping the framework's routing and
  middleware stack, which costs more than the model call itself (ab, 5,000 requests, 16 clients:
  about 3,450 req/s against 2,850 through the FastAPI route). ``POST /v2/models/{name}[/versions/{v}]/infer``
  (JSON or binary tensors) is answered here the same way, by :func:`.v2.infer_reply`.
"""

from __future__ import annotations

import time

from ..errors import MnistDeployError
from .parsing import dumps
from .routes import error_reply, predict_json
from .service import Service
from .v2 import BINARY_HEADER, infer_path, infer_reply

CLIENT_CLOSED = 499


_V2_HEADERS = (BINARY_HEADER.encode(), b"content-encoding")


def _headers(scope) -> tuple[bytes | None, bytes]:
    length, ctype = None, b""
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = value
        elif name == b"content-type":
            ctype = value
    return length, ctype


def _v2_headers(scope) -> dict[bytes, str]:
    return {name: value.decode("latin-1") for name, value in scope["headers"] if name in _V2_HEADERS}


class _Exchange:
    """One request as the guard sees it: the body received so far, the status sent, whether the guard
    itself answered (later app output is then dropped), and whether the client left before an answer."""

    def __init__(self, receive, send, limit: int) -> None:
        self._receive, self._send, self.limit = receive, send, limit
        self.status = 500  # what an app that raises without answering leaves
        self.started = self.responded = self.disconnected = False
        self.received = 0

    def final_status(self) -> int:
        return CLIENT_CLOSED if self.disconnected else self.status

    async def send(self, message) -> None:
        if self.responded:
            return
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
        await self._send(message)

    async def reply(self, code: int, body: bytes, close: bool = False, extra: dict[str, str] | None = None) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if extra:  # replaces the content type too
            headers = [h for h in headers if h[0].decode() not in extra]
            headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items())
        if close:
            headers.append((b"connection", b"close"))
        await self._send({"type": "http.response.start", "status": code, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})
        self.status, self.started, self.responded = code, True, True

    async def receive(self):
        if self.responded:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.started:
            self.disconnected = True
        elif message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                # A streamed body ran past the limit: answer now, and tell the app the client left.
                await self.reply(413, dumps({"detail": f"request body is over the limit of {self.limit:,} bytes"}),
                                 close=True)
                return {"type": "http.disconnect"}
        return message

    async def body(self) -> bytes | None:
        """The whole body, or None when the client left (or the 413 above was sent)."""
        chunks = []
        while True:
            message = await self.receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)


class Guard:
    """Wraps the FastAPI app (cheaper than BaseHTTPMiddleware, and sees every request first)."""

    def __init__(self, app, service: Service, fast_path: bool = True) -> None:
        self.app = app
        self.service = service
        self.fast_path = fast_path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        ex = _Exchange(receive, send, self.service.max_body_bytes)
        try:
            length, ctype = _headers(scope)
            if await self._refused_by_length(ex, length):
                return
            if (self.fast_path and scope["path"] == "/predict" and scope["method"] == "POST"
                    and ctype.split(b";", 1)[0].strip().lower() == b"application/json"):
                body = await ex.body()
                if body is not None:
                    await ex.reply(*await predict_json(self.service, body))  # no framework, no thread hop
                return
            if self.fast_path and scope["method"] == "POST" and (target := infer_path(scope["path"])):
                await self._v2_infer(ex, scope, *target)
                return
            try:
                await self.app(scope, ex.receive, ex.send)
            except Exception:
                if not (ex.responded or ex.disconnected):
                    raise  # a real bug: let uvicorn log it (FastAPI has already answered 500)
        finally:
            self.service.metrics.request(scope["method"], scope["path"], ex.final_status(), time.perf_counter() - t0)

    async def _v2_infer(self, ex: _Exchange, scope, name: str, version: str | None) -> None:
        """A v2 infer request, answered as the FastAPI route would (:func:`.v2.infer_reply`), without it."""
        body = await ex.body()
        if body is None:
            return
        headers = _v2_headers(scope)
        try:
            out, extra = await infer_reply(self.service, name, version, body,
                                           headers.get(_V2_HEADERS[0]), headers.get(b"content-encoding", ""))
        except MnistDeployError as exc:
            await ex.reply(*error_reply(exc, scope["path"]))
            return
        await ex.reply(200, out, extra=extra)

    async def _refused_by_length(self, ex: _Exchange, length: bytes | None) -> bool:
        """Answer a bad or over-limit ``Content-Length`` from the header alone (the body is never read)."""
        if length is None:
            return False
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            detail = f"invalid Content-Length header: {length[:40].decode('latin-1')!r}"
            await ex.reply(400, dumps({"detail": detail}), close=True)
            return True
        if n > ex.limit:
            detail = f"request body of {n:,} bytes is over the limit of {ex.limit:,} bytes"
            await ex.reply(413, dumps({"detail": detail}), close=True)
            return True
        return False


__all__ = ["CLIENT_CLOSED", "Guard"]
