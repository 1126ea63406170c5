"""Several server processes on one port: a small supervisor over spawned uvicorn workers.

The parent binds the listening socket once (so ``--port 0`` gives every worker the same port) and
starts ``workers`` processes with multiprocessing's *spawn* context, each handed the socket. Each
worker builds its own app, loads its own copy of the model with its own share of the runtime's
threads, and runs uvicorn (uvloop, httptools, the guarded protocol of :mod:`.connections`) on the
shared socket; the kernel hands each new connection to whichever worker accepts it first. With
``config.grpc_port`` each worker also serves gRPC (:mod:`.grpc_v2`), binding that port itself with
SO_REUSEPORT (grpc takes no socket handed to it), so the kernel spreads gRPC connections the same way.

Why not ``uvicorn.run(workers=N)``: it needs the app as an import string and a picklable config,
while our protocol class is made per run; a supervisor of our own is ~100 lines and also owns the
metrics folder. Spawn rather than fork: the parent has loaded ONNX Runtime / torch (to check the
artifact before starting anything), and forking a process with runtime threads is unsafe.

Metrics: before the first worker starts, the parent makes a private temporary folder and sets
``PROMETHEUS_MULTIPROC_DIR`` to it (the workers inherit it), so /metrics sums every worker; a worker
that exits is marked dead (:func:`prometheus_client.multiprocess.mark_process_dead`) and replaced;
the folder is removed when the parent exits.

SIGINT or SIGTERM to the parent stops the workers gracefully (SIGTERM each: uvicorn finishes the
requests in flight and runs the lifespan shutdown) and waits for them, then kills any left after
``stop_timeout`` seconds. A parent that dies without a say (SIGKILL, the OOM killer) takes its workers
with it: each asked Linux for SIGTERM on its parent's death. Only the metrics folder is left then.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time

from .config import ServeConfig
from .metrics import MULTIPROC_ENV

_LOG = logging.getLogger("uvicorn.error")


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int, threads: int | None = None) -> int:
    """``threads`` if given, else the usable cores shared out: max(1, cores // workers)."""
    return threads if threads is not None else max(1, usable_cores() // max(1, workers))


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when the host is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it a response written in two parts waits for a delayed ACK (~40 ms a request, measured).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so a
    supervisor killed with SIGKILL (or the OOM killer) does not leave its workers serving on the port.
    SIGTERM lets uvicorn finish the requests in flight. Elsewhere this is a no-op."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        _LOG.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); this worker outlives a killed parent",
                     ctypes.get_errno())
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(sock: socket.socket, config: ServeConfig, parent_pid: int | None = None, ready=None) -> None:
    """One worker process: its own app and model, uvicorn on the shared socket. ``ready`` (an Event)
    is set once the app's startup has run and the socket is served."""
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    from .app import create_app, serve

    serve(create_app(config), config, sockets=[sock], ready=ready)


class _Slot:
    """One worker position: its process, when it started, whether it said it was ready, its record."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc = None
        self.ready = None  # a multiprocessing Event per start
        self.started = 0.0
        self.start_failures = 0  # consecutive deaths before ready
        self.quick_deaths = 0  # consecutive deaths within stable_after of starting
        self.restart_at: float | None = None


def _backoff(deaths: int, base: float, most: float) -> float:
    """Seconds before the next start after ``deaths`` consecutive quick deaths: 0 for the first, then
    base, 2 base, 4 base, ... up to ``most``."""
    return 0.0 if deaths <= 1 else min(most, base * 2 ** (deaths - 2))


def _bind_all(config: ServeConfig) -> list[socket.socket]:
    """One listening socket per worker on the same port (SO_REUSEPORT), or one shared by all."""
    sock = bind_socket(config.host, config.port, reuse_port=config.reuse_port)
    if config.reuse_port and hasattr(socket, "SO_REUSEPORT"):
        return [sock] + [bind_socket(config.host, sock.getsockname()[1], reuse_port=True)
                         for _ in range(config.workers - 1)]
    return [sock] * config.workers


class _Supervisor:
    """Starts a worker per slot, replaces the ones that die (with backoff) and stops them all."""

    def __init__(self, config: ServeConfig, socks: list[socket.socket], metrics_dir: str, *,
                 max_start_failures: int, restart_backoff: float, max_backoff: float, stable_after: float) -> None:
        self.config, self.socks, self.metrics_dir = config, socks, metrics_dir
        self.max_start_failures, self.restart_backoff = max_start_failures, restart_backoff
        self.max_backoff, self.stable_after = max_backoff, stable_after
        self.ctx = multiprocessing.get_context("spawn")
        self.slots = [_Slot(i) for i in range(config.workers)]
        self.procs: list = []  # every process started and not yet reaped, for the shutdown

    def start(self, slot: _Slot) -> None:
        slot.ready = self.ctx.Event()
        p = self.ctx.Process(target=_worker_main, args=(self.socks[slot.index], self.config, os.getpid()),
                             kwargs={"ready": slot.ready}, name="mnist-deploy-worker")
        p.start()  # the same socket as before: its queued connections are not lost
        slot.proc, slot.started, slot.restart_at = p, time.monotonic(), None
        self.procs.append(p)

    def reap(self, slot: _Slot) -> None:
        """A slot's process has exited: record why, and when to start the next one (or give up)."""
        from prometheus_client import multiprocess

        p, now = slot.proc, time.monotonic()
        multiprocess.mark_process_dead(p.pid, self.metrics_dir)
        self.procs.remove(p)
        was_ready = slot.ready.is_set()
        slot.proc = None
        slot.start_failures = 0 if was_ready else slot.start_failures + 1
        slot.quick_deaths = slot.quick_deaths + 1 if now - slot.started < self.stable_after else 1
        if slot.start_failures >= self.max_start_failures:
            raise RuntimeError(f"worker {p.pid} exited with code {p.exitcode} before it was ready: "
                               f"{slot.start_failures} starts in a row failed; giving up (see its log above)")
        delay = _backoff(slot.quick_deaths, self.restart_backoff, self.max_backoff)
        slot.restart_at = now + delay
        alive = sum(1 for s in self.slots if s.proc is not None)
        _LOG.warning("worker %d exited with code %s %s; starting another in %.1f s (%d of %d workers serving%s)",
                     p.pid, p.exitcode, "after it was ready" if was_ready else "before it was ready", delay, alive,
                     len(self.slots), f"; {slot.start_failures} failed start(s) in a row, giving up at "
                                      f"{self.max_start_failures}" if slot.start_failures else "")

    def run(self, stop: threading.Event) -> None:
        for slot in self.slots:
            self.start(slot)
        while not stop.wait(0.2):
            for slot in self.slots:
                if stop.is_set():
                    break
                if slot.proc is not None and slot.proc.exitcode is not None:
                    self.reap(slot)
                if slot.proc is None and time.monotonic() >= slot.restart_at:
                    self.start(slot)

    def stop_all(self, timeout: float) -> None:
        """SIGTERM every worker (they drain), wait ``timeout`` for each, then kill what is left."""
        from prometheus_client import multiprocess

        for p in self.procs:
            if p.exitcode is None and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        for p in self.procs:
            p.join(timeout)
            if p.exitcode is None:
                _LOG.warning("worker %d did not stop within %gs; killing it", p.pid, timeout)
                p.kill()
                p.join()
            if p.pid is not None:
                multiprocess.mark_process_dead(p.pid, self.metrics_dir)


def run_workers(config: ServeConfig, *, announce=print, max_start_failures: int = 5, restart_backoff: float = 0.5,
                max_backoff: float = 10.0, stable_after: float = 30.0) -> None:
    """Serve with ``config.workers`` processes on one port until SIGINT or SIGTERM (see the module docstring).

    Each worker builds its app from ``config`` (no model object: each loads its own).
    ``config.reuse_port``: each worker gets its own listening socket on the port (SO_REUSEPORT; the
    kernel spreads new connections evenly over them) rather than all sharing one (whoever accepts first).
    A worker is given ``config.drain_timeout`` (and a little more) to drain before it is killed.
    A worker that dies is replaced, after a backoff when replacements keep dying within ``stable_after``
    seconds; the server gives up only after ``max_start_failures`` starts in a row that never got ready.
    """
    socks = _bind_all(config)
    metrics_dir = tempfile.mkdtemp(prefix="mnist-deploy-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir
    stop = threading.Event()
    handlers = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    supervisor = _Supervisor(config, socks, metrics_dir, max_start_failures=max_start_failures,
                             restart_backoff=restart_backoff, max_backoff=max_backoff, stable_after=stable_after)
    try:
        grpc = f" and gRPC on {config.host}:{config.grpc_port}" if config.grpc_port else ""
        announce(f"listening on http://{config.host}:{socks[0].getsockname()[1]}{grpc} with {config.workers} worker "
                 f"processes (parent pid {os.getpid()})")
        supervisor.run(stop)
    finally:
        # The parent's copies of the listening sockets go first: once a draining worker closes its own,
        # the socket is closed and a new connection is refused, rather than queued where nobody will
        # accept it and reset, its request unanswered, when the parent exits (issue 21).
        for s_ in set(socks):
            s_.close()
        supervisor.stop_all(config.drain_timeout + 5)
        for s, h in handlers.items():
            signal.signal(s, h)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous


__all__ = ["bind_socket", "run_workers", "threads_per_worker", "usable_cores"]
