"""Assembling the server: the FastAPI app with its routes and handlers, wrapped in the guard; and uvicorn."""

from __future__ import annotations

from importlib import resources

import anyio
from fastapi import FastAPI

from ..data.images import MAX_IMAGE_PIXELS
from ..formats import DEFAULT_RUNTIME
from ..predict import LoadedModel, load_model
from .connections import default_max_connections, guarded_protocol, log_accept_errors_once
from .guard import Guard
from .routes import HANDLERS, IMAGE_DECODERS, MAX_BATCH, STATIC_FILES, router
from .service import Service
from .v2 import router as v2_router

MAX_BODY_BYTES = 1 << 20  # 1 MiB
REQUEST_TIMEOUT = 10.0  # seconds for a request to arrive whole (headers and body)
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
        elif "{" not in path:
            paths.append(path)
    return tuple(paths)


def create_app(*, model: LoadedModel | None = None, artifacts="artifacts", runtime: str = DEFAULT_RUNTIME,
               device: str = "cpu", threads: int | None = 1, max_body_bytes: int = MAX_BODY_BYTES,
               max_image_pixels: int = MAX_IMAGE_PIXELS, max_batch: int = MAX_BATCH, fast_path: bool = True,
               max_batch_size: int = 0, max_queue_delay_us: int = 0, preferred_batch_sizes: tuple[int, ...] = ()):
    """The ASGI app. Serves ``model`` if given, else loads ``artifacts`` for ``runtime`` at startup.

    ``max_batch_size`` > 1 turns dynamic batching on for JSON ``/predict`` and v2 infer (see
    :class:`~mnist_deploy.batching.DynamicBatcher`); 0 or 1 leaves every request its own model call.

    ``/health`` answers 503 until the model is loaded. The returned object is the FastAPI app
    wrapped in :class:`.guard.Guard` (body limit, metrics, the JSON fast path unless ``fast_path``
    is False); the FastAPI app itself is its ``.fastapi`` and the service its ``.service``.
    """
    from .. import __version__

    async def lifespan(app):
        service = app.state.service
        if service.model is None:
            service.model = await anyio.to_thread.run_sync(
                lambda: load_model(artifacts=artifacts, runtime=runtime, device=device, threads=threads))
        if max_batch_size > 1:
            service.start_batching(max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                                   preferred_batch_sizes=tuple(preferred_batch_sizes))
        freeze_startup_objects()
        try:
            yield
        finally:
            await service.stop_batching()

    app = FastAPI(
        title="mnist-deploy", version=__version__, lifespan=lifespan,
        description="Handwritten digit recognition (MNIST). POST an image or 784 pixel values to /predict; "
                    "draw one at /. Errors are JSON `{\"detail\": \"...\"}` with a 4xx status.",
    )
    app.include_router(router)
    app.include_router(v2_router)
    for kind, handler in HANDLERS:
        app.add_exception_handler(kind, handler)
    service = Service(model, max_body_bytes=max_body_bytes, max_image_pixels=max_image_pixels, max_batch=max_batch,
                      routes=_routes(app, router, v2_router))
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


def uvicorn_config(app, *, log_level: str = "info", access_log: bool = False, max_connections: int | None = None,
                   request_timeout: float = REQUEST_TIMEOUT, loop: str = "uvloop", **kwargs):
    """The ``uvicorn.Config`` every server process runs: httptools with the limits of :mod:`.connections`,
    and ``loop`` (uvloop or asyncio's own)."""
    import uvicorn

    log_accept_errors_once()
    protocol = guarded_protocol(max_connections=max_connections or default_max_connections(),
                                request_timeout=request_timeout)
    return uvicorn.Config(app, log_level=log_level, access_log=access_log, server_header=False,
                          timeout_keep_alive=KEEP_ALIVE_TIMEOUT, lifespan="on", http=protocol, loop=loop, **kwargs)


def run_server(app, *, host: str = "127.0.0.1", port: int = 8000, **settings) -> None:
    """Serve ``app`` with uvicorn until interrupted (``settings``: see :func:`uvicorn_config`).

    At most ``max_connections`` open connections (default: what the file-descriptor limit allows);
    a request must arrive whole within ``request_timeout`` seconds (see :mod:`.connections`).
    """
    import uvicorn

    uvicorn.Server(uvicorn_config(app, host=host, port=port, **settings)).run()


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["MAX_BODY_BYTES", "create_app", "is_loopback", "run_server"]
