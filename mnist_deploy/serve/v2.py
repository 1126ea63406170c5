"""The Open Inference Protocol (KServe v2, REST) as a thin translation onto the :class:`.service.Service`.

Routes (each model route also under ``/versions/{version}``):
``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2/models/{name}``,
``GET /v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``.

The model takes one of two inputs, both listed in its metadata: ``input``, FP32 of the model's
shape with batch -1, already normalised (what an exported model takes: the same tensor Triton would
be sent); or ``pixels``, UINT8 raw 0..255 values ``[-1, 28, 28]`` (``[-1, 784]`` is accepted too),
normalised here with the manifest's mean and std. ``input`` values must lie in the range normalised
pixels have (stated in the metadata's ``parameters``: a 3e38 would make the logits non-finite).
Outputs: ``logits`` FP32 ``[-1, 10]``, and ``probabilities`` FP32 ``[-1, 10]`` when asked for in
``outputs`` (each name at most once, so an answer is at most two tensors). Tensor ``data`` is row-major,
flat or nested. Errors are 400 ``{"error": "..."}``, an unknown model or version 404 (the typed errors
of :mod:`mnist_deploy.errors`, answered by the server's one handler, :func:`.routes.error_reply`).
Readiness false is 400 (the spec: "a 4xx status code indicates false"); inference or metadata before
the model is loaded is 503. With no ``outputs`` only ``logits`` is returned: the spec says "all outputs produced by the
model", and the exported model produces ``logits``; ``probabilities`` is computed here on request
(MLServer does the same, docs/mlserver.md). Where the spec is silent: the model version is the
manifest's ``model.version`` or ``"1"`` (a Triton repository's first version); the binary tensor
extension is not supported (``extensions`` is empty), so clients send JSON data; a binary request
(tritonclient's default, marked by ``Inference-Header-Content-Length``) gets a 400 saying so and how. An infer body may be
compressed (``Content-Encoding: gzip`` or ``deflate``, as tritonclient's ``request_compression_algorithm``
sends it and Triton and MLServer take it), held to the same size limit once decompressed.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from ..errors import BadRequest, InputError, NotFound, NotReady, PayloadTooLarge
from ..predict import LoadedModel, softmax
from .parsing import dumps, has_bool, loads
from .service import Service

router = APIRouter(prefix="/v2")
PIXELS, INPUT = "pixels", "input"
OUTPUTS = ("logits", "probabilities")
_DTYPES = {"FP32": np.float32, "UINT8": np.uint8}
# The binary tensor data extension marks its requests with this header (the JSON part's length).
BINARY_HEADER = "inference-header-content-length"
BINARY_UNSUPPORTED = (
    "the binary tensor data extension is not supported (yet): send tensor data as JSON in the request body "
    "(tritonclient: set_data_from_numpy(x, binary_data=False) on each InferInput and "
    "InferRequestedOutput(name, binary_data=False) on each output)")
INPUT_SLACK = 1e-3  # of the normalised range: room for a client's rounding, none for 3e38


def _decoded(body: bytes, encoding: str, limit: int) -> bytes:
    """An infer body with its ``Content-Encoding`` undone; the decompressed size is capped like a plain body's."""
    encoding = encoding.strip().lower()
    if encoding not in ("gzip", "deflate"):  # others are read as they are, as MLServer does
        return body
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)  # HTTP "deflate" is the zlib format
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error:
        raise BadRequest(f"request body is not valid {encoding} data") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit:,} bytes once decompressed")
    if not d.eof:
        raise BadRequest(f"request body is truncated {encoding} data")
    return out


def _reply(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def model_name(m: LoadedModel) -> str:
    return str(m.manifest["model"]["name"])


def model_version(m: LoadedModel) -> str:
    return str(m.manifest["model"].get("version", "1"))


def _model(service: Service, name: str, version: str | None) -> LoadedModel:
    m = service.ready()
    if name != model_name(m):
        raise NotFound(f"unknown model '{name}'; this server serves '{model_name(m)}'")
    if version not in (None, "", model_version(m)):
        raise NotFound(f"unknown version '{version}' of model '{name}'; it has version '{model_version(m)}'")
    return m


def input_range(service: Service, m: LoadedModel) -> tuple[float, float]:
    """The values an ``input`` (FP32, normalised) tensor may hold: normalised pixels 0 and 255, widened by
    :data:`INPUT_SLACK` of the span so that a client's own float rounding is never refused."""
    lo, hi = (float(v) for v in service.normalize(m, np.array([[0.0] * 783 + [255.0]], np.float32))[0, [0, -1]])
    slack = INPUT_SLACK * (hi - lo)
    return lo - slack, hi + slack


def metadata(service: Service, m: LoadedModel) -> dict:
    lo, hi = input_range(service, m)
    shape = [-1, *m.input_shape]
    return {
        "name": model_name(m), "versions": [model_version(m)], "platform": f"mnist-deploy/{m.runtime}",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": shape,
                    "parameters": {"min": round(lo, 6), "max": round(hi, 6)}},
                   {"name": PIXELS, "datatype": "UINT8", "shape": [-1, 28, 28]}],
        "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, 10]} for name in OUTPUTS],
    }


def _tensor(spec: Any, service: Service, m: LoadedModel) -> np.ndarray:
    """One request input -> the model's normalised float32 (N, 784) batch, validated."""
    if not isinstance(spec, dict):
        raise InputError("each input must be an object with name, shape, datatype and data")
    name, shape, dtype, data = (spec.get(k) for k in ("name", "shape", "datatype", "data"))
    if name not in (INPUT, PIXELS):
        raise InputError(f"unknown input '{name}'; the model takes '{INPUT}' (FP32, normalised) or '{PIXELS}' "
                         "(UINT8, 0..255)")
    want = "FP32" if name == INPUT else "UINT8"
    if dtype != want:
        raise InputError(f"input '{name}' has datatype {want}, got {dtype!r}")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InputError(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    count = int(np.prod(shape, dtype=object))
    if len(shape) < 2 or count != shape[0] * 784 or shape[0] < 1:
        raise InputError(f"input '{name}': shape {shape} is not a batch of 28x28 images ([N, 784], [N, 28, 28] "
                         "or the model's own shape)")
    if shape[0] > service.max_batch:
        raise InputError(f"input '{name}': at most {service.max_batch} images per request, got {shape[0]}")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"input '{name}': data must be a flat or nested list of numbers") from None
    if arr.dtype.kind not in "iuf" or arr.size != count:
        raise InputError(f"input '{name}': data must hold {count} numbers (shape {shape}), got "
                         f"{arr.size} values of kind {arr.dtype.kind!r}")
    x = arr.astype(np.float32).reshape(shape[0], 784)
    if not np.isfinite(x).all():
        raise InputError(f"input '{name}': data must be finite numbers")
    if name == INPUT:
        lo, hi = input_range(service, m)
        if ((x < lo) | (x > hi)).any():  # 3e38 is finite, but the model's logits would not be
            raise InputError(f"input '{name}': FP32 data must be normalised pixels, in {lo:.4f}..{hi:.4f} "
                             "(the model's metadata states the range)")
        return x
    if arr.dtype.kind == "f" and not np.array_equal(x, np.round(x)):
        raise InputError(f"input '{name}': UINT8 data must be integers")
    if ((x < 0) | (x > 255)).any():
        raise InputError(f"input '{name}': UINT8 data must be in 0..255")
    return service.normalize(m, x)


def parse_infer(service: Service, m: LoadedModel, body: bytes) -> tuple[dict, list, np.ndarray]:
    """An inference request body -> (request, wanted outputs, the model's input batch), all validated
    before any model call (a bad request never joins a dynamic batch)."""
    req = loads(body)
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or len(req["inputs"]) != 1:
        raise InputError('expected {"inputs": [one tensor: "input" (FP32) or "pixels" (UINT8)]}')
    if (b"true" in body or b"false" in body) and has_bool(req["inputs"]):
        raise InputError("tensor data must be numbers, got booleans (true/false) among them")
    if "id" in req and not isinstance(req["id"], str):
        raise InputError("id must be a string (it is echoed in the response)")
    return req, _outputs(req.get("outputs")), _tensor(req["inputs"][0], service, m)


def _outputs(wanted: Any) -> list[str]:
    """The output names asked for, each at most once: the response is at most len(OUTPUTS) tensors."""
    if wanted is None or wanted == []:
        return ["logits"]
    names = [o.get("name") for o in wanted if isinstance(o, dict)] if isinstance(wanted, list) else None
    if names is None or len(names) != len(wanted) or not all(n in OUTPUTS for n in names):
        raise InputError(f'outputs must be a list of {{"name": ...}} with names from {list(OUTPUTS)}')
    if len(set(names)) != len(names):
        raise InputError(f"outputs names each output at most once, got {len(names)} entries for "
                         f"{len(set(names))} names")
    return names


def answer(m: LoadedModel, req: dict, wanted: list, logits: np.ndarray) -> dict:
    """The response dict (the spec's $inference_response) for the request's logits."""
    out = []
    for name in wanted:
        y = logits if name == "logits" else softmax(logits)
        out.append({"name": name, "datatype": "FP32", "shape": [int(logits.shape[0]), 10],
                    "data": y.astype(np.float32).ravel().tolist()})
    reply = {"model_name": model_name(m), "model_version": model_version(m), "outputs": out}
    if "id" in req:
        reply["id"] = req["id"]
    return reply


async def infer(service: Service, m: LoadedModel, body: bytes) -> dict:
    """An inference request body -> the response dict; the model call is the rows' place in the next batch."""
    req, wanted, x = parse_infer(service, m, body)
    return answer(m, req, wanted, await service.infer(x))


# ---------------------------------------------------------------------------------------------
# Routes.


def _service(request: Request) -> Service:
    return request.app.state.service


@router.get("", summary="v2: server metadata", tags=["v2"])
async def server_metadata(request: Request):
    from .. import __version__

    return _reply({"name": "mnist-deploy", "version": __version__, "extensions": []})


@router.get("/health/live", summary="v2: liveness", tags=["v2"])
async def live(request: Request):
    return _reply({"live": True})


@router.get("/health/ready", summary="v2: readiness", tags=["v2"])
async def ready(request: Request):
    ok = _service(request).health() is not None  # loaded, warmed up, and not draining
    return _reply({"ready": ok}, 200 if ok else 400)  # the spec: 200 is true, a 4xx is false


async def _metadata(request: Request, name: str, version: str | None = None):
    service = _service(request)
    return _reply(metadata(service, _model(service, name, version)))


async def _ready(request: Request, name: str, version: str | None = None):
    service = _service(request)
    try:
        m = _model(service, name, version)  # an unknown model stays 404
    except NotReady as exc:
        return _reply({"error": str(exc)}, 400)  # a 4xx is "not ready" (the spec)
    if (why := service.unready()) is not None:  # warming up, or draining
        return _reply({"error": "the server is shutting down" if why == "draining" else why}, 400)
    return _reply({"name": model_name(m), "ready": True})


async def _infer(request: Request, name: str, version: str | None = None):
    service = _service(request)
    m = _model(service, name, version)
    if BINARY_HEADER in request.headers:  # tritonclient's default: JSON then raw bytes, not valid JSON
        raise BadRequest(BINARY_UNSUPPORTED)
    body = _decoded(await request.body(), request.headers.get("content-encoding", ""), service.max_body_bytes)
    return _reply(await infer(service, m, body))


for _suffix in ("", "/versions/{version}"):
    router.add_api_route("/models/{name}" + _suffix, _metadata, methods=["GET"], tags=["v2"],
                         summary="v2: model metadata")
    router.add_api_route("/models/{name}" + _suffix + "/ready", _ready, methods=["GET"], tags=["v2"],
                         summary="v2: model readiness")
    router.add_api_route("/models/{name}" + _suffix + "/infer", _infer, methods=["POST"], tags=["v2"],
                         summary="v2: inference")

__all__ = ["answer", "infer", "input_range", "metadata", "parse_infer", "router"]
