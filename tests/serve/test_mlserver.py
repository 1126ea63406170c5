"""Our Open Inference Protocol routes against Seldon MLServer, the reference implementation (issue 10):
benchmarks/compare_mlserver.py runs the real `mnist-deploy serve` and the real MLServer (its own venv,
made by scripts/mlserver_env.sh) side by side and sends both the same probes. Here: the valid probes
agree to 1e-4, and every probe gets the same status class from both, but for the documented allow-list.
Plus the one behaviour taken from MLServer: compressed infer bodies, sent by tritonclient itself."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from _serving import mnist_test_digits, serve_process

from mnist_deploy.data.mnist import normalize_pixels
from mnist_deploy.predict import load_model

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("MLSERVER_VENV") or REPO / ".venv-mlserver")


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_mlserver", REPO / "benchmarks" / "compare_mlserver.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("compare_mlserver", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


cmp = _compare_module()


@pytest.fixture(scope="session")  # session scope: pytest sets up wider scopes first, so this precedes `served`
def mlserver_venv() -> Path:
    """MLServer's venv; skips without it, or fails where CI demands it (MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS=1:
    scripts/test.sh makes it), as conftest's ``require_system_tool`` does for system tools."""
    if not (VENV / "bin" / "mlserver").exists():
        msg = f"MLServer is not installed in {VENV} (bash scripts/mlserver_env.sh creates it)"
        if os.environ.get("MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail(msg)
        pytest.skip(msg)
    return VENV


@pytest.fixture(scope="module")
def rows(mlserver_venv, served, mnist_dir):  # the venv first: no training when it is missing
    return cmp.compare(artifacts=served, data_dir=mnist_dir, venv=mlserver_venv)


def test_valid_probes_give_the_same_logits(rows):
    valid = [r for r in rows if r.valid]
    assert len(valid) >= 10
    bad = [(r.probe, r.ours.status, r.mlserver.status, r.max_abs_diff) for r in valid
           if r.ours.status != 200 or r.mlserver.status != 200 or r.max_abs_diff is None or r.max_abs_diff > 1e-4]
    assert not bad, f"valid probes where the servers disagree (probe, ours, MLServer, max |diff|): {bad}"
    names = [(r.probe, [o["name"] for o in r.ours.body["outputs"]], [o["name"] for o in r.mlserver.body["outputs"]])
             for r in valid]
    assert all(a == b for _, a, b in names), f"different outputs returned: {names}"
    batch64 = next(r for r in rows if r.probe == "infer pixels batch 64")
    assert [o["shape"] for o in batch64.ours.body["outputs"]] == [[64, 10]]


def test_status_classes_match_except_the_allow_list(rows):
    table = cmp.table(rows)
    assert all(r.ours.status and r.mlserver.status for r in rows), f"a server did not answer:\n{table}"
    assert not [r.probe for r in rows if r.ours.status >= 500], f"our server answered 5xx:\n{table}"
    differing = {r.probe for r in rows if not r.same_class}
    # Exactly the allow-list: a new difference fails, and so does an entry that no longer differs.
    assert differing == set(cmp.ALLOWED), f"status classes differ on {sorted(differing)}:\n{table}"


def test_every_allowed_difference_is_documented():
    doc = (REPO / "docs" / "mlserver.md").read_text()
    missing = [probe for probe in cmp.ALLOWED if probe not in doc]
    assert not missing, f"docs/mlserver.md does not name the allowed differences {missing}"


# -- taken from MLServer: Content-Encoding gzip/deflate on infer (tritonclient can send both) -----------


@pytest.fixture(scope="module")
def server(served):
    with serve_process(served, "--log-level", "warning") as (url, _proc):
        yield url


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_request(server, served, mnist_dir, algorithm):
    import tritonclient.http as httpclient

    model = load_model(artifacts=served, runtime="pytorch")
    images = mnist_test_digits(mnist_dir, 8)[0]
    tensor = httpclient.InferInput("input", [8, 784], "FP32")
    tensor.set_data_from_numpy(normalize_pixels(images), binary_data=False)
    client = httpclient.InferenceServerClient(url=server.removeprefix("http://"), network_timeout=30)
    try:
        result = client.infer(model.manifest["model"]["name"], [tensor],
                              outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)],
                              request_compression_algorithm=algorithm)
    finally:
        client.close()
    np.testing.assert_allclose(result.as_numpy("logits"), model.logits(normalize_pixels(images)), atol=1e-4, rtol=1e-4)


def test_compressed_body_limits(server, served):
    name = load_model(artifacts=served, runtime="onnx").manifest["model"]["name"]
    url = f"{server}/v2/models/{name}/infer"
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}]})
    with httpx.Client(timeout=30) as client:
        bomb = client.post(url, content=gzip.compress(body.encode() + b" " * (4 << 20)), headers=headers)
        assert bomb.status_code == 413 and "once decompressed" in bomb.json()["error"]
        broken = client.post(url, content=b"\x1f\x8b not gzip", headers=headers)
        assert broken.status_code == 400 and "not valid gzip" in broken.json()["error"]
        cut = client.post(url, content=gzip.compress(body.encode())[:-20], headers=headers)
        assert cut.status_code == 400 and "gzip" in cut.json()["error"]
        ok = client.post(url, content=gzip.compress(body.encode()), headers=headers)
        assert ok.status_code == 200 and ok.json()["outputs"][0]["shape"] == [1, 10]
