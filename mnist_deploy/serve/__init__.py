"""The HTTP server: a FastAPI app on uvicorn that loads one verified artifact and predicts digits.

Routes: ``POST /predict`` (JSON pixels, a multipart image upload, or a raw ``image/*`` body),
``POST /predict/batch``, ``GET /health``, ``GET /model``, ``GET /metrics`` (Prometheus text),
``GET /docs`` (OpenAPI), and ``GET /`` (a drawing page, no external resources).

Bad input is always a 4xx with a JSON ``{"detail": "..."}`` that says what is wrong, never a 500.
No request names a file or URL to load: the model is fixed when the app is made.

The modules, bottom up:

* :mod:`.parsing` -- JSON bodies and uploads into Python values, with typed errors;
* :mod:`.metrics` -- prometheus_client counters and histograms (summed across worker processes),
  labels from fixed sets;
* :mod:`.config` -- :class:`ServeConfig`, every setting, typed, from the CLI to each worker;
* :mod:`.batching` -- the dynamic batcher, and its pass-through twin for batching off;
* :mod:`.service` -- the model, limits, metrics and the batcher behind one object that knows
  nothing of HTTP;
* :mod:`.routes` -- the route handlers, at module level, and the one error-to-answer mapping;
* :mod:`.v2_core` -- the Open Inference Protocol's model side with no transport (model names, inputs,
  outputs, metadata), shared by HTTP and gRPC;
* :mod:`.v2` -- the Open Inference Protocol (REST, JSON and binary tensors) onto the same service;
* :mod:`.protos` -- the gRPC modules, generated from ``proto/grpc_predict_v2.proto`` on first use;
* :mod:`.grpc_v2` -- the Open Inference Protocol over gRPC (``--grpc-port``) onto the same service, on
  uvicorn's event loop (grpcio and grpc_tools are imported only when it is on);
* :mod:`.guard` -- plain ASGI around the app: body limit, metrics, the JSON fast path;
* :mod:`.connections` -- below ASGI: bounded connections, request deadlines (slowloris), the drain;
* :mod:`.app` -- :func:`create_app` and :func:`serve` (one process);
* :mod:`.workers` -- :func:`run_workers`: N spawned uvicorn processes on one port, the metrics folder.

The JSON path is kept lean on purpose, and measured (2 CPUs, MLP, ONNX Runtime, 1 thread): the body
is parsed with ``orjson`` + numpy rather than pydantic models; the model call (13 us p50) runs
inline in the event loop, where a thread-pool hop costs 95 us p50 and 3.4 ms p99; and JSON
``POST /predict`` is answered by the guard itself. Image uploads are decoded in worker threads, at
most two at a time, after their headers are checked, so a large image never blocks the JSON traffic
or multiplies memory.

fastapi is imported by these modules at their top; the CLI imports this package only inside the
``serve`` command, so ``mnist-deploy --help`` does not pay for it.
"""

from __future__ import annotations

from .app import create_app, is_loopback, run_server, serve
from .config import MAX_BATCH, MAX_BODY_BYTES, REQUEST_TIMEOUT, ServeConfig
from .metrics import Metrics
from .workers import run_workers

__all__ = ["MAX_BATCH", "MAX_BODY_BYTES", "REQUEST_TIMEOUT", "Metrics", "ServeConfig", "create_app", "is_loopback",
           "run_server", "run_workers", "serve"]
