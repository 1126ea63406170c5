"""Request, inference and batching metrics, with prometheus_client, correct across worker processes.

HTTP requests and gRPC calls (:mod:`.grpc_v2`) are counted apart, each with labels of its own; the
model's metrics (predictions, inference time, batches) count both. Every label value comes from a
fixed set, so no request can grow the table: methods outside :data:`METHODS` and paths outside the
app's routes are counted as ``"other"``, and status codes are integers 100..599 (anything else is
``"other"``); gRPC methods are the service's six and codes are ``grpc.StatusCode`` names. A made-up
method or path costs one counter increment, never a new series.

With one process the metrics live in a private registry (several apps in one test process do not
collide). With ``--workers N`` the parent sets ``PROMETHEUS_MULTIPROC_DIR`` to a private temporary
folder before it starts the workers; prometheus_client then keeps every counter and histogram in a
memory-mapped file per process, and ``/metrics``, whichever worker answers it, sums them all
(:class:`prometheus_client.multiprocess.MultiProcessCollector`). The gauges that describe the
answering process (model ready, model info, start time) come from a small collector of its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUEUE_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER = "other"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

prometheus_client.disable_created_metrics()  # *_created series: noise here, and absent in multiprocess mode


def multiprocess_dir() -> str | None:
    """The shared metrics folder when running as one of several workers, else None."""
    return os.environ.get(MULTIPROC_ENV) or None


class _ProcessCollector:
    """The gauges of the process answering the scrape: model ready, model info, start time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self):
        labels = self.metrics.model_labels
        ready = GaugeMetricFamily("mnist_deploy_model_ready", "1 once the model is loaded and answering.")
        ready.add_metric([], 1 if labels is not None else 0)
        yield ready
        if labels is not None:
            info = GaugeMetricFamily("mnist_deploy_model_info", "The model being served (labels), always 1.",
                                     labels=list(labels))
            info.add_metric([str(v) for v in labels.values()], 1)
            yield info
        start = GaugeMetricFamily("mnist_deploy_start_time_seconds", "Unix time the server started.")
        start.add_metric([], self.metrics.started)
        yield start


class Metrics:
    """Request counts, errors, latency, inference and batching histograms; label values from fixed sets.

    ``routes`` is every path the app answers (anything else is counted as ``"other"``).
    """

    def __init__(self, routes: Iterable[str] = ()) -> None:
        self.routes = frozenset(routes)
        self.started = time.time()
        self.model_labels: dict[str, str] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("mnist_deploy_http_requests", "HTTP requests by method, route and status code.",
                                 ("method", "route", "status"), registry=r)
        self._errors = Counter("mnist_deploy_http_request_errors", "HTTP requests answered with a 4xx or 5xx status.",
                               ("route", "status"), registry=r)
        self._latency = Histogram("mnist_deploy_http_request_duration_seconds",
                                  "Time from request to the end of the response, by route.", ("route",),
                                  buckets=LATENCY_BUCKETS, registry=r)
        self._predictions = Counter("mnist_deploy_predictions", "Images predicted, by runtime.", ("runtime",),
                                    registry=r)
        self._inference = Histogram("mnist_deploy_inference_duration_seconds",
                                    "Time of the model call alone (one call, any batch size), by runtime.",
                                    ("runtime",), buckets=LATENCY_BUCKETS, registry=r)
        self._batch = Histogram("mnist_deploy_batch_size", "Rows per model call made by the dynamic batcher.",
                                buckets=BATCH_BUCKETS, registry=r)
        self._queue = Histogram("mnist_deploy_batch_queue_seconds",
                                "Time a request waited in the dynamic batcher's queue before its model call.",
                                buckets=QUEUE_BUCKETS, registry=r)
        self._rpcs = Counter("mnist_deploy_grpc_requests", "gRPC calls by method and status code.",
                             ("method", "code"), registry=r)
        self._rpc_latency = Histogram("mnist_deploy_grpc_request_duration_seconds",
                                      "Time from a gRPC call's request to its answer, by method.", ("method",),
                                      buckets=LATENCY_BUCKETS, registry=r)
        self._children: dict[tuple, object] = {}  # labels() looks up under a lock; a dict get is cheaper
        self._own = _ProcessCollector(self)
        r.register(self._own)

    def _child(self, metric, *labels: str):
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def route_label(self, path: str) -> str:
        if path in self.routes:
            return path
        if path.startswith("/v2/models/"):  # the model name and version are not labels: a fixed template
            tail = path.rsplit("/", 1)[-1]
            return f"/v2/models/{{name}}/{tail}" if tail in ("infer", "ready") else "/v2/models/{name}"
        return OTHER

    @staticmethod
    def method_label(method: str) -> str:
        return method if method in METHODS else OTHER

    @staticmethod
    def status_label(status: int) -> str:
        return str(status) if isinstance(status, int) and 100 <= status <= 599 else OTHER

    def request(self, method: str, path: str, status: int, seconds: float) -> None:
        route, code = self.route_label(path), self.status_label(status)
        self._child(self._requests, self.method_label(method), route, code).inc()
        if not isinstance(status, int) or status >= 400:
            self._child(self._errors, route, code).inc()
        self._child(self._latency, route).observe(seconds)

    def rpc(self, method: str, code: str, seconds: float) -> None:
        """One gRPC call: ``method`` from the service's fixed list, ``code`` a ``grpc.StatusCode`` name."""
        self._child(self._rpcs, method, code).inc()
        self._child(self._rpc_latency, method).observe(seconds)

    def inferred(self, runtime: str, images: int, seconds: float) -> None:
        self._child(self._predictions, runtime).inc(images)
        self._child(self._inference, runtime).observe(seconds)

    def batched(self, rows: int, queue_seconds: list[float]) -> None:
        """One dynamic batch of ``rows`` rows, and how long each of its requests waited."""
        self._batch.observe(rows)
        for s in queue_seconds:
            self._queue.observe(s)

    def render(self, model_labels: dict[str, str] | None) -> str:
        """The Prometheus text; ``model_labels`` describe the served model (None: not loaded yet)."""
        self.model_labels = model_labels
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry).decode()
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        registry.register(self._own)
        return generate_latest(registry).decode()


__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "METHODS", "MULTIPROC_ENV", "Metrics", "multiprocess_dir"]
