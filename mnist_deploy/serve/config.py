"""``ServeConfig``: every setting of a server, typed, from the CLI (``mnist-deploy serve``) to each worker.

One dataclass travels the whole way: :func:`mnist_deploy.cli.serve.serve_cmd` builds it from the
options, :func:`.app.create_app` and :func:`.app.serve` read it, and :func:`.workers.run_workers`
hands it (it pickles) to every spawned worker process. Defaults here are the CLI's defaults, but for
``grpc_port``: 0 (no gRPC) here, so that an app made in Python opens no second port unasked; 8001 in the CLI.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..data.images import MAX_IMAGE_PIXELS
from ..errors import InputError
from ..formats import DEFAULT_RUNTIME

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_BATCH = 256  # images per request (/predict/batch, v2 infer)
GRPC_ACCEPTORS = 4  # grpcio servers per worker on the gRPC port (docs/grpc.md, benchmarks/grpc_overhead.py)
REQUEST_TIMEOUT = 10.0  # seconds for a request to arrive whole (headers and body)
DRAIN_TIMEOUT = 30.0  # seconds a SIGTERM drain may take before what is left is answered 503
LOOPS = ("uvloop", "asyncio")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class ServeConfig:
    """How to serve: the artifact, the model runtime, the limits, batching, the processes, the drain."""

    # what is served
    artifacts: Path = Path("artifacts")
    runtime: str = DEFAULT_RUNTIME
    device: str = "cpu"
    threads: int | None = 1  # runtime intra-op threads per worker (None: the runtime's default)
    # where, and how many processes
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 0  # the gRPC service's port, 0: none (the CLI's default is 8001, Triton's)
    grpc_acceptors: int = GRPC_ACCEPTORS  # grpcio servers per worker on grpc_port (grpc_v2.GrpcServer.start)
    workers: int = 1
    reuse_port: bool = True
    # request limits
    max_body_bytes: int = MAX_BODY_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_batch: int = MAX_BATCH
    max_connections: int | None = None  # None: what the open-file limit allows
    request_timeout: float = REQUEST_TIMEOUT
    # dynamic batching (max_batch_size 0 or 1: each request is its own model call)
    max_batch_size: int = 0
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = field(default=())
    # the HTTP server
    loop: str = "uvloop"
    access_log: bool = False
    log_level: str = "info"
    drain_timeout: float = DRAIN_TIMEOUT

    def __post_init__(self) -> None:
        object.__setattr__(self, "artifacts", Path(self.artifacts))
        object.__setattr__(self, "preferred_batch_sizes", tuple(int(p) for p in self.preferred_batch_sizes))
        for name in ("workers", "max_body_bytes", "max_image_pixels", "max_batch", "grpc_acceptors"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_batch_size < 0 or self.max_queue_delay_us < 0:
            raise InputError("max_batch_size and max_queue_delay_us must not be negative")
        preferred = self.preferred_batch_sizes
        if preferred and (self.max_batch_size <= 1 or not all(1 <= p <= self.max_batch_size for p in preferred)):
            raise InputError(f"preferred sizes must lie in 1..--max-batch-size ({self.max_batch_size}), got "
                             f"{list(preferred)}")
        if not 0 <= self.grpc_port <= 65535 or (self.grpc_port and self.grpc_port == self.port):
            raise InputError(f"grpc_port must be 0 (no gRPC) or a port in 1..65535 other than the HTTP port "
                             f"({self.port}), got {self.grpc_port}")
        if self.request_timeout <= 0 or self.drain_timeout <= 0:
            raise InputError("request_timeout and drain_timeout must be positive")
        if self.loop not in LOOPS or self.log_level not in LOG_LEVELS:
            raise InputError(f"loop must be one of {LOOPS} and log_level one of {LOG_LEVELS}")

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    def replace(self, **changes) -> ServeConfig:
        return dataclasses.replace(self, **changes)


__all__ = ["DRAIN_TIMEOUT", "MAX_BATCH", "MAX_BODY_BYTES", "REQUEST_TIMEOUT", "ServeConfig"]
