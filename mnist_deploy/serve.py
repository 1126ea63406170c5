"""The HTTP server: a FastAPI app on uvicorn that loads one verified artifact and predicts digits.

Routes: ``POST /predict`` (JSON pixels, a multipart image upload, or a raw ``image/*`` body),
``POST /predict/batch``, ``GET /health``, ``GET /model``, ``GET /metrics`` (Prometheus text),
``GET /docs`` (OpenAPI), and ``GET /`` (a drawing page, no external resources).

Bad input is always a 4xx with a JSON ``{"detail": "..."}`` that says what is wrong, never a 500.
The body limit is enforced below FastAPI, in :class:`_Guard`: a ``Content-Length`` over the limit is
answered 413 before a byte of the body is read, and a streamed (chunked) body is cut off at the
limit. No request names a file or URL to load: the model is fixed when the app is made.

The JSON path is kept lean on purpose, and measured (2 CPUs, MLP, ONNX Runtime, 1 thread): the body
is parsed with ``json.loads`` + numpy rather than pydantic models; the model call (13 us p50) runs
inline in the event loop, where a thread-pool hop costs 95 us p50 and 3.4 ms p99; and JSON
``POST /predict`` is answered by the guard itself, skipping FastAPI's routing and middleware stack
(ab, 5,000 requests, 16 clients: about 3,450 req/s against 2,850 through the FastAPI route). Image
uploads are decoded in worker threads, at most two at a time, so a large image never blocks the JSON
traffic or multiplies memory.

fastapi is imported at module level (FastAPI resolves the handlers' annotations from the module);
the CLI imports this module only inside the ``serve`` command.
"""

from __future__ import annotations

import bisect
import json
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from .errors import InputError
from .predict import (
    MAX_IMAGE_PIXELS,
    LoadedModel,
    load_model,
    normalize_pixels,
    pixels_to_array,
    preprocess_image,
)

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_BATCH = 256
IMAGE_DECODERS = 2  # image uploads decoded at once
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
ROUTES = ("/", "/predict", "/predict/batch", "/health", "/model", "/metrics", "/docs", "/openapi.json",
          "/docs/oauth2-redirect", "/redoc", *(f"/static/{n}" for n in STATIC_FILES))
# The page may talk only to this server: no CDN, no external fonts, images or connections.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _HTTPError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Metrics, in the Prometheus text exposition format (no client library needed for counters and a histogram).


class Metrics:
    """Request counts, errors and latency histograms, rendered as Prometheus text."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.latency: dict[str, list] = {}  # route -> [bucket counts..., sum, count]
        self.inference: dict[str, list] = {}  # runtime -> same
        self.predictions: dict[str, int] = {}
        self.started = time.time()

    @staticmethod
    def _observe(table: dict[str, list], key: str, seconds: float) -> None:
        row = table.get(key)
        if row is None:
            row = table[key] = [0] * (len(LATENCY_BUCKETS) + 3)
        row[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        row[-2] += seconds
        row[-1] += 1

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        if status >= 400:
            ekey = (route, str(status))
            self.errors[ekey] = self.errors.get(ekey, 0) + 1
        self._observe(self.latency, route, seconds)

    def inferred(self, runtime: str, images: int, seconds: float) -> None:
        self.predictions[runtime] = self.predictions.get(runtime, 0) + images
        self._observe(self.inference, runtime, seconds)

    def render(self, model: LoadedModel | None) -> str:
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        head("mnist_deploy_http_requests_total", "counter", "HTTP requests by method, route and status code.")
        for (method, route, status), n in sorted(self.requests.items()):
            out.append(f'mnist_deploy_http_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
        head("mnist_deploy_http_request_errors_total", "counter", "HTTP requests answered with a 4xx or 5xx status.")
        for (route, status), n in sorted(self.errors.items()):
            out.append(f'mnist_deploy_http_request_errors_total{{route="{route}",status="{status}"}} {n}')
        self._histogram(out, head, "mnist_deploy_http_request_duration_seconds",
                        "Time from request to the end of the response, by route.", "route", self.latency)
        head("mnist_deploy_predictions_total", "counter", "Images predicted, by runtime.")
        for runtime, n in sorted(self.predictions.items()):
            out.append(f'mnist_deploy_predictions_total{{runtime="{runtime}"}} {n}')
        self._histogram(out, head, "mnist_deploy_inference_duration_seconds",
                        "Time of the model call alone (one request, any batch size), by runtime.",
                        "runtime", self.inference)
        head("mnist_deploy_model_ready", "gauge", "1 once the model is loaded and answering.")
        out.append(f"mnist_deploy_model_ready {1 if model is not None else 0}")
        if model is not None:
            head("mnist_deploy_model_info", "gauge", "The model being served (labels), always 1.")
            info = _model_labels(model)
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in info.items())
            out.append(f"mnist_deploy_model_info{{{labels}}} 1")
        head("mnist_deploy_start_time_seconds", "gauge", "Unix time the server started.")
        out.append(f"mnist_deploy_start_time_seconds {self.started:.3f}")
        return "\n".join(out) + "\n"

    @staticmethod
    def _histogram(out: list[str], head: Callable, name: str, text: str, label: str, table: dict) -> None:
        head(name, "histogram", text)
        for key, row in sorted(table.items()):
            cumulative = 0
            for bound, n in zip(LATENCY_BUCKETS, row, strict=False):
                cumulative += n
                out.append(f'{name}_bucket{{{label}="{key}",le="{bound:g}"}} {cumulative}')
            cumulative += row[len(LATENCY_BUCKETS)]
            out.append(f'{name}_bucket{{{label}="{key}",le="+Inf"}} {cumulative}')
            out.append(f'{name}_sum{{{label}="{key}"}} {row[-2]:.6f}')
            out.append(f'{name}_count{{{label}="{key}"}} {row[-1]}')


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _model_labels(model: LoadedModel) -> dict[str, str]:
    return {"model": model.manifest["model"]["name"], "runtime": model.runtime,
            "engine": model.predictor.runtime, "sha256": str(model.entry.get("sha256", "")),
            "device": model.device}


# ---------------------------------------------------------------------------------------------
# The prediction core, shared by the FastAPI routes and the guard's JSON fast path.


class _Service:
    """The model, the metrics and the limits; turns request bodies into prediction answers."""

    def __init__(self, model: LoadedModel | None, max_body_bytes: int, max_image_pixels: int,
                 max_batch: int) -> None:
        self.model = model
        self.metrics = Metrics()
        self.max_body_bytes = max_body_bytes
        self.max_image_pixels = max_image_pixels
        self.max_batch = max_batch

    def ready(self) -> LoadedModel:
        if self.model is None:
            raise _HTTPError(503, "model not loaded yet")
        return self.model

    def run(self, m: LoadedModel, x: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        probs = m.probabilities(x)
        self.metrics.inferred(m.runtime, x.shape[0], time.perf_counter() - t0)
        return probs

    def json_predict(self, body: bytes) -> tuple[int, bytes]:
        """``POST /predict`` with a JSON body -> (status, JSON bytes). Never raises for bad input."""
        t0 = time.perf_counter()
        try:
            m = self.ready()
            probs = self.run(m, normalize_pixels(pixels_to_array(_parse_json(body))))
        except _HTTPError as exc:
            return exc.status, _dumps({"detail": exc.detail})
        except InputError as exc:
            return 422, _dumps({"detail": str(exc)})
        out = _result(probs[0])
        out["runtime"] = m.runtime
        out["latency_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return 200, _dumps(out)

    def json_batch(self, body: bytes) -> dict:
        m = self.ready()
        t0 = time.perf_counter()
        rows = _parse_json(body)
        if isinstance(rows, list) and len(rows) > self.max_batch:
            raise _HTTPError(422, f"at most {self.max_batch} images per batch, got {len(rows)}")
        probs = self.run(m, normalize_pixels(pixels_to_array(rows, batch=True)))
        return {"predictions": [_result(p) for p in probs], "count": len(probs), "runtime": m.runtime,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 3)}

    def images(self, files: list[tuple[str, bytes]]) -> dict:
        """Uploaded images (name, bytes) -> predictions; runs in a worker thread (decoding is slow)."""
        m = self.ready()
        t0 = time.perf_counter()
        rows = []
        for i, (name, blob) in enumerate(files):
            try:
                rows.append(preprocess_image(blob, max_pixels=self.max_image_pixels, name=name))
            except InputError as exc:
                raise InputError(f"image {i} ({exc})" if len(files) > 1 else str(exc)) from None
        probs = self.run(m, np.concatenate(rows))
        return {"predictions": [_result(p) for p in probs], "runtime": m.runtime,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 3)}


# ---------------------------------------------------------------------------------------------
# The guard: body limit, metrics and the JSON fast path, as plain ASGI around the whole app.


def _headers(scope) -> tuple[bytes | None, bytes]:
    length, ctype = None, b""
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = value
        elif name == b"content-type":
            ctype = value
    return length, ctype


class _Guard:
    """Wraps the FastAPI app. Cheaper than BaseHTTPMiddleware, and sees every request first:

    * a ``Content-Length`` over the limit is answered 413 from the header, the body unread; a
      streamed body is counted and cut off with a 413 as soon as it passes the limit;
    * every request is counted and timed for ``/metrics``;
    * ``POST /predict`` with a JSON body (the hot path) is answered here by the same
      :meth:`_Service.json_predict` the FastAPI route uses, skipping the framework's routing and
      middleware stack, which costs more than the model call itself.
    """

    def __init__(self, app, service: _Service, fast_path: bool = True) -> None:
        self.app = app
        self.service = service
        self.fast_path = fast_path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = 500
        responded = False  # the guard itself has answered (413 / 400): later app output is dropped
        limit = self.service.max_body_bytes

        async def send_wrapper(message) -> None:
            nonlocal status
            if responded:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def reply(code: int, body: bytes, close: bool = False) -> None:
            nonlocal status, responded
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if close:
                headers.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            status, responded = code, True

        try:
            length, ctype = _headers(scope)
            if length is not None:
                try:
                    n = int(length)
                    if n < 0:
                        raise ValueError
                except ValueError:
                    detail = f"invalid Content-Length header: {length[:40].decode('latin-1')!r}"
                    await reply(400, _dumps({"detail": detail}), close=True)
                    return
                if n > limit:
                    # Answered from the header alone: the body is never read.
                    detail = f"request body of {n:,} bytes is over the limit of {limit:,} bytes"
                    await reply(413, _dumps({"detail": detail}), close=True)
                    return
            received = 0

            async def receive_wrapper():
                nonlocal received
                if responded:
                    return {"type": "http.disconnect"}
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        # A streamed body ran past the limit: answer now, and tell the app the client left.
                        await reply(413, _dumps({"detail": f"request body is over the limit of {limit:,} bytes"}),
                                    close=True)
                        return {"type": "http.disconnect"}
                return message

            if (self.fast_path and path == "/predict" and scope["method"] == "POST"
                    and ctype.split(b";", 1)[0].strip().lower() == b"application/json"):
                chunks = []
                while True:
                    message = await receive_wrapper()
                    if message["type"] != "http.request":
                        return  # client gone, or the 413 above has been sent
                    chunks.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        break
                code, body = self.service.json_predict(b"".join(chunks))  # inline: ~0.1 ms, no thread hop
                await reply(code, body)
                return
            try:
                await self.app(scope, receive_wrapper, send_wrapper)
            except Exception:
                if not responded:
                    raise  # a real bug: let uvicorn log it (FastAPI has already answered 500)
        finally:
            self.service.metrics.request(scope["method"], route, status, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# The app.


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _json(obj: Any, status: int = 200) -> Response:
    return Response(_dumps(obj), status_code=status, media_type="application/json")


def _result(probs: np.ndarray) -> dict:
    digit = int(probs.argmax())
    return {"digit": digit, "confidence": round(float(probs[digit]), 6),
            "probabilities": [round(p, 6) for p in probs.tolist()]}


def _media_type(request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _parse_json(body: bytes, key: str = "pixels") -> Any:
    if not body:
        raise _HTTPError(400, 'empty body; send JSON {"pixels": [784 values in 0..255]}')
    try:
        obj = json.loads(body)
    except UnicodeDecodeError:
        raise _HTTPError(400, "body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise _HTTPError(400, f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise _HTTPError(400, "body is not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict) or key not in obj:
        raise _HTTPError(422, f'expected a JSON object with a "{key}" field')
    return obj[key]


UNSUPPORTED = ("Content-Type must be application/json (pixels), multipart/form-data (an image file in the "
               "field 'file') or image/* (the image as the body); got {!r}")

_PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {
            "type": "object", "required": ["pixels"],
            "properties": {"pixels": {"type": "array", "minItems": 784, "maxItems": 784,
                                      "items": {"type": "number", "minimum": 0, "maximum": 255},
                                      "description": "784 values in 0..255, row-major 28x28, white digit on black "
                                                     "(an MNIST image; used as is)"}}}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "any image Pillow reads; preprocessed like MNIST"}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
    },
}
_BATCH_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {
            "type": "object", "required": ["pixels"],
            "properties": {"pixels": {"type": "array", "maxItems": MAX_BATCH,
                                      "items": {"type": "array", "minItems": 784, "maxItems": 784,
                                                "items": {"type": "number", "minimum": 0, "maximum": 255}}}}}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    },
}
_ERRORS = {code: {"description": text, "content": {"application/json": {"example": {"detail": text}}}}
           for code, text in ((400, "malformed body"), (413, "body over the size limit"),
                              (415, "unsupported Content-Type"), (422, "invalid pixels or image"),
                              (503, "model not loaded yet"))}


def create_app(*, model: LoadedModel | None = None, artifacts="artifacts", runtime: str = "onnx",
               device: str = "cpu", threads: int | None = 1, max_body_bytes: int = MAX_BODY_BYTES,
               max_image_pixels: int = MAX_IMAGE_PIXELS, max_batch: int = MAX_BATCH, fast_path: bool = True):
    """The ASGI app. Serves ``model`` if given, else loads ``artifacts`` for ``runtime`` at startup.

    ``/health`` answers 503 until the model is loaded. The returned object is the FastAPI app
    wrapped in :class:`_Guard` (body limit, metrics, the JSON fast path unless ``fast_path`` is
    False); the FastAPI app itself is its ``.fastapi``.
    """
    from . import __version__

    service = _Service(model, max_body_bytes, max_image_pixels, max_batch)
    decoders = anyio.CapacityLimiter(IMAGE_DECODERS)
    static_dir = resources.files("mnist_deploy") / "static"
    page = (static_dir / "index.html").read_bytes()
    static = {name: ((static_dir / name).read_bytes(), kind) for name, kind in STATIC_FILES.items()}

    async def lifespan(_app):
        if service.model is None:
            service.model = await anyio.to_thread.run_sync(
                lambda: load_model(artifacts=artifacts, runtime=runtime, device=device, threads=threads))
        yield

    app = FastAPI(
        title="mnist-deploy", version=__version__, lifespan=lifespan,
        description="Handwritten digit recognition (MNIST). POST an image or 784 pixel values to /predict; "
                    "draw one at /. Errors are JSON `{\"detail\": \"...\"}` with a 4xx status.",
    )

    @app.exception_handler(_HTTPError)
    async def _http_error(_request, exc: _HTTPError):
        return _json({"detail": exc.detail}, exc.status)

    @app.exception_handler(InputError)
    async def _input_error(_request, exc: InputError):
        return _json({"detail": str(exc)}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(_request, exc: StarletteHTTPException):
        return _json({"detail": exc.detail}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        return _json({"detail": str(exc.errors()[:3])}, 422)

    @app.exception_handler(ClientDisconnect)
    async def _disconnect(_request, _exc):
        return _json({"detail": "client disconnected or body over the limit"}, 413)

    async def _uploads(request: Request, media: str, limit: int) -> list[tuple[str, bytes]]:
        if media == "multipart/form-data":
            form = await request.form(max_files=limit, max_fields=limit + 8)
            try:
                files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if not isinstance(v, str)]
            finally:
                await form.close()
            if not files:
                raise _HTTPError(422, "the multipart body has no file; send the image in the field 'file'")
            return files
        if media.startswith("image/"):
            return [("body", await request.body())]
        raise _HTTPError(415, UNSUPPORTED.format(media or "(none)"))

    @app.post("/predict", summary="Predict one digit", openapi_extra={"requestBody": _PREDICT_BODY},
              responses=_ERRORS)
    async def predict(request: Request):
        """Predict the digit in JSON pixels (used as is), or in an uploaded image (preprocessed like MNIST).

        Answers `digit`, `confidence`, the ten `probabilities`, `runtime` and `latency_ms` (server time
        from the body received to the answer).
        """
        service.ready()
        media = _media_type(request)
        if media == "application/json":
            code, body = service.json_predict(await request.body())
            return Response(body, status_code=code, media_type="application/json")
        files = await _uploads(request, media, 1)
        if len(files) != 1:
            raise _HTTPError(422, f"send one image to /predict (got {len(files)}); use /predict/batch for more")
        out = await anyio.to_thread.run_sync(service.images, files, limiter=decoders)
        return _json({**out.pop("predictions")[0], **out})

    @app.post("/predict/batch", summary="Predict a list of digits", openapi_extra={"requestBody": _BATCH_BODY},
              responses=_ERRORS)
    async def predict_batch(request: Request):
        """Predict several digits: JSON `{"pixels": [[784 values], ...]}` or several files in a multipart body.

        At most 256 images (`max_batch`); one bad image rejects the request, naming it.
        """
        service.ready()
        media = _media_type(request)
        if media == "application/json":
            return _json(service.json_batch(await request.body()))
        files = await _uploads(request, media, max_batch + 1)
        if len(files) > max_batch:
            raise _HTTPError(422, f"at most {max_batch} images per batch, got more")
        out = await anyio.to_thread.run_sync(service.images, files, limiter=decoders)
        for rec, (name, _) in zip(out["predictions"], files, strict=True):
            rec["file"] = name
        out["count"] = len(files)
        return _json(out)

    @app.get("/health", summary="Readiness", responses={503: _ERRORS[503]})
    async def health():
        """200 once the model is loaded and warmed up, 503 before."""
        m = service.model
        if m is None:
            return _json({"status": "loading"}, 503)
        return _json({"status": "ok", "runtime": m.runtime, "model": m.manifest["model"]["name"]})

    @app.get("/model", summary="What is being served")
    async def model_info():
        """The format, file, sha256, metrics and parity of the served artifact, from the manifest."""
        m = service.ready()
        e = m.entry
        return _json({
            "runtime": m.runtime, "engine": m.predictor.runtime, "device": m.device, "threads": m.threads,
            "format": e.get("format"), "file": e.get("path"), "sha256": e.get("sha256"),
            "size_bytes": e.get("size_bytes"), "parity": e.get("parity"), "options": e.get("options"),
            "model": m.manifest.get("model"), "metrics": m.manifest.get("metrics"),
            "preprocessing": m.manifest.get("preprocessing"), "versions": m.manifest.get("versions"),
            "load_seconds": round(m.load_seconds, 4),
            "limits": {"max_body_bytes": max_body_bytes, "max_image_pixels": max_image_pixels,
                       "max_batch": max_batch},
        })

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        """Request counts, errors and latency histograms in the Prometheus text format."""
        return Response(service.metrics.render(service.model),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def index():
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": PAGE_CSP, "x-content-type-options": "nosniff",
                                 "cache-control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in static:  # a fixed list: no request can name a file on disk
            raise _HTTPError(404, "Not Found")
        content, kind = static[name]
        return Response(content, media_type=kind, headers={"x-content-type-options": "nosniff",
                                                           "cache-control": "no-cache"})

    guarded = _Guard(app, service, fast_path=fast_path)
    guarded.fastapi = app
    guarded.service = service
    return guarded


def run_server(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               access_log: bool = False) -> None:
    """Serve ``app`` with uvicorn until interrupted (one process; the model is shared by all requests)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log, server_header=False,
                timeout_keep_alive=5, lifespan="on")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["MAX_BATCH", "MAX_BODY_BYTES", "Metrics", "create_app", "is_loopback", "run_server"]
