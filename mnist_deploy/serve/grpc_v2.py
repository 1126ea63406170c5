"""The Open Inference Protocol's gRPC half, ``inference.GRPCInferenceService``, as a thin translation onto the
:class:`.service.Service`.

Served by grpcio's asyncio server on the event loop uvicorn runs (``--grpc-port``, in every worker: grpc
binds its port with SO_REUSEPORT, so the kernel spreads connections over the workers as it does for
HTTP), it shares the worker's model, dynamic batcher, limits and metrics with the HTTP routes: a gRPC
request and an HTTP one can meet in the same model call. The messages come from
``proto/grpc_predict_v2.proto``, generated on first use (:mod:`.protos`).

Methods: ``ServerLive``, ``ServerReady``, ``ModelReady``, ``ServerMetadata``, ``ModelMetadata``,
``ModelInfer``; anything else (Triton's statistics, repository, shared-memory calls) is UNIMPLEMENTED.
The models are those of the REST routes (:mod:`.v2_core`): ``<name>`` takes ``input`` (FP32, normalised;
``pixels`` too, as before the split) and ``<name>-pixels`` takes ``pixels`` (UINT8 0..255), each
listing its one input in its metadata. ``ModelInfer`` reads the input as ``raw_input_contents`` (what
tritonclient sends) or as typed ``contents`` (``fp32_contents``, ``uint_contents``), validated by the
same core functions as the REST route, and answers ``logits`` (and ``probabilities`` when asked for) as
``raw_output_contents``, little-endian FP32, as Triton does. The request id is echoed.

Errors are the typed errors of :mod:`mnist_deploy.errors` mapped by their HTTP status to a gRPC status
code (:data:`CODES`): INVALID_ARGUMENT for a bad request, NOT_FOUND for an unknown model or version,
UNAVAILABLE before the model is loaded or once the server drains, RESOURCE_EXHAUSTED for a message over
``--max-body`` (refused by grpc itself before it is read) or more calls at once than ``max_connections``,
INTERNAL (with no detail) for a bug. Each call is counted in ``mnist_deploy_grpc_requests{method, code}``.

Shutdown, as for HTTP (:mod:`.connections`): at SIGTERM readiness turns false at once (``ServerReady``,
``ModelReady``); calls keep being answered for ``DRAIN_IDLE_GRACE`` (1 s), so that those clients had
already sent are read and answered; then new calls are held, not run, until none has come for a moment,
and the server stops (:meth:`GrpcServer.drain`): the port closes, each connection gets a GOAWAY, the held
calls are answered UNAVAILABLE (:data:`DRAIN_REFUSAL`: safe to send again), calls in flight are answered,
and what is still running when the drain timeout (less a margin) ends is cancelled, so the worker exits
within ``--drain-timeout``. No call is left for grpc to cancel when it stops. The lifespan's shutdown
waits for it before it closes the batcher.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time

import grpc
import numpy as np

from .. import __version__
from ..errors import InputError, MnistDeployError, NotReady
from . import v2_core as core
from .config import ServeConfig
from .connections import DRAIN_IDLE_GRACE, default_max_connections
from .protos import load_protos
from .service import Service

_LOG = logging.getLogger("uvicorn.error")
SERVER_NAME = "mnist-deploy"
# The HTTP status each typed error carries -> the gRPC status code (anything else: INTERNAL).
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT, 499: grpc.StatusCode.CANCELLED,
         503: grpc.StatusCode.UNAVAILABLE}
# Where typed contents hold each datatype's values, and the array type they are read into (uint_contents
# is uint32 on the wire: int64 keeps a 300 a 300 for the 0..255 check).
TYPED_FIELDS = {"FP32": ("fp32_contents", np.float32), "UINT8": ("uint_contents", np.int64)}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for an error raised while answering a call (:data:`CODES`)."""
    status = exc.http_status if isinstance(exc, MnistDeployError) else 500
    return CODES.get(status, grpc.StatusCode.INTERNAL)


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_port(host: str, port: int) -> None:
    """Fail now, in one line, if something already listens on ``host:port``: grpc binds with SO_REUSEPORT,
    so a second server of the same user on the port would otherwise share its connections, silently."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle; a listener is
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise InputError(f"cannot listen for gRPC on {grpc_address(host, port)}: {exc.strerror or exc}; "
                             "choose another port with --grpc-port (0: no gRPC)") from None


# ---------------------------------------------------------------------------------------------
# Requests into the values the protocol's core reads (:mod:`.v2_core`), and answers out of its arrays.


def read_input(service: Service, served: core.ServedModel, request) -> np.ndarray:
    """The request's one input -> the model's validated, normalised float32 (N, 784) batch."""
    if len(request.inputs) != 1:
        raise InputError(f"expected one input tensor, '{served.input}' ({core.INPUT_DATATYPE[served.input]}) for "
                         f"model '{served.name}', got {len(request.inputs)}")
    t = request.inputs[0]
    shape = list(t.shape)
    count = core.check_input(service, served, t.name, t.datatype, shape)  # name, datatype, shape: before the data
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise InputError(f"raw_input_contents must hold one entry per input (1), got {len(raw)}")
        if t.HasField("contents"):
            raise InputError(f"input '{t.name}': data in both contents and raw_input_contents; send one of them")
        data = core.array_from_bytes(t.name, t.datatype, count, raw[0])
    else:
        field, dtype = TYPED_FIELDS[t.datatype]
        values = getattr(t.contents, field)
        if not values:
            raise InputError(f"input '{t.name}': no data; send raw_input_contents or contents.{field} "
                             f"({t.datatype})")
        data = np.fromiter(values, dtype, count=len(values))
    return core.input_batch(service, served, t.name, t.datatype, shape, data, count=count)


def infer_response(pb2, served: core.ServedModel, request_id: str, wanted: list[str], logits: np.ndarray):
    """The ModelInferResponse: each wanted output as FP32 ``[N, 10]`` in ``raw_output_contents``."""
    reply = pb2.ModelInferResponse(model_name=served.name, model_version=served.version, id=request_id)
    for name, y in core.output_arrays(wanted, logits):
        reply.outputs.add(name=name, datatype="FP32", shape=list(y.shape))
        reply.raw_output_contents.append(y.astype("<f4", copy=False).tobytes())
    return reply


# ---------------------------------------------------------------------------------------------
# The service.


# What a call that comes once the drain refuses new calls is answered (UNAVAILABLE), by :class:`DrainGate`.
DRAIN_REFUSAL = "the server is shutting down: this call was not run; send it again, to another replica"


class DrainGate:
    """Notes when the last call came. Once :attr:`closing`, each new call is held, not run, until
    :attr:`released` (the server has stopped listening and told the clients so), then answered
    ``UNAVAILABLE`` (:data:`DRAIN_REFUSAL`): see :meth:`GrpcServer.drain`. Every method passes through it
    in its wrapper (:func:`_rpc`), shared by the worker's acceptors (one gate for all its servers)."""

    def __init__(self) -> None:
        self.closing = False
        self.released = asyncio.Event()
        self.last_call = time.monotonic()

    async def refuse(self, metrics, method: str, context) -> None:
        t0 = time.perf_counter()
        await self.released.wait()
        metrics.rpc(method, grpc.StatusCode.UNAVAILABLE.name, time.perf_counter() - t0)
        await context.abort(grpc.StatusCode.UNAVAILABLE, DRAIN_REFUSAL)


def _rpc(method):
    """One call: time and count it, and turn a raised error into the call's status (:func:`status_code`);
    held and refused instead while the drain's :class:`DrainGate` is closing."""
    name = method.__name__

    @functools.wraps(method)
    async def call(self, request, context):
        gate = self.gate
        gate.last_call = time.monotonic()
        if gate.closing:
            return await gate.refuse(self.service.metrics, name, context)
        if self.active >= self.max_calls:  # the worker's limit, whichever of its acceptors took the call
            self.service.metrics.rpc(name, grpc.StatusCode.RESOURCE_EXHAUSTED.name, 0.0)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"more than {self.max_calls} calls at once on this worker (--max-connections): "
                                "not run; send it again later")
        self.active += 1
        t0 = time.perf_counter()
        try:
            reply = await method(self, request, context)
        except MnistDeployError as exc:
            code, message = status_code(exc), str(exc)
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            self.service.metrics.rpc(name, grpc.StatusCode.CANCELLED.name, time.perf_counter() - t0)
            raise
        except Exception:
            _LOG.exception("gRPC %s failed", name)
            code, message = grpc.StatusCode.INTERNAL, "internal server error"
        else:
            self.service.metrics.rpc(name, grpc.StatusCode.OK.name, time.perf_counter() - t0)
            return reply
        finally:
            self.active -= 1
        self.service.metrics.rpc(name, code.name, time.perf_counter() - t0)
        await context.abort(code, message)

    return call


class Servicer:
    """``GRPCInferenceService``'s six methods over a :class:`.service.Service`."""

    def __init__(self, service: Service, pb2, gate: DrainGate | None = None, max_calls: int | None = None) -> None:
        self.service, self.pb2 = service, pb2
        self.gate = gate or DrainGate()
        self.max_calls = max_calls or default_max_connections()  # calls at once, over all the worker's acceptors
        self.active = 0

    @_rpc
    async def ServerLive(self, request, context):
        return self.pb2.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request, context):
        return self.pb2.ServerReadyResponse(ready=self.service.health() is not None)  # loaded, warmed up, not draining

    @_rpc
    async def ModelReady(self, request, context):
        try:
            core.resolve(self.service, request.name, request.version)  # an unknown model stays NOT_FOUND
        except NotReady:
            return self.pb2.ModelReadyResponse(ready=False)
        return self.pb2.ModelReadyResponse(ready=self.service.unready() is None)  # loaded, warm, not draining

    @_rpc
    async def ServerMetadata(self, request, context):
        return self.pb2.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    @_rpc
    async def ModelMetadata(self, request, context):
        meta = core.metadata(core.resolve(self.service, request.name, request.version))
        reply = self.pb2.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for key in ("inputs", "outputs"):
            for t in meta[key]:
                getattr(reply, key).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return reply

    @_rpc
    async def ModelInfer(self, request, context):
        served = core.resolve(self.service, request.model_name, request.model_version)
        asked = request.outputs
        wanted = core.output_names([o.name for o in asked] if asked else None)
        if asked and any("classification" in o.parameters for o in asked):  # as the REST route answers it
            raise InputError("the classification extension is not supported: ask for 'probabilities' instead "
                             "(tritonclient: InferRequestedOutput without class_count)")
        x = read_input(self.service, served, request)  # validated before it joins a batch
        logits = await self.service.infer(x)
        return infer_response(self.pb2, served, request.id, wanted, logits)


def server_options(config: ServeConfig) -> list[tuple[str, int]]:
    """grpc's channel arguments: the message size limit is the HTTP body limit; the port is shared (workers)."""
    return [("grpc.max_receive_message_length", config.max_body_bytes), ("grpc.so_reuseport", 1)]


class GrpcServer:
    """One worker's gRPC server, on the running event loop: :meth:`start`, :meth:`drain`, :meth:`stop`."""

    QUIET = 0.2  # seconds without a new call after which no call is taken to be on its way (:meth:`drain`)
    GOAWAY = 0.1  # seconds between the stop's beginning (grpc's GOAWAY) and the held calls' UNAVAILABLE

    def __init__(self, service: Service, config: ServeConfig) -> None:
        self.service, self.config = service, config
        drain = config.drain_timeout
        self.grace_before_stop = min(DRAIN_IDLE_GRACE, drain / 2)  # as HTTP keeps idle connections open
        self.grace = max(0.0, drain - min(1.0, drain / 10))  # as the HTTP drain: answered before the exit
        self.port: int | None = None
        self.gate = DrainGate()
        self._servers: list[grpc.aio.Server] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Future | None = None

    async def start(self) -> int:
        """Listen on ``config.host:config.grpc_port`` and serve; returns the port.

        ``config.grpc_acceptors`` grpcio servers share the port (SO_REUSEPORT, as workers do) and the one
        servicer: grpcio's asyncio server takes its calls one at a time (it asks the core for the next
        call once the last has reached the loop), so under load one server leaves the loop waiting
        between calls; each more server is one more call on its way (docs/grpc.md). The limit of calls
        at once (``max_connections``) is the servicer's, over all of them."""
        pb2, pb2_grpc = load_protos()
        c = self.config
        self._loop = asyncio.get_running_loop()
        servicer = Servicer(self.service, pb2, self.gate, c.max_connections)
        address = grpc_address(c.host, c.grpc_port)
        for _ in range(c.grpc_acceptors):
            server = grpc.aio.server(options=server_options(c))
            pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
            try:
                self.port = server.add_insecure_port(address)
            except RuntimeError as exc:
                raise InputError(f"cannot listen for gRPC on {address}: {exc}; choose another --grpc-port") from None
            self._servers.append(server)
        for server in self._servers:
            await server.start()
        self.service.on_drain.append(self.drain_threadsafe)
        if self.service.draining:  # the signal came while the server was starting
            self.drain()
        return self.port

    def drain(self, *, wait_first: bool = True) -> None:
        """Begin the stop, once (call it on the loop). Readiness is already false (``service.draining``).

        grpc, when it stops, cancels (CANCELLED) each call it has received but not yet handed to the
        application, and a call that comes after it began to stop and before the client read its GOAWAY; so
        it must stop when no call is on its way. Calls keep being answered for :attr:`grace_before_stop`
        seconds, so that those clients had sent before they saw the signal are; then each new call is taken
        but held, not run (:class:`DrainGate`), until none has come for :attr:`QUIET` seconds (a client
        that waits for its answer sends nothing more) or another :attr:`grace_before_stop` has passed. Then
        the server stops (its port closes, the connections get a GOAWAY, so a client's next call goes to a
        new connection and is refused, UNAVAILABLE) and the held calls are answered UNAVAILABLE: not run,
        safe to send again. The calls in flight get what is left of :attr:`grace`."""
        if self._stopping is None and self._servers:
            self._stopping = asyncio.ensure_future(self._stop(self.grace_before_stop if wait_first else 0.0))

    async def _stop(self, wait: float) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            if wait:
                await asyncio.sleep(wait)
                self.gate.closing = True
                until = loop.time() + min(self.grace_before_stop, max(0.0, self.grace - wait) / 2)
                while (quiet := time.monotonic() - self.gate.last_call) < self.QUIET and loop.time() < until:
                    await asyncio.sleep(min(self.QUIET - quiet, until - loop.time()))
            grace = max(0.0, self.grace - (loop.time() - began))
            stopped = asyncio.gather(*(server.stop(grace) for server in self._servers))
            if self.gate.closing:
                await asyncio.sleep(self.GOAWAY)  # the GOAWAY goes out before the held calls' answers
        finally:
            self.gate.released.set()
        await stopped

    def drain_threadsafe(self) -> None:
        """:meth:`drain` from a signal handler or another thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.drain)

    async def stop(self) -> None:
        """Stop now (if no drain began) and wait until the server has stopped."""
        self.drain(wait_first=False)
        if self._stopping is not None:
            await self._stopping


async def start_grpc(service: Service, config: ServeConfig) -> GrpcServer:
    """A started :class:`GrpcServer` for ``service``, drained with it (``service.begin_drain``)."""
    server = GrpcServer(service, config)
    port = await server.start()
    _LOG.info("gRPC (inference.GRPCInferenceService) on %s", grpc_address(config.host, port))
    return server


__all__ = ["CODES", "DRAIN_REFUSAL", "DrainGate", "GrpcServer", "Servicer", "check_port", "grpc_address",
           "infer_response", "read_input", "start_grpc", "status_code"]
