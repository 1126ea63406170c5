"""Connection limits below ASGI: a bounded number of open connections, and a deadline per request.

uvicorn times out only idle keep-alive connections, after a response. A client that connects and
sends nothing, or half its headers, or a body a byte at a time, holds a file descriptor for ever;
enough of them (slowloris) use every descriptor, and asyncio then logs a traceback for each refused
``accept()``. This module wraps uvicorn's httptools protocol so that:

* at most ``max_connections`` connections are open per process; a connection over the limit is
  closed at once, and the refusal is logged once per episode (when the limit is reached, and again
  when connections are accepted again), not once per connection;
* a request must arrive whole (headers and body) within ``request_timeout`` seconds of the
  connection opening, or of its first byte on a kept-alive connection; otherwise it is answered
  ``408`` (when no response has started) and closed. A request being handled by the app is never
  timed out here;
* asyncio's "socket.accept() out of system resource" error is logged once, not per accept;
* a shutdown stops accepting without resetting anyone (:func:`stop_accepting`): the listening sockets
  first drop new connection attempts (a kernel socket filter), the connections the kernel had already
  queued are accepted and answered, and only then are the sockets closed (closing a socket with
  connections still queued resets them, their requests unanswered);
* a shutdown (SIGTERM, SIGINT) drains instead of cutting connections: a request being received or
  handled is answered, with ``Connection: close``; an idle kept-alive connection stays open for
  :data:`DRAIN_IDLE_GRACE` seconds, so that a request its client had already sent is read and answered
  (uvicorn closes idle connections at once, and a request in flight then met a reset), and is closed
  after that; a request still unanswered when ``drain_timeout`` is nearly up is answered ``503`` and
  closed, rather than cut off when the process exits.

It subclasses uvicorn's *internal* ``HttpToolsProtocol``: pyproject pins uvicorn to the versions this
was tested with, and tests/serve/test_connections.py fails loudly if what it relies on changes
(:data:`UVICORN_INTERNALS`).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import resource
import socket
import struct
import sys

_LOG = logging.getLogger("uvicorn.error")
_TIMEOUT_BODY = b'{"detail":"request not received in time; connection closed"}'
_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))
_DRAIN_BODY = b'{"detail":"the server is shutting down and could not answer in time; retry"}'
_DRAIN_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%s"
                   % (len(_DRAIN_BODY), _DRAIN_BODY))
DRAIN_IDLE_GRACE = 1.0  # seconds an idle kept-alive connection is kept open after the signal
# What GuardedHttpToolsProtocol uses of uvicorn's internals (checked by a test against the installed uvicorn).
UVICORN_INTERNALS = {
    "HttpToolsProtocol": ("connection_made", "connection_lost", "data_received", "on_headers_complete",
                          "on_message_complete", "on_response_complete", "shutdown"),
    "HttpToolsProtocol()": ("server_state", "cycle", "pipeline", "transport", "loop"),
    "RequestResponseCycle()": ("keep_alive", "response_started", "response_complete"),
}


def default_max_connections() -> int:
    """What one process can hold open, leaving room for the model's files, logs and accept()."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(16, min(4096, soft - 64))


class _Refusals:
    """Logs the first refusal of an episode and the end of it, and counts the ones in between."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.refusing = False
        self.count = 0

    def refused(self, open_now: int) -> None:
        self.count += 1
        if not self.refusing:
            self.refusing = True
            _LOG.warning("refusing new connections: %d open, the --max-connections limit; further refusals "
                         "are counted, not logged", open_now)

    def closed(self, open_now: int) -> None:
        if self.refusing and open_now < self.limit * 9 // 10:
            _LOG.warning("accepting connections again (%d open); refused %d while at the limit", open_now,
                         self.count)
            self.refusing, self.count = False, 0


class _Guarded:
    """The limits and the drain, mixed in before uvicorn's ``HttpToolsProtocol`` (see :func:`guarded_protocol`)."""

    _max_connections: int
    _request_timeout: float
    _drain_timeout: float
    _refusals: _Refusals
    _refused = False
    _deadline: asyncio.TimerHandle | None = None
    _waiting = True  # no complete request since the connection opened or the last response
    _draining = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        open_now = len(self.server_state.connections)
        if open_now >= self._max_connections:
            self._refused = True
            self._refusals.refused(open_now)
            transport.abort()  # no lingering close: the descriptor is freed now
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        if self._refused:
            return
        self._disarm()
        super().connection_lost(exc)
        self._refusals.closed(len(self.server_state.connections))

    def data_received(self, data: bytes) -> None:
        if self._waiting and self._deadline is None:
            self._arm()
        super().data_received(data)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered with Connection: close, then closed

    def on_message_complete(self) -> None:
        self._waiting = False
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._waiting = not self.pipeline  # a pipelined request is complete already

    def shutdown(self) -> None:
        """The server's drain has begun (uvicorn calls this on every open connection)."""
        self._draining = True
        drain = self._drain_timeout
        self.loop.call_later(max(0.0, drain - min(1.0, drain / 10)), self._drain_expired)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # being handled: answered, with Connection: close
        else:
            self.loop.call_later(min(DRAIN_IDLE_GRACE, drain / 2), self._close_if_idle)

    def _close_if_idle(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self._deadline is None and not self.transport.is_closing():
            self.transport.close()  # nothing received since the last answer
        # else a request arrived during the grace: it is answered, with Connection: close

    def _drain_expired(self) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self.transport.write(_DRAIN_RESPONSE)  # the app would not answer before the process exits
            self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._request_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or not self._waiting:
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_TIMEOUT_RESPONSE)  # headers incomplete: nothing else was sent
        elif not self.cycle.response_started:
            self.cycle.keep_alive = False
            self.transport.write(_TIMEOUT_RESPONSE)  # the body never came: the app sees a disconnect
        self.transport.close()


def guarded_protocol(*, max_connections: int, request_timeout: float,
                     drain_timeout: float = 30.0) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the limits and the drain above (pass it as ``uvicorn.Config(http=...)``)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return type("GuardedHttpToolsProtocol", (_Guarded, HttpToolsProtocol), {
        "_max_connections": max_connections, "_request_timeout": request_timeout, "_drain_timeout": drain_timeout,
        "_refusals": _Refusals(max_connections)})


SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)  # Linux's value
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)  # classic BPF: "ret #0", keep no byte of any packet
_TCPI_UNACKED = 24  # offset of tcpi_unacked in struct tcp_info: for a listener, its accept queue's length


def _queued(sock) -> int:
    """Connections the kernel has queued on a listening socket that nobody has accepted yet."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, _TCPI_UNACKED)[0]


async def stop_accepting(sockets, timeout: float = 1.0) -> bool:
    """Let the listening ``sockets`` take no new connection, and wait (at most ``timeout`` s) until the
    ones the kernel had queued are accepted; the caller then closes them. Linux only (elsewhere, and
    when the kernel refuses the filter, returns False at once and the sockets are closed as before).

    A listening socket closed with connections in its accept queue resets them, and their clients have
    typically sent a request already; a socket filter that drops every packet stops new handshakes
    (a client's SYN is retransmitted after a second, and then finds the socket closed: refused), while
    the event loop's accept callback keeps taking what was queued."""
    if not sys.platform.startswith("linux") or not sockets:
        return False
    program = ctypes.create_string_buffer(_DROP_ALL, len(_DROP_ALL))
    fprog = struct.pack("HP", 1, ctypes.addressof(program))  # struct sock_fprog {len; filter*}
    try:
        for sock in sockets:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except (OSError, AttributeError) as exc:
        _LOG.warning("could not stop new connections before closing (%s); queued ones may be reset", exc)
        return False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        await asyncio.sleep(0.01)  # also lets a handshake already under way land in the queue
        if not any(_queued(sock) for sock in sockets):
            return True
    return False


class _OnceFilter(logging.Filter):
    """Lets the first record with a given message through and drops the rest (asyncio's accept errors)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        self.seen += 1
        if self.seen == 1:
            record.msg = f"{record.msg} (logged once; later ones are dropped)"
            return True
        return False


def log_accept_errors_once() -> None:
    """Install :class:`_OnceFilter` on asyncio's logger for its per-accept 'out of system resource' error."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _OnceFilter) for f in logger.filters):
        logger.addFilter(_OnceFilter("socket.accept() out of system resource"))


__all__ = ["DRAIN_IDLE_GRACE", "UVICORN_INTERNALS", "default_max_connections", "guarded_protocol",
           "log_accept_errors_once", "stop_accepting"]
