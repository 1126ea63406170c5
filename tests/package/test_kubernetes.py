"""deployment.yaml and the InferenceService's probes (issue 21): parsed with PyYAML and checked against
what the server really is -- the routes its FastAPI app serves, the options its `serve` command takes,
its drain timeout -- rather than against a copy of the expected text."""

from __future__ import annotations

import pytest
import yaml
from _serving import onnx_artifacts
from click.testing import CliRunner

from mnist_deploy.cli import cli
from mnist_deploy.package import PackageConfig, deployment, package_artifacts
from mnist_deploy.package.kubernetes import GRPC_PORT, HTTP_PORT, grace_period


@pytest.fixture(scope="module")
def exported(trained_mlp, tmp_path_factory, mnist_dir, cache_dir):
    return onnx_artifacts(trained_mlp, tmp_path_factory.mktemp("k8s"), mnist_dir, cache_dir)


def served_paths() -> set[str]:
    """The concrete GET paths the server's FastAPI app routes (from the routes themselves, through the
    schema FastAPI builds from them), each checked to be answered by the app (not 404/405)."""
    from starlette.testclient import TestClient

    from mnist_deploy.serve import create_app

    app = create_app()  # the model is not loaded: probes answer, "not ready"
    paths = {p for p, ops in app.fastapi.openapi()["paths"].items() if "get" in ops and "{" not in p}
    client = TestClient(app)
    for path in paths:
        assert client.get(path).status_code not in (404, 405), path
    return paths


def serve_params(command: list[str]) -> dict:
    """``mnist-deploy serve ...`` parsed by the real serve command: its parameters by name."""
    assert command[:2] == ["mnist-deploy", "serve"], command
    ctx = cli.commands["serve"].make_context("serve", list(command[2:]))
    return ctx.params


def _docs(path) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}


def test_deployment_runs_this_server_with_probes_on_routes_it_serves(exported, tmp_path):
    result = package_artifacts(artifacts=exported, out=tmp_path / "pkg",
                               config=PackageConfig(image="registry.example/mnist-deploy:1.2", drain_timeout=12.5))
    assert result.deployment_path == tmp_path / "pkg" / "deployment.yaml"
    docs = _docs(result.deployment_path)
    assert sorted(docs) == ["Deployment", "Service"]
    deploy, service = docs["Deployment"], docs["Service"]
    assert deploy["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    assert deploy["metadata"]["name"] == service["metadata"]["name"] == "mlp"
    pod = deploy["spec"]["template"]
    assert deploy["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"] == service["spec"]["selector"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "registry.example/mnist-deploy:1.2"

    params = serve_params(container["command"])  # the real `serve` parses it
    assert params["host"] == "0.0.0.0" and params["drain_timeout"] == 12.5 and params["runtime"] == "onnx"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": params["port"], "grpc": GRPC_PORT}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)

    paths = served_paths()
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, get in probes.items():
        assert get["path"] in paths, f"{kind} probes {get['path']}, which the server does not serve: {sorted(paths)}"
        assert get["port"] == "http"
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"

    grace = pod["spec"]["terminationGracePeriodSeconds"]
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert isinstance(grace, int) and grace > pause + params["drain_timeout"]
    resources = container["resources"]
    assert set(resources) == {"requests", "limits"} and all(set(v) == {"cpu", "memory"} for v in resources.values())
    assert params["workers"] == int(resources["limits"]["cpu"])


def test_inference_service_gets_the_same_probes(exported, tmp_path):
    result = package_artifacts(artifacts=exported, out=tmp_path / "pkg")
    model = yaml.safe_load(result.inference_service_path.read_text())["spec"]["predictor"]["model"]
    (container,) = _docs(result.deployment_path)["Deployment"]["spec"]["template"]["spec"]["containers"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        theirs, ours = dict(model[kind]), dict(container[kind])
        assert theirs.pop("httpGet")["path"] == ours.pop("httpGet")["path"]
        assert theirs == ours  # the same thresholds and periods
        assert model[kind]["httpGet"]["port"] == 8080  # where KServe's Triton runtime serves REST


@pytest.mark.parametrize("drain", [0.1, 1, 29.5, 30, 3600])
def test_the_grace_period_outlasts_the_drain(drain):
    (deploy, _service) = yaml.safe_load_all(deployment(name="digits", image="x/y:z", replicas=2, drain_timeout=drain))
    spec = deploy["spec"]["template"]["spec"]
    pause = spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] == grace_period(drain) > pause + drain
    assert deploy["spec"]["replicas"] == 2
    assert serve_params(spec["containers"][0]["command"])["drain_timeout"] == drain
    assert HTTP_PORT == serve_params(spec["containers"][0]["command"])["port"]


def test_cli_writes_the_deployment_and_refuses_a_bad_image(exported, tmp_path):
    res = CliRunner().invoke(cli, ["package", "--artifacts", str(exported), "--out", str(tmp_path / "a"),
                                   "--replicas", "3", "--drain-timeout", "5"])
    assert res.exit_code == 0, res.output
    assert "deployment.yaml" in res.output and "fill in the image" in res.output
    deploy = _docs(tmp_path / "a" / "deployment.yaml")["Deployment"]
    assert deploy["spec"]["replicas"] == 3
    for bad in ("my image", "x/y:z\nkind: Pod", ""):
        res = CliRunner().invoke(cli, ["package", "--artifacts", str(exported), "--out", str(tmp_path / "b"),
                                       "--image", bad])
        assert res.exit_code == 2, res.output
        assert "is not a container image reference" in res.output and "Traceback" not in res.output
        assert not (tmp_path / "b" / "deployment.yaml").exists()
