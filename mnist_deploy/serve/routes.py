"""Route handlers, at module level over the :class:`~.service.Service` in ``request.app.state.service``.

Each handler reads the request, calls the service, and writes the answer; :data:`STATUS` maps the
service's error types to status codes, the one place that does. Errors are ``{"detail": "..."}``.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from ..errors import InputError
from .parsing import BadRequest, NotFound, UnsupportedMedia, dumps, json_field, media_type, uploads
from .service import BatcherClosed, NotReady, Service, single_answer

IMAGE_DECODERS = 2  # image uploads decoded at once
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# The page may talk only to this server: no CDN, no external fonts, images or connections.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Most specific first: the first type an error is an instance of gives its status.
STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (BadRequest, 400), (NotFound, 404), (UnsupportedMedia, 415), (NotReady, 503), (BatcherClosed, 503),
    (InputError, 422),
)


def status_of(exc: BaseException) -> int | None:
    """The status code for an expected error, or None for a bug."""
    for kind, status in STATUS:
        if isinstance(exc, kind):
            return status
    return None


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def predict_json(service: Service, body: bytes) -> tuple[int, bytes]:
    """``POST /predict`` with a JSON body -> (status, JSON bytes); the guard's fast path and the route share it."""
    try:
        return 200, dumps(service.predict_pixels(json_field(body)))
    except (InputError, NotReady) as exc:
        return status_of(exc), dumps({"detail": str(exc)})


async def predict_json_batched(service: Service, body: bytes) -> tuple[int, bytes]:
    """:func:`predict_json` with the model call in the next dynamic batch (batching on)."""
    try:
        return 200, dumps(await service.predict_pixels_batched(json_field(body)))
    except (InputError, NotReady, BatcherClosed) as exc:
        return status_of(exc), dumps({"detail": str(exc)})


# ---------------------------------------------------------------------------------------------
# OpenAPI descriptions of the bodies the routes read by hand.

MAX_BATCH = 256
_PIXEL = {"type": "number", "minimum": 0, "maximum": 255}
PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {
            "type": "object", "required": ["pixels"],
            "properties": {"pixels": {"type": "array", "minItems": 784, "maxItems": 784, "items": _PIXEL,
                                      "description": "784 values in 0..255, row-major 28x28, white digit on black "
                                                     "(an MNIST image; used as is)"}}}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": "any image Pillow reads; preprocessed like MNIST"}}}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
    },
}
BATCH_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {
            "type": "object", "required": ["pixels"],
            "properties": {"pixels": {"type": "array", "maxItems": MAX_BATCH,
                                      "items": {"type": "array", "minItems": 784, "maxItems": 784,
                                                "items": _PIXEL}}}}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    },
}
ERRORS = {code: {"description": text, "content": {"application/json": {"example": {"detail": text}}}}
          for code, text in ((400, "malformed body"), (413, "body over the size limit"),
                             (415, "unsupported Content-Type"), (422, "invalid pixels or image"),
                             (503, "model not loaded yet"))}

# ---------------------------------------------------------------------------------------------
# Routes.

router = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


async def _predict_images(request: Request, service: Service, files: list[tuple[str, bytes]]) -> dict:
    """Decode in a worker thread (at most IMAGE_DECODERS at once), then predict on the loop, in the
    next dynamic batch when batching is on."""
    m = service.ready()
    t0 = time.perf_counter()
    service.check_images(files)  # over-limit or unreadable headers: answered now, not after the queue
    x = await anyio.to_thread.run_sync(service.decode_images, m, files, limiter=request.app.state.decoders)
    return await service.predict_rows(m, x, t0)


@router.post("/predict", summary="Predict one digit", openapi_extra={"requestBody": PREDICT_BODY},
             responses=ERRORS)
async def predict(request: Request):
    """Predict the digit in JSON pixels (used as is), or in an uploaded image (preprocessed like MNIST).

    Answers `digit`, `confidence`, the ten `probabilities`, `runtime` and `latency_ms` (server time
    from the body received to the answer).
    """
    service = _service(request)
    service.ready()
    media = media_type(request.headers.get("content-type", ""))
    if media == "application/json":
        body = await request.body()
        code, body = (predict_json(service, body) if service.batcher is None
                      else await predict_json_batched(service, body))
        return Response(body, status_code=code, media_type="application/json")
    files = await uploads(request, media, 1)
    if len(files) != 1:
        raise InputError(f"send one image to /predict (got {len(files)}); use /predict/batch for more")
    out = await _predict_images(request, service, files)
    return json_response(single_answer(out))


@router.post("/predict/batch", summary="Predict a list of digits", openapi_extra={"requestBody": BATCH_BODY},
             responses=ERRORS)
async def predict_batch(request: Request):
    """Predict several digits: JSON `{"pixels": [[784 values], ...]}` or several files in a multipart body.

    At most 256 images (`max_batch`); one bad image rejects the request, naming it.
    """
    service = _service(request)
    service.ready()
    media = media_type(request.headers.get("content-type", ""))
    if media == "application/json":
        return json_response(await service.predict_pixel_batch(json_field(await request.body())))
    files = await uploads(request, media, service.max_batch + 1)
    if len(files) > service.max_batch:
        raise InputError(f"at most {service.max_batch} images per batch, got more")
    out = await _predict_images(request, service, files)
    for rec, (name, _) in zip(out["predictions"], files, strict=True):
        rec["file"] = name
    out["count"] = len(files)
    return json_response(out)


@router.get("/health", summary="Readiness", responses={503: ERRORS[503]})
async def health(request: Request):
    """200 once the model is loaded and warmed up, 503 before."""
    answer = _service(request).health()
    return json_response(answer) if answer is not None else json_response({"status": "loading"}, 503)


@router.get("/model", summary="What is being served")
async def model_info(request: Request):
    """The format, file, sha256, metrics and parity of the served artifact, from the manifest."""
    return json_response(_service(request).model_info())


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request):
    """Request counts, errors and latency histograms in the Prometheus text format."""
    return Response(_service(request).render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/", include_in_schema=False)
async def index(request: Request):
    return Response(request.app.state.page, media_type="text/html; charset=utf-8",
                    headers={"content-security-policy": PAGE_CSP, "x-content-type-options": "nosniff",
                             "cache-control": "no-cache"})


@router.get("/static/{name}", include_in_schema=False)
async def static_file(request: Request, name: str):
    static = request.app.state.static
    if name not in static:  # a fixed list: no request can name a file on disk
        raise NotFound("Not Found")
    content, kind = static[name]
    return Response(content, media_type=kind, headers={"x-content-type-options": "nosniff",
                                                       "cache-control": "no-cache"})


# ---------------------------------------------------------------------------------------------
# Exception handlers: every error is JSON {"detail": ...}.


async def expected_error(_request, exc: Exception):
    return json_response({"detail": str(exc)}, status_of(exc) or 500)


async def starlette_error(_request, exc: StarletteHTTPException):
    # Keeps the framework's headers: a 405 carries Allow, as RFC 9110 requires.
    return json_response({"detail": exc.detail}, exc.status_code, headers=getattr(exc, "headers", None))


async def validation_error(_request, exc: RequestValidationError):
    return json_response({"detail": str(exc.errors()[:3])}, 422)


async def disconnect(_request, _exc):
    return json_response({"detail": "client disconnected or body over the limit"}, 413)


HANDLERS = ((InputError, expected_error), (NotReady, expected_error), (StarletteHTTPException, starlette_error),
            (RequestValidationError, validation_error), (ClientDisconnect, disconnect))

__all__ = ["HANDLERS", "IMAGE_DECODERS", "MAX_BATCH", "PAGE_CSP", "STATIC_FILES", "predict_json", "router",
           "status_of"]
