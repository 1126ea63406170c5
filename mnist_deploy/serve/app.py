"""Assembling the server: the FastAPI app with its routes and handlers, wrapped in the guard; and uvicorn."""

from __future__ import annotations

import signal
import threading
from importlib import resources

import anyio
from fastapi import FastAPI

from ..formats.js_web import ORT_WASM_FILES
from ..predict import LoadedModel, load_model
from .config import MAX_BODY_BYTES, REQUEST_TIMEOUT, ServeConfig
from .connections import default_max_connections, guarded_protocol, log_accept_errors_once, stop_accepting
from .guard import Guard
from .in_browser import ORT_URL, load_in_browser
from .routes import HANDLERS, IMAGE_DECODERS, STATIC_FILES, router
from .service import Service, bound_image_metadata
from .v2 import router as v2_router

KEEP_ALIVE_TIMEOUT = 5  # seconds an idle kept-alive connection stays open


def _routes(*routers) -> tuple[str, ...]:
    """Every concrete path the routers answer (the metrics' route labels); templated paths are expanded."""
    paths = []
    for route in (r for group in routers for r in group.routes):
        path = getattr(route, "path", None)
        if path is None:
            continue
        if path == "/static/{name}":
            paths.extend(f"/static/{n}" for n in STATIC_FILES)
        elif path == ORT_URL + "{name}":
            paths.extend(ORT_URL + n for n in ORT_WASM_FILES)
        elif "{" not in path:
            paths.append(path)
    return tuple(paths)


def create_app(config: ServeConfig | None = None, *, model: LoadedModel | None = None, fast_path: bool = True,
               **settings):
    """The ASGI app. Serves ``model`` if given, else loads ``config.artifacts`` for ``config.runtime`` at startup.

    ``settings`` are :class:`.config.ServeConfig` fields that override ``config`` (or the defaults):
    ``max_body_bytes``, ``max_batch_size`` (> 1 turns dynamic batching on for every route, see
    :class:`~.batching.DynamicBatcher`), ``grpc_port`` (non-zero: the Open Inference Protocol's gRPC service
    on that port, :mod:`.grpc_v2`, started with the app), ... ``/health`` answers 503 until the model is loaded. The
    returned object is the FastAPI app wrapped in :class:`.guard.Guard` (body limit, metrics, the JSON
    fast path unless ``fast_path`` is False); the FastAPI app itself is its ``.fastapi`` and the
    service its ``.service``.
    """
    from .. import __version__

    config = (config or ServeConfig()).replace(**settings)
    bound_image_metadata()

    async def lifespan(app):
        service = app.state.service
        if service.model is None:
            service.model = await anyio.to_thread.run_sync(
                lambda: load_model(artifacts=config.artifacts, runtime=config.runtime, device=config.device,
                                   threads=config.threads))
        app.state.in_browser = await anyio.to_thread.run_sync(
            lambda: load_in_browser(config.artifacts, service.model.manifest))
        service.start()
        grpc_server = None
        if config.grpc_port:  # on this loop: the gRPC calls share the batcher with the HTTP routes
            from .grpc_v2 import start_grpc

            grpc_server = await start_grpc(service, config)
        freeze_startup_objects()
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop()  # its calls in flight answered before the batcher closes
            await service.stop()

    app = FastAPI(
        title="mnist-deploy", version=__version__, lifespan=lifespan,
        description="Handwritten digit recognition (MNIST). POST an image or 784 pixel values to /predict; "
                    "draw one at /. Errors are JSON `{\"detail\": \"...\"}` with a 4xx status.",
    )
    app.include_router(router)
    app.include_router(v2_router)
    for kind, handler in HANDLERS:
        app.add_exception_handler(kind, handler)
    service = Service(model, config, routes=_routes(app, router, v2_router))
    static_dir = resources.files("mnist_deploy") / "static"
    app.state.service = service
    app.state.decoders = anyio.CapacityLimiter(IMAGE_DECODERS)
    app.state.page = (static_dir / "index.html").read_bytes()
    app.state.static = {name: ((static_dir / name).read_bytes(), kind) for name, kind in STATIC_FILES.items()}

    guarded = Guard(app, service, fast_path=fast_path)
    guarded.fastapi = app
    guarded.service = service
    return guarded


def freeze_startup_objects() -> None:
    """Keep the garbage collector's full passes off what startup loaded.

    The runtime, FastAPI and the model leave several hundred thousand long-lived objects; a full
    (generation 2) collection walks them all, and under load one came every second or so and stopped
    the event loop for up to 150 ms, every request in flight waiting (measured with a ``gc.callbacks``
    probe during benchmarks/bench_serve.py). ``gc.freeze()`` moves them to a generation the collector
    never visits, so a collection walks only what requests allocate.
    """
    import gc

    gc.collect()
    gc.freeze()


def uvicorn_config(app, config: ServeConfig | None = None, **uvicorn_settings):
    """The ``uvicorn.Config`` every server process runs: httptools with the limits and the graceful drain
    of :mod:`.connections`, and ``config.loop`` (uvloop or asyncio's own)."""
    import uvicorn

    config = config or ServeConfig()
    log_accept_errors_once()
    protocol = guarded_protocol(max_connections=config.max_connections or default_max_connections(),
                                request_timeout=config.request_timeout, drain_timeout=config.drain_timeout)
    return uvicorn.Config(app, log_level=config.log_level, access_log=config.access_log, server_header=False,
                          timeout_keep_alive=KEEP_ALIVE_TIMEOUT, lifespan="on", http=protocol, loop=config.loop,
                          timeout_graceful_shutdown=config.drain_timeout, **uvicorn_settings)


def serve(app, config: ServeConfig | None = None, *, sockets=None, ready=None) -> None:
    """Serve ``app`` with uvicorn until SIGINT or SIGTERM, then drain (see :mod:`.connections`).

    On ``sockets`` (a worker of :func:`.workers.run_workers`), else on ``config.host:config.port``.
    Readiness (``/health``, v2 ready, gRPC ``ServerReady``) turns false the moment the signal arrives, and
    the gRPC server, if any, begins its drain (:meth:`.grpc_v2.GrpcServer.drain`). ``ready`` (an Event, for
    the worker supervisor) is set once the app's startup has run and the socket is served.
    """
    import uvicorn

    config = config or ServeConfig()
    where = {} if sockets else {"host": config.host, "port": config.port}
    service = getattr(app, "service", None)

    class DrainingServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if ready is not None and not self.should_exit:
                ready.set()

        def handle_exit(self, sig, frame) -> None:
            if service is not None:
                service.begin_drain()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None) -> None:
            # Take what the kernel has queued before uvicorn closes the listening sockets (which would
            # reset those connections, their requests sent and never answered).
            await stop_accepting(sockets or [s for srv in self.servers for s in srv.sockets])
            await super().shutdown(sockets=sockets)

    server = DrainingServer(uvicorn_config(app, config, **where))
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets=sockets)
        return
    # uvicorn raises the signal again once it has drained; SIGTERM's default action would then kill the
    # process (exit -15). A drained server has done what SIGTERM asks: exit 0.
    previous = signal.signal(signal.SIGTERM, _exit_zero)
    try:
        server.run(sockets=sockets)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_zero(_sig, _frame) -> None:
    raise SystemExit(0)


def run_server(app, config: ServeConfig | None = None, **settings) -> None:
    """Serve ``app`` in this process (``settings``: :class:`.config.ServeConfig` fields overriding ``config``)."""
    serve(app, (config or ServeConfig()).replace(**settings))


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["MAX_BODY_BYTES", "REQUEST_TIMEOUT", "create_app", "is_loopback", "run_server", "serve", "uvicorn_config"]
