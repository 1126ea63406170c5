"""Kubernetes manifests: a Deployment + Service running this server, and the KServe InferenceService.

The Deployment runs ``mnist-deploy serve`` from an image holding the package and the artifacts folder
(the image is a placeholder to fill in, or ``--image``). Its probes follow the server's lifecycle
(docs/lifecycle.md):

* ``startupProbe`` on ``/v2/health/ready``: true once the model is loaded and warmed up; until then the
  other probes wait, so a slow start is never taken for a hung process;
* ``readinessProbe`` on ``/v2/health/ready``: false from the moment SIGTERM arrives (the drain), so the
  Service stops sending new requests while those in flight are answered;
* ``livenessProbe`` on ``/v2/health/live``: true as long as the process answers HTTP.

``terminationGracePeriodSeconds`` is the drain timeout plus the preStop pause plus a margin, so the kubelet
never kills a server that is still draining. Everything is written by PyYAML from dicts, never by
formatting strings: a value is always one scalar, however it is spelled.
"""

from __future__ import annotations

import math
import re

from ..errors import InputError

# A Kubernetes object name (RFC 1123 label); also a valid Triton model (directory) name. Always used
# with fullmatch: "$" also matches before a trailing newline, and "mlp\n" passed the check once.
NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
STORAGE_URI_PLACEHOLDER = "s3://YOUR-BUCKET/PATH/TO/model_repository"
IMAGE_PLACEHOLDER = "YOUR-REGISTRY/mnist-deploy:latest"
# An image reference: [registry[:port]/]path[:tag][@digest], no spaces or control characters.
_IMAGE = re.compile(r"[a-z0-9][a-z0-9._-]*(:[0-9]+)?(/[a-z0-9._-]+)*(:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?",
                    re.IGNORECASE)
HTTP_PORT, GRPC_PORT = 8000, 8001  # as Triton's defaults, and `serve --port`'s / `--grpc-port`'s
TRITON_KSERVE_HTTP_PORT = 8080  # where KServe's Triton runtime serves REST
READY_PATH, LIVE_PATH = "/v2/health/ready", "/v2/health/live"
ARTIFACTS_IN_IMAGE = "/app/artifacts"
PRE_STOP_SECONDS = 5  # the endpoints' removal reaches every node's proxy meanwhile; the server still serves
GRACE_MARGIN_SECONDS = 5
STARTUP_BUDGET_SECONDS = 300  # load + warm-up must end within this, or the kubelet restarts the container
RESOURCES = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}


def check_image(image: object) -> None:
    if not isinstance(image, str) or not _IMAGE.fullmatch(image):
        raise InputError(f"--image {image!r} is not a container image reference (REGISTRY/PATH[:TAG][@sha256:...])")


def probes(port: int | str) -> dict:
    """The three probes of a v2 server whose HTTP port is ``port`` (a number or a port name)."""
    ready, live = {"path": READY_PATH, "port": port}, {"path": LIVE_PATH, "port": port}
    return {
        "startupProbe": {"httpGet": ready, "periodSeconds": 2, "failureThreshold": STARTUP_BUDGET_SECONDS // 2},
        # two misses: one probe landing on a worker that is being replaced (still warming up) is not enough
        "readinessProbe": {"httpGet": ready, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": live, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
    }


def grace_period(drain_timeout: float) -> int:
    """``terminationGracePeriodSeconds``: the preStop pause, then the whole drain, then a margin."""
    return PRE_STOP_SECONDS + math.ceil(drain_timeout) + GRACE_MARGIN_SECONDS


def serve_command(*, drain_timeout: float, runtime: str) -> list[str]:
    """The container's command line: `mnist-deploy serve` on every interface, one worker per CPU of the limit
    (gRPC is served on its default port, :data:`GRPC_PORT`)."""
    return ["mnist-deploy", "serve", "--host", "0.0.0.0", "--port", str(HTTP_PORT), "--artifacts", ARTIFACTS_IN_IMAGE,
            "--runtime", runtime, "--workers", RESOURCES["limits"]["cpu"], "--drain-timeout", f"{drain_timeout:g}"]


def _documents(*docs: dict) -> str:
    import yaml

    return "---\n".join(yaml.safe_dump(d, sort_keys=False, default_flow_style=False, allow_unicode=False)
                        for d in docs)


def deployment(*, name: str, image: str, replicas: int, drain_timeout: float, runtime: str = "onnx") -> str:
    """A Deployment running this server and a ClusterIP Service in front of it, as YAML text."""
    if not isinstance(name, str) or not NAME.fullmatch(name):  # it is also written into the comments
        raise InputError(f"model name {name!r} is not a valid Kubernetes name")
    check_image(image)
    labels = {"app.kubernetes.io/name": "mnist-deploy", "app.kubernetes.io/instance": name}
    container = {
        "name": "server", "image": image,
        "command": serve_command(drain_timeout=drain_timeout, runtime=runtime),
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"}],
        **probes("http"),
        # The pod is already out of the Service's endpoints when this runs; the pause lets that reach
        # every node before SIGTERM starts the drain (readiness 503, answer what arrived, exit 0).
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}},
        "resources": RESOURCES,
    }
    deploy = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"terminationGracePeriodSeconds": grace_period(drain_timeout), "containers": [container]}}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
        "spec": {"selector": labels, "ports": [
            {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
            {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}]},
    }
    header = (f"# Written by `mnist-deploy package`: `mnist-deploy serve` for model {name} as a Deployment and\n"
              "# a Service. Build an image with the package and the artifacts folder at "
              f"{ARTIFACTS_IN_IMAGE}, set image\n# (or pass --image), then `kubectl apply -f` this file.\n")
    return header + _documents(deploy, service)


def inference_service(*, name: str, cfg) -> str:
    """A KServe ``InferenceService`` (serving.kserve.io/v1beta1) for the Triton repository, as YAML text,
    with the same probes on the port KServe's Triton runtime serves REST on. ``cfg``: a PackageConfig."""
    if not isinstance(name, str) or not NAME.fullmatch(name):  # it is also written into the comments
        raise InputError(f"model name {name!r} is not a valid Kubernetes name")
    doc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {"predictor": {"model": {
            "modelFormat": {"name": "onnx"},
            "protocolVersion": "v2",
            "storageUri": cfg.storage_uri,
            "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
            **probes(TRITON_KSERVE_HTTP_PORT),
        }}},
    }
    header = (
        f"# Written by `mnist-deploy package`. Upload the model_repository folder (the one holding {name}/)\n"
        "# to storage your cluster can read, set storageUri to it, then `kubectl apply -f` this file.\n"
        "# KServe picks its Triton runtime for modelFormat onnx with protocol v2; the model is then at\n"
        f"# /v2/models/{name} on the service's URL.\n"
    )
    return header + _documents(doc)


__all__ = ["GRPC_PORT", "HTTP_PORT", "IMAGE_PLACEHOLDER", "LIVE_PATH", "READY_PATH", "STORAGE_URI_PLACEHOLDER",
           "check_image", "deployment", "grace_period", "inference_service", "probes", "serve_command"]
