"""Route handlers, at module level over the :class:`~.service.Service` in ``request.app.state.service``.

Each handler reads the request, calls the service, and writes the answer. Errors are raised as the
typed errors of :mod:`mnist_deploy.errors`, each carrying its HTTP status, and :func:`error_reply` is
the one place that turns them into an answer, for every route: ``{"detail": "..."}`` here, and
``{"error": "..."}`` on the Open Inference Protocol routes (:mod:`.v2`), whose spec answers an invalid
request 400 where ours is 422.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from ..errors import InputError, MnistDeployError, NotFound
from .config import MAX_BATCH
from .in_browser import ISOLATION_HEADERS, MODEL_URL, ORT_TYPES, ORT_URL
from .parsing import dumps, json_field, media_type, uploads
from .service import Service, single_answer

IMAGE_DECODERS = 2  # images decoded at once (each image its own turn)
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "mnist_image.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
# The page may talk only to this server: no CDN, no external fonts, images or connections. It may compile
# WebAssembly ('wasm-unsafe-eval': ORT-web's .wasm, from this server) but not eval JavaScript.
PAGE_CSP = ("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
V2_PREFIX = "/v2"


def error_reply(exc: BaseException, path: str) -> tuple[int, bytes]:
    """(status, JSON body) for an error raised while answering ``path``: the error class's
    ``http_status``, or 500 for anything unexpected (a bug, whose message is not shown)."""
    expected = isinstance(exc, MnistDeployError)
    status, text = (exc.http_status, str(exc)) if expected else (500, "internal server error")
    if path == V2_PREFIX or path.startswith(V2_PREFIX + "/"):
        return (400 if status == 422 else status), dumps({"error": text})  # v2: an invalid request is 400
    return status, dumps({"detail": text})


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


async def predict_json(service: Service, body: bytes) -> tuple[int, bytes]:
    """``POST /predict`` with a JSON body -> (status, JSON bytes); the guard's fast path and the route share it."""
    try:
        return 200, dumps(await service.predict_pixels(json_field(body)))
    except MnistDeployError as exc:
        return error_reply(exc, "/predict")


# ---------------------------------------------------------------------------------------------
# OpenAPI descriptions of the bodies the routes read by hand.

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
                             (503, "model not loaded yet, or the server is shutting down"))}

# ---------------------------------------------------------------------------------------------
# Routes.

router = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


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
        code, body = await predict_json(service, await request.body())
        return Response(body, status_code=code, media_type="application/json")
    files = await uploads(request, media, 1)
    if len(files) != 1:
        raise InputError(f"send one image to /predict (got {len(files)}); use /predict/batch for more")
    return json_response(single_answer(await service.predict_images(files, request.app.state.decoders)))


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
    out = await service.predict_images(files, request.app.state.decoders)
    for rec, (name, _) in zip(out["predictions"], files, strict=True):
        rec["file"] = name
    out["count"] = len(files)
    return json_response(out)


@router.get("/health", summary="Readiness", responses={503: ERRORS[503]})
async def health(request: Request):
    """200 once the model is loaded and warmed up, 503 before, and again from the start of a shutdown
    (SIGTERM) on, so that a load balancer stops sending while the requests in flight are answered."""
    service = _service(request)
    answer = service.health()
    if answer is None:
        return json_response({"status": service.unready()}, 503)
    return json_response(answer)


@router.get("/model", summary="What is being served")
async def model_info(request: Request):
    """The format, file, sha256, metrics and parity of the served artifact, from the manifest; under
    `browser`, the ONNX file the drawing page may run in the browser and its sha256 (or why it may not)."""
    info = _service(request).model_info()
    in_browser = getattr(request.app.state, "in_browser", None)
    info["browser"] = in_browser.info() if in_browser is not None else {"unavailable": "the server is starting"}
    return json_response(info)


@router.get(MODEL_URL, summary="The ONNX model, for in-browser inference")
async def model_file(request: Request):
    """The manifest's ONNX file (sha256 in `/model`'s `browser.sha256`), for the drawing page to run in the
    browser with onnxruntime-web; 404 when the server has none to send."""
    _service(request).ready()
    in_browser = getattr(request.app.state, "in_browser", None)
    if in_browser is None or in_browser.model is None:
        raise NotFound(in_browser.unavailable if in_browser is not None else "Not Found")
    return Response(in_browser.model, media_type="application/octet-stream",
                    headers={"x-content-type-options": "nosniff", "cache-control": "no-cache"})


@router.get(ORT_URL + "{name}", include_in_schema=False)
async def ort_file(request: Request, name: str):
    in_browser = getattr(request.app.state, "in_browser", None)
    if in_browser is None or name not in in_browser.ort:  # a fixed list: no request can name a file on disk
        raise NotFound("Not Found")
    # The isolation headers here too: ORT-web's threads are module workers loaded from these files, and a
    # worker of a cross-origin-isolated page must itself say require-corp, or the browser refuses to start it.
    return Response(in_browser.ort[name], media_type=ORT_TYPES[name[name.rindex("."):]],
                    headers={"x-content-type-options": "nosniff", "cache-control": "no-cache", **ISOLATION_HEADERS})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request):
    """Request counts, errors and latency histograms in the Prometheus text format."""
    return Response(_service(request).render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/", include_in_schema=False)
async def index(request: Request):
    return Response(request.app.state.page, media_type="text/html; charset=utf-8",
                    headers={"content-security-policy": PAGE_CSP, "x-content-type-options": "nosniff",
                             "cache-control": "no-cache", **ISOLATION_HEADERS})


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


async def expected_error(request: Request, exc: Exception):
    status, body = error_reply(exc, request.url.path)
    return Response(body, status_code=status, media_type="application/json")


async def starlette_error(_request, exc: StarletteHTTPException):
    # Keeps the framework's headers: a 405 carries Allow, as RFC 9110 requires.
    return json_response({"detail": exc.detail}, exc.status_code, headers=getattr(exc, "headers", None))


async def validation_error(_request, exc: RequestValidationError):
    return json_response({"detail": str(exc.errors()[:3])}, 422)


async def disconnect(_request, _exc):
    # Nobody reads this: the client has gone (the guard counts it as 499), or the guard has answered 413.
    return json_response({"detail": "client disconnected before the body was complete"}, 400)


HANDLERS = ((MnistDeployError, expected_error), (StarletteHTTPException, starlette_error),
            (RequestValidationError, validation_error), (ClientDisconnect, disconnect))

__all__ = ["HANDLERS", "IMAGE_DECODERS", "MAX_BATCH", "PAGE_CSP", "STATIC_FILES", "error_reply", "predict_json",
           "router"]
