"""Request and inference metrics, rendered in the Prometheus text exposition format.

Every label value comes from a fixed set, so no request can grow the table: methods outside
:data:`METHODS` and paths outside the app's routes are counted as ``"other"``, and status codes are
integers 100..599 (anything else is ``"other"``). A made-up method or path costs one counter
increment, never a new series.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable
from typing import Any

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER = "other"


class Metrics:
    """Request counts, errors and latency histograms, with label values from fixed sets.

    ``routes`` is every path the app answers (anything else is counted as ``"other"``).
    """

    def __init__(self, routes: Iterable[str] = ()) -> None:
        self.routes = frozenset(routes)
        self.requests: dict[tuple[str, str, str], int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.latency: dict[str, list] = {}  # route -> [bucket counts..., sum, count]
        self.inference: dict[str, list] = {}  # runtime -> same
        self.predictions: dict[str, int] = {}
        self.started = time.time()

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

    @staticmethod
    def _observe(table: dict[str, list], key: str, seconds: float) -> None:
        row = table.get(key)
        if row is None:
            row = table[key] = [0] * (len(LATENCY_BUCKETS) + 3)
        row[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        row[-2] += seconds
        row[-1] += 1

    def request(self, method: str, path: str, status: int, seconds: float) -> None:
        route, code = self.route_label(path), self.status_label(status)
        key = (self.method_label(method), route, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        if not isinstance(status, int) or status >= 400:
            ekey = (route, code)
            self.errors[ekey] = self.errors.get(ekey, 0) + 1
        self._observe(self.latency, route, seconds)

    def inferred(self, runtime: str, images: int, seconds: float) -> None:
        self.predictions[runtime] = self.predictions.get(runtime, 0) + images
        self._observe(self.inference, runtime, seconds)

    def render(self, model_labels: dict[str, str] | None) -> str:
        """The Prometheus text; ``model_labels`` describe the served model (None: not loaded yet)."""
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
        _histogram(out, head, "mnist_deploy_http_request_duration_seconds",
                   "Time from request to the end of the response, by route.", "route", self.latency)
        head("mnist_deploy_predictions_total", "counter", "Images predicted, by runtime.")
        for runtime, n in sorted(self.predictions.items()):
            out.append(f'mnist_deploy_predictions_total{{runtime="{runtime}"}} {n}')
        _histogram(out, head, "mnist_deploy_inference_duration_seconds",
                   "Time of the model call alone (one request, any batch size), by runtime.",
                   "runtime", self.inference)
        head("mnist_deploy_model_ready", "gauge", "1 once the model is loaded and answering.")
        out.append(f"mnist_deploy_model_ready {1 if model_labels is not None else 0}")
        if model_labels is not None:
            head("mnist_deploy_model_info", "gauge", "The model being served (labels), always 1.")
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in model_labels.items())
            out.append(f"mnist_deploy_model_info{{{labels}}} 1")
        head("mnist_deploy_start_time_seconds", "gauge", "Unix time the server started.")
        out.append(f"mnist_deploy_start_time_seconds {self.started:.3f}")
        return "\n".join(out) + "\n"


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


__all__ = ["LATENCY_BUCKETS", "METHODS", "Metrics"]
