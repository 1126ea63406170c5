"""The Open Inference Protocol (KServe v2) with a real third-party client: tritonclient[http] against the
real `mnist-deploy serve` process, results compared with the PyTorch model (the state_dict, eager)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from _serving import mnist_test_digits, serve_process

from mnist_deploy.data.mnist import normalize_pixels
from mnist_deploy.predict import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(served):
    with serve_process(served, "--log-level", "warning") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def torch_model(served):
    return load_model(artifacts=served, runtime="pytorch")


@pytest.fixture(scope="module")
def digits(mnist_dir):
    return mnist_test_digits(mnist_dir, 64)


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=server[0].removeprefix("http://"), network_timeout=30)
    yield client
    client.close()


def test_health_and_metadata(triton, torch_model):
    name = torch_model.manifest["model"]["name"]
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(name) and triton.is_model_ready(name, "1")
    assert not triton.is_model_ready("no-such-model")
    meta = triton.get_server_metadata()
    assert meta["name"] == "mnist-deploy" and meta["extensions"] == ["binary_tensor_data"]
    # One model, one input list: each input form is its own model name.
    model = triton.get_model_metadata(name)
    assert model["name"] == name and model["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in model["inputs"]] == [("input", "FP32", [-1, 784])]
    pixels = triton.get_model_metadata(f"{name}-pixels")
    assert pixels["name"] == f"{name}-pixels" and pixels["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in pixels["inputs"]] == [("pixels", "UINT8", [-1, 28, 28])]
    for meta in (model, pixels):
        assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"logits": [-1, 10], "probabilities": [-1, 10]}
    assert triton.is_model_ready(f"{name}-pixels") and triton.is_model_ready(f"{name}-pixels", "1")
    assert not triton.is_model_ready(f"{name}-pixels", "2")


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("kind", ["pixels", "input"])
def test_infer_matches_the_pytorch_model(triton, torch_model, digits, batch, kind):
    import tritonclient.http as httpclient

    images = digits[0][:batch]
    want = torch_model.logits(normalize_pixels(images))
    if kind == "pixels":
        tensor = httpclient.InferInput("pixels", [batch, 28, 28], "UINT8")
        tensor.set_data_from_numpy(images.astype(np.uint8), binary_data=False)
    else:
        tensor = httpclient.InferInput("input", [batch, 784], "FP32")
        tensor.set_data_from_numpy(normalize_pixels(images), binary_data=False)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=False),
               httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    name = torch_model.manifest["model"]["name"]
    result = triton.infer(name, [tensor], outputs=outputs, request_id=f"req-{batch}")
    assert result.get_response()["id"] == f"req-{batch}"
    logits = result.as_numpy("logits")
    assert logits.shape == (batch, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
    probs = result.as_numpy("probabilities")
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs.argmax(axis=1) == want.argmax(axis=1)).all()


def test_v2_errors(server, torch_model):
    url = server[0]
    name = torch_model.manifest["model"]["name"]
    r = httpx.post(f"{url}/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{url}/v2/models/{name}/versions/7")
    assert r.status_code == 404 and "error" in r.json()
    bad = [
        {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [0] * 784}]},
        {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8", "data": [300] * 784}]},
        {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 783}]},
        {"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "UINT8", "data": [True] + [0] * 783}]},
        {"inputs": [{"name": "x", "shape": [1, 784], "datatype": "FP32", "data": [0] * 784}]},
        {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0] * 784}],
         "outputs": [{"name": "nope"}]},
        {"nothing": 1},
    ]
    for body in bad:
        r = httpx.post(f"{url}/v2/models/{name}/infer", json=body)
        assert r.status_code == 400, (body.keys(), r.text)
        assert set(r.json()) == {"error"}
    r = httpx.post(f"{url}/v2/models/{name}/infer", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    # Nested data is row-major too; with no "outputs" only logits come back.
    r = httpx.post(f"{url}/v2/models/{name}/versions/1/infer",
                   json={"inputs": [{"name": "pixels", "shape": [1, 28, 28], "datatype": "UINT8",
                                     "data": [[0] * 28] * 28}]})
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["logits"]
    assert "/predict" in httpx.get(f"{url}/openapi.json").json()["paths"]  # the other routes are still there


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("kind", ["pixels", "input"])
def test_tritonclient_defaults_binary_tensors_match_the_pytorch_model(triton, torch_model, digits, batch, kind):
    """tritonclient's defaults: binary tensor data both ways (set_data_from_numpy's binary_data=True, and
    with no outputs named, binary_data_output), each input form under its own model name."""
    import tritonclient.http as httpclient

    images = digits[0][:batch]
    want = torch_model.logits(normalize_pixels(images))
    name = torch_model.manifest["model"]["name"]
    if kind == "pixels":
        name += "-pixels"
        tensor = httpclient.InferInput("pixels", [batch, 28, 28], "UINT8")
        tensor.set_data_from_numpy(images.astype(np.uint8))
    else:
        tensor = httpclient.InferInput("input", [batch, 784], "FP32")
        tensor.set_data_from_numpy(normalize_pixels(images))
    result = triton.infer(name, [tensor])
    assert result.get_response()["model_name"] == name
    assert result.get_response()["outputs"][0]["parameters"] == {"binary_data_size": batch * 40}
    logits = result.as_numpy("logits")
    assert logits.shape == (batch, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
    # Binary outputs asked for by name (InferRequestedOutput's default), the second one as JSON.
    outputs = [httpclient.InferRequestedOutput("probabilities"),
               httpclient.InferRequestedOutput("logits", binary_data=False)]
    result = triton.infer(name, [tensor], outputs=outputs)
    kinds = {o["name"]: ("data" in o, o.get("parameters")) for o in result.get_response()["outputs"]}
    assert kinds == {"probabilities": (False, {"binary_data_size": batch * 40}), "logits": (True, None)}
    np.testing.assert_allclose(result.as_numpy("logits"), want, atol=1e-4, rtol=1e-4)
    assert (result.as_numpy("probabilities").argmax(axis=1) == want.argmax(axis=1)).all()


# -- issue 18: outputs amplification (item 1) and non-finite outputs (item 12) -----------------


@pytest.fixture
def v2(served):
    from starlette.testclient import TestClient

    from mnist_deploy.serve import create_app

    m = load_model(artifacts=served, runtime="onnx")
    with TestClient(create_app(model=m)) as c:
        yield c, f"/v2/models/{m.manifest['model']['name']}"


def _pixels(n: int = 1) -> dict:
    return {"name": "pixels", "datatype": "UINT8", "shape": [n, 784], "data": [0] * (784 * n)}


@pytest.mark.parametrize("outputs", [
    [{"name": "probabilities"}] * 2, [{"name": "logits"}, {"name": "probabilities"}, {"name": "logits"}],
    [{"name": "probabilities"}] * 5000, [{"name": "scores"}], [{"name": "logits"}, "logits"], {"name": "logits"},
], ids=["twice", "logits-twice", "5000", "unknown", "not-an-object", "not-a-list"])
def test_repeated_or_unknown_outputs_are_400(v2, outputs):
    client, path = v2
    r = client.post(path + "/infer", json={"inputs": [_pixels()], "outputs": outputs})
    assert r.status_code == 400, r.text[:300]
    assert "outputs" in r.json()["error"]


def test_the_response_is_bounded_by_the_outputs_the_model_has(v2):
    client, path = v2
    r = client.post(path + "/infer", json={"inputs": [_pixels(256)],
                                           "outputs": [{"name": "probabilities"}, {"name": "logits"}]})
    assert r.status_code == 200, r.text[:300]
    assert [o["name"] for o in r.json()["outputs"]] == ["probabilities", "logits"]
    assert len(r.content) < 2 * 256 * 10 * 30  # two tensors of 2,560 floats, at most ~30 bytes each


@pytest.mark.parametrize("value", [3e38, -3e38, 1e6, -50.0])
def test_fp32_input_out_of_the_normalised_range_is_400_never_null(v2, value):
    client, path = v2
    data = [0.0] * 784
    data[100] = value
    r = client.post(path + "/infer", json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784],
                                                       "data": data}], "outputs": [{"name": "logits"}]})
    assert r.status_code == 400, r.text[:300]
    assert "null" not in r.text and "normalised" in r.json()["error"]


def test_the_fp32_range_is_in_the_metadata_and_its_ends_are_served(v2, served):
    client, path = v2
    meta = client.get(path).json()
    bounds = {i["name"]: i.get("parameters") for i in meta["inputs"]}["input"]
    x = normalize_pixels(np.array([[0.0] * 392 + [255.0] * 392], np.float32))
    assert bounds["min"] <= float(x.min()) and float(x.max()) <= bounds["max"]
    assert bounds["max"] - bounds["min"] < 1.01 * float(x.max() - x.min())  # tight: no room for 3e38
    r = client.post(path + "/infer", json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784],
                                                       "data": x.ravel().tolist()}]})
    assert r.status_code == 200, r.text[:300]
    assert all(np.isfinite(r.json()["outputs"][0]["data"]))
