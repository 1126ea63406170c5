"""The v2 binary tensor data extension and the two model names, byte by byte: each malformed request is one
400 (or 413 for size) with one clear message, through the guard's fast path and the FastAPI route alike
(and with dynamic batching on).
tritonclient's own binary requests are in test_v2.py (a real server process)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from starlette.testclient import TestClient

from mnist_deploy.data.mnist import normalize_pixels
from mnist_deploy.serve import create_app

X = normalize_pixels(np.arange(2 * 784).reshape(2, 784) % 256)  # two normalised images, float32
RAW_X = X.astype("<f4").tobytes()


@pytest.fixture(scope="module", params=[(True, 0), (False, 0), (True, 8)],
                ids=["fast-path", "fastapi-route", "fast-path-batching"])
def client(request, model):
    fast_path, batch = request.param
    with TestClient(create_app(model=model, fast_path=fast_path, max_body_bytes=1 << 20,
                               max_batch_size=batch)) as c:
        yield c


def _binary(header: dict, raw: bytes, length: int | None = None, **headers) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head) if length is None else length),
                        "Content-Type": "application/octet-stream", **headers}


def _input(size: int | None = len(RAW_X), name: str = "input", datatype: str = "FP32", shape=(2, 784), **extra):
    params = {} if size is None else {"parameters": {"binary_data_size": size}}
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), **params, **extra}]}


def _split(r) -> tuple[dict, bytes]:
    n = int(r.headers["inference-header-content-length"])
    return json.loads(r.content[:n]), r.content[n:]


def test_binary_in_binary_out(client, model):
    want = model.logits(X)
    body, headers = _binary({**_input(), "id": "7", "parameters": {"binary_data_output": True}}, RAW_X)
    r = client.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text[:300]
    assert r.headers["content-type"] == "application/octet-stream"
    head, raw = _split(r)
    assert head["id"] == "7" and head["model_name"] == "mlp"
    assert head["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [2, 10],
                                "parameters": {"binary_data_size": 80}}]
    np.testing.assert_allclose(np.frombuffer(raw, "<f4").reshape(2, 10), want, atol=1e-4, rtol=1e-4)


def test_uint8_binary_pixels_gzip_and_mixed_outputs(client, model):
    pixels = (np.arange(2 * 784) % 256).astype(np.uint8)
    header = {**_input(len(pixels), "pixels", "UINT8", (2, 28, 28)),
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "logits"}]}
    body, headers = _binary(header, pixels.tobytes(), **{"Content-Encoding": "gzip"})
    r = client.post("/v2/models/mlp-pixels/versions/1/infer", content=gzip.compress(body), headers=headers)
    assert r.status_code == 200, r.text[:300]
    head, raw = _split(r)
    probs = np.frombuffer(raw, "<f4").reshape(2, 10)
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 80} and "data" not in head["outputs"][0]
    np.testing.assert_allclose(head["outputs"][1]["data"], model.logits(X).ravel(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_a_json_only_request_with_the_header_is_plain_json(client):
    body, headers = _binary({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784],
                                         "data": [0] * 784}]}, b"")
    r = client.post("/v2/models/mlp-pixels/infer", content=body, headers=headers)
    assert r.status_code == 200 and "inference-header-content-length" not in r.headers
    assert r.headers["content-type"] == "application/json" and len(r.json()["outputs"][0]["data"]) == 10


_BAD = {
    "header-past-body": (*_binary(_input(), RAW_X, length=10**6), "outside the body"),
    "header-negative": (*_binary(_input(), RAW_X, length=-1), "outside the body"),
    "header-not-a-number": (_binary(_input(), RAW_X)[0], {"Inference-Header-Content-Length": "12x"}, "an integer"),
    "header-cuts-the-json": (*_binary(_input(), RAW_X, length=20), "not valid JSON"),
    "size-more-than-sent": (*_binary(_input(len(RAW_X) + 4), RAW_X), "follow the JSON header"),
    "size-less-than-sent": (*_binary(_input(len(RAW_X) - 4), RAW_X), "follow the JSON header"),
    "size-negative": (*_binary(_input(-4), RAW_X), "non-negative integer"),
    "size-a-string": (*_binary(_input(str(len(RAW_X))), RAW_X), "non-negative integer"),
    "size-true": (*_binary(_input(True), RAW_X), "non-negative integer"),
    "no-size-but-bytes": (*_binary(_input(None), RAW_X), "no binary_data_size"),
    "no-size-no-data": (*_binary(_input(None), b""), "neither data nor"),
    "shape-times-dtype": (*_binary(_input(len(RAW_X), shape=(3, 784)), RAW_X), "shape x FP32 size is 9,408"),
    "fp32-bytes-as-uint8": (*_binary(_input(len(RAW_X), datatype="UINT8"), RAW_X), "has datatype FP32"),
    "data-and-size": (*_binary(_input(len(RAW_X), data=[0.0] * 1568), RAW_X), "both data and binary_data_size"),
    "size-without-header": (json.dumps(_input()).encode(), {"Content-Type": "application/json"},
                            "no Inference-Header-Content-Length"),
    "bad-binary-data-output": (*_binary({**_input(), "parameters": {"binary_data_output": "yes"}}, RAW_X),
                               "binary_data_output must be true or false"),
    "bad-binary-data": (*_binary({**_input(), "outputs": [{"name": "logits", "parameters": {"binary_data": 1}}]},
                                 RAW_X), "binary_data must be true or false"),
    "classification": (*_binary({**_input(), "outputs": [{"name": "logits", "parameters": {"classification": 3}}]},
                                RAW_X), "classification extension is not supported"),
    "out-of-range-fp32": (*_binary(_input(), np.full(1568, 3e38, "<f4").tobytes()), "normalised pixels"),
    "nan-fp32": (*_binary(_input(), np.full(1568, np.nan, "<f4").tobytes()), "finite"),
    "bad-gzip": (_binary(_input(), RAW_X)[0], {**_binary(_input(), RAW_X)[1], "Content-Encoding": "gzip"},
                 "not valid gzip"),
}


@pytest.mark.parametrize("case", list(_BAD))
def test_malformed_binary_requests_are_400_with_one_message(client, case):
    body, headers, message = _BAD[case]
    r = client.post("/v2/models/mlp/infer", content=body, headers=headers)
    assert r.status_code == 400, (case, r.status_code, r.text[:300])
    assert list(r.json()) == ["error"] and message in r.json()["error"], r.json()


def test_binary_bodies_have_the_json_bodies_limits(client):
    rows = 300  # over max_batch: refused from the shape, before the bytes are read as a tensor
    body, headers = _binary(_input(rows * 784, "pixels", "UINT8", (rows, 784)), bytes(rows * 784))
    r = client.post("/v2/models/mlp-pixels/infer", content=body, headers=headers)
    assert r.status_code == 400 and "at most 256 images" in r.json()["error"]
    body, headers = _binary(_input(2 << 20, "pixels", "UINT8", (2, 784)), bytes(2 << 20))
    r = client.post("/v2/models/mlp-pixels/infer", content=body, headers=headers)
    assert r.status_code == 413  # over the body limit as sent
    r = client.post("/v2/models/mlp-pixels/infer", content=gzip.compress(body),
                    headers={**headers, "Content-Encoding": "gzip"})
    assert r.status_code == 413 and "once decompressed" in r.json()["error"]  # and once inflated


# -- one model, one input list ----------------------------------------------------------------------------


def test_each_input_form_is_its_own_model(client):
    pixels = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}]}
    for name in ("mlp", "mlp-pixels"):  # the old request to "mlp" still works
        assert client.get(f"/v2/models/{name}/ready").json() == {"name": name, "ready": True}
        r = client.post(f"/v2/models/{name}/infer", json=pixels)
        assert r.status_code == 200 and r.json()["model_name"] == name, r.text[:300]
    assert [i["name"] for i in client.get("/v2/models/mlp-pixels").json()["inputs"]] == ["pixels"]
    assert [i["name"] for i in client.get("/v2/models/mlp/versions/1").json()["inputs"]] == ["input"]
    r = client.post("/v2/models/mlp-pixels/infer", json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 784], "data": X[0].tolist()}]})
    assert r.status_code == 400 and "send 'input' to model 'mlp'" in r.json()["error"]
    for path in ("/v2/models/cnn", "/v2/models/cnn/ready", "/v2/models/mlp-pixel/infer"):
        r = client.post(path, json=pixels) if path.endswith("infer") else client.get(path)
        assert r.status_code == 404 and "'mlp'" in r.json()["error"] and "'mlp-pixels'" in r.json()["error"]
