"""The Open Inference Protocol (KServe v2, REST) as a thin translation onto :mod:`.v2_core` and the service.

Routes (each model route also under ``/versions/{version}``):
``GET /v2``, ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2/models/{name}``,
``GET /v2/models/{name}/ready``, ``POST /v2/models/{name}/infer``.

The models, inputs and outputs are :mod:`.v2_core`'s: ``<name>`` takes ``input`` (FP32, normalised),
``<name>-pixels`` takes ``pixels`` (UINT8 0..255), and ``<name>`` still takes ``pixels`` as before.
Tensor ``data`` is row-major, flat or nested. Errors are 400 ``{"error": "..."}``, an unknown model or
version 404 (the typed errors of :mod:`mnist_deploy.errors`, answered by the server's one handler,
:func:`.routes.error_reply`). Readiness false is 400 (the spec: "a 4xx status code indicates
false"); inference or metadata before the model is loaded is 503. An infer body may be compressed
(``Content-Encoding: gzip`` or ``deflate``), held to the same size limit once decompressed.

The binary tensor data extension (Triton's and KServe's, tritonclient's default): a request whose
``Inference-Header-Content-Length`` header says the body starts with that many bytes of JSON, followed by
the raw tensor bytes (little-endian, row-major) of each input whose ``parameters`` carry
``binary_data_size``, in input order. Outputs come back binary when asked with ``"binary_data": true``
on a requested output, or, for outputs that do not say, ``"binary_data_output": true`` in the request's
``parameters``: the response is then the JSON part (the output carries ``binary_data_size``, no
``data``) followed by the bytes, with ``Inference-Header-Content-Length`` set. The parsing is
:func:`read_request`; :func:`infer_reply` is the whole infer call, shared by the FastAPI route and the
guard's fast path (:mod:`.guard`), which answers v2 infer without the framework as it does ``/predict``.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from ..errors import BadRequest, InputError, NotReady, PayloadTooLarge
from . import v2_core as core
from .parsing import dumps, has_bool, loads
from .service import Service

router = APIRouter(prefix="/v2")
EXTENSIONS = ["binary_tensor_data"]
# The binary tensor data extension marks its requests with this header (the JSON part's length).
BINARY_HEADER = "inference-header-content-length"
JSON_TYPE, BINARY_TYPE = "application/json", "application/octet-stream"


def decoded(body: bytes, encoding: str, limit: int) -> bytes:
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
    return Response(dumps(obj), status_code=status, media_type=JSON_TYPE)


def _header_length(value: str | bytes | None, size: int) -> int | None:
    """The ``Inference-Header-Content-Length`` value, checked against the (decompressed) body's size."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    try:
        n = int(text.strip())
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length must be an integer, got {text[:40]!r}") from None
    if n < 0 or n > size:
        raise BadRequest(f"Inference-Header-Content-Length {n:,} is outside the body of {size:,} bytes")
    return n


def _binary_size(spec: dict) -> int | None:
    """An input's ``binary_data_size`` parameter (None when the tensor is in JSON ``data``)."""
    params = spec.get("parameters")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise InputError(f"input '{spec.get('name')}': parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise InputError(f"input '{spec.get('name')}': binary_data_size must be a non-negative integer, "
                         f"got {size!r}")
    return size


def _flag(params: Any, key: str, where: str) -> bool | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        raise InputError(f"{where}: parameters must be an object")
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise InputError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _outputs(req: dict) -> list[tuple[str, bool]]:
    """The outputs asked for, each with whether it goes back as binary data."""
    default = bool(_flag(req.get("parameters"), "binary_data_output", "request"))
    wanted = req.get("outputs")
    if wanted is None or wanted == []:
        return [(name, default) for name in core.output_names(None)]
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise InputError(f'outputs must be a list of {{"name": ...}} with names from {list(core.OUTPUTS)}')
    names = core.output_names([o.get("name") for o in wanted])
    if any(isinstance(o.get("parameters"), dict) and "classification" in o["parameters"] for o in wanted):
        raise InputError("the classification extension is not supported: ask for 'probabilities' instead "
                         "(tritonclient: InferRequestedOutput without class_count)")
    binary = [_flag(o.get("parameters"), "binary_data", f"output '{o.get('name')}'") for o in wanted]
    return [(n, default if b is None else b) for n, b in zip(names, binary, strict=True)]


def read_request(service: Service, served: core.ServedModel, body: bytes,
                 header_length: int | None = None) -> tuple[dict, list[tuple[str, bool]], np.ndarray]:
    """An infer body (decompressed) -> (the JSON request, [(output name, binary?)], the model's input batch),
    all validated before any model call (a bad request never joins a dynamic batch).

    ``header_length`` (from ``Inference-Header-Content-Length``) splits a binary-extension body: the
    JSON part, then each binary input's bytes, exactly ``binary_data_size`` of them, in input order,
    with nothing left over."""
    head = body if header_length is None else body[:header_length]
    req = loads(head)
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or len(req["inputs"]) != 1:
        raise InputError(f'expected {{"inputs": [one tensor: "{served.input}" '
                         f'({core.INPUT_DATATYPE[served.input]})]}}')
    spec = req["inputs"][0]
    if not isinstance(spec, dict):
        raise InputError("each input must be an object with name, shape, datatype and data")
    if "id" in req and not isinstance(req["id"], str):
        raise InputError("id must be a string (it is echoed in the response)")
    outputs = _outputs(req)
    name, shape, dtype = spec.get("name"), spec.get("shape"), spec.get("datatype")
    size = _binary_size(spec)
    rest = len(body) - len(head)
    if size is None:
        if rest:
            raise InputError(f"{rest:,} bytes of binary data follow the JSON header, but input '{name}' has no "
                             "binary_data_size parameter saying they are its data")
        if "data" not in spec:
            raise InputError(f"input '{name}' has neither data nor a binary_data_size parameter")
        if (b"true" in head or b"false" in head) and has_bool(spec["data"]):
            raise InputError("tensor data must be numbers, got booleans (true/false) among them")
        data = spec["data"]
    else:
        if header_length is None:
            raise InputError(f"input '{name}' has binary_data_size but the request has no "
                             "Inference-Header-Content-Length header")
        if "data" in spec:
            raise InputError(f"input '{name}' has both data and binary_data_size; send one")
        if size != rest:
            raise InputError(f"input '{name}': binary_data_size is {size:,} bytes, but {rest:,} bytes follow "
                             "the JSON header")
        count = core.check_input(service, served, name, dtype, shape)
        data = core.array_from_bytes(name, dtype, count, memoryview(body)[len(head):])
        return req, outputs, core.input_batch(service, served, name, dtype, shape, data, count=count)
    return req, outputs, core.input_batch(service, served, name, dtype, shape, data)


def response_body(served: core.ServedModel, req: dict, outputs: list[tuple[str, bool]],
                  logits: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers) of the response (the spec's $inference_response); binary outputs follow the
    JSON part, whose length the ``Inference-Header-Content-Length`` header then gives."""
    binary = dict(outputs)
    tensors, blobs = [], []
    for name, y in core.output_arrays([n for n, _ in outputs], logits):
        t = {"name": name, "datatype": "FP32", "shape": [int(y.shape[0]), 10]}
        if binary[name]:
            blob = y.astype("<f4", copy=False).tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = y.ravel().tolist()
        tensors.append(t)
    reply = {"model_name": served.name, "model_version": served.version, "outputs": tensors}
    if "id" in req:
        reply["id"] = req["id"]
    head = dumps(reply)
    if not blobs:
        return head, {"content-type": JSON_TYPE}
    return b"".join([head, *blobs]), {"content-type": BINARY_TYPE, BINARY_HEADER: str(len(head))}


async def infer_reply(service: Service, name: str, version: str | None, body: bytes, header_length: Any = None,
                      encoding: str = "") -> tuple[bytes, dict[str, str]]:
    """An infer request as it came (the raw body, its ``Inference-Header-Content-Length`` and
    ``Content-Encoding`` header values) -> the 200 response's (body, headers); typed errors otherwise."""
    served = core.resolve(service, name, version)
    body = decoded(body, encoding, service.max_body_bytes)
    req, outputs, x = read_request(service, served, body, _header_length(header_length, len(body)))
    return response_body(served, req, outputs, await service.infer(x))


# ---------------------------------------------------------------------------------------------
# Routes.


def _service(request: Request) -> Service:
    return request.app.state.service


@router.get("", summary="v2: server metadata", tags=["v2"])
async def server_metadata(request: Request):
    from .. import __version__

    return _reply({"name": "mnist-deploy", "version": __version__, "extensions": EXTENSIONS})


@router.get("/health/live", summary="v2: liveness", tags=["v2"])
async def live(request: Request):
    return _reply({"live": True})


@router.get("/health/ready", summary="v2: readiness", tags=["v2"])
async def ready(request: Request):
    ok = _service(request).health() is not None  # loaded, warmed up, and not draining
    return _reply({"ready": ok}, 200 if ok else 400)  # the spec: 200 is true, a 4xx is false


async def _metadata(request: Request, name: str, version: str | None = None):
    return _reply(core.metadata(core.resolve(_service(request), name, version)))


async def _ready(request: Request, name: str, version: str | None = None):
    service = _service(request)
    try:
        served = core.resolve(service, name, version)  # an unknown model stays 404
    except NotReady as exc:
        return _reply({"error": str(exc)}, 400)  # a 4xx is "not ready" (the spec)
    if (why := service.unready()) is not None:  # warming up, or draining
        return _reply({"error": "the server is shutting down" if why == "draining" else why}, 400)
    return _reply({"name": served.name, "ready": True})


async def _infer(request: Request, name: str, version: str | None = None):
    body, headers = await infer_reply(_service(request), name, version, await request.body(),
                                      request.headers.get(BINARY_HEADER), request.headers.get("content-encoding", ""))
    return Response(body, headers=headers)


for _suffix in ("", "/versions/{version}"):
    router.add_api_route("/models/{name}" + _suffix, _metadata, methods=["GET"], tags=["v2"],
                         summary="v2: model metadata")
    router.add_api_route("/models/{name}" + _suffix + "/ready", _ready, methods=["GET"], tags=["v2"],
                         summary="v2: model readiness")
    router.add_api_route("/models/{name}" + _suffix + "/infer", _infer, methods=["POST"], tags=["v2"],
                         summary="v2: inference")


def infer_path(path: str) -> tuple[str, str | None] | None:
    """(model name, version or None) of a v2 infer path, or None for any other path (the guard's test)."""
    parts = path.split("/")
    if len(parts) == 5 and parts[4] == "infer" and parts[:3] == ["", "v2", "models"] and parts[3]:
        return parts[3], None
    if (len(parts) == 7 and parts[6] == "infer" and parts[:3] == ["", "v2", "models"] and parts[4] == "versions"
            and parts[3] and parts[5]):
        return parts[3], parts[5]
    return None


__all__ = ["BINARY_HEADER", "EXTENSIONS", "decoded", "infer_path", "infer_reply", "read_request", "response_body",
           "router"]
