"""Request parsing under hostile nesting (issue 18, item 2): every route answers 4xx, never 500."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from mnist_deploy.serve import create_app
from mnist_deploy.serve.parsing import has_bool

pytestmark = pytest.mark.integration


def _nested(depth: int, leaf: str = "0") -> str:
    return "[" * depth + leaf + "]" * depth


def test_has_bool_walks_deep_values_without_recursion():
    import orjson

    deep = orjson.loads(_nested(1000, "[1, 2, true]"))
    assert has_bool(deep)
    assert not has_bool(orjson.loads(_nested(1000, "[1, 2, 3]")))
    assert has_bool({"a": [{"b": [False]}]}) and not has_bool({"a": ["true", 0, None]})


@pytest.fixture(params=[(True, 0), (False, 0), (True, 64)], ids=["fast-path", "fastapi-route", "batching"])
def client(request, model):
    fast_path, batch = request.param
    with TestClient(create_app(model=model, fast_path=fast_path, max_batch_size=batch)) as c:
        yield c


@pytest.mark.parametrize("depth", [320, 1000])
@pytest.mark.parametrize("route", ["/predict", "/predict/batch", "/v2/models/{name}/infer"])
def test_deep_nesting_with_a_boolean_anywhere_is_4xx(client, model, route, depth):
    deep = _nested(depth)
    if route.startswith("/v2"):
        route = route.format(name=model.manifest["model"]["name"])
        body = ('{"id": "not true", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], '
                f'"data": {deep}}}]}}')
    else:
        body = f'{{"note": "false", "pixels": {deep}}}'
    r = client.post(route, content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("depth", [100, 254, 300, 1000])
def test_a_v2_id_that_is_not_a_string_is_400(client, model, depth):
    name = model.manifest["model"]["name"]
    req = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}]}
    body = json.dumps(req)[:-1] + f', "id": {_nested(depth, chr(34) + "x" + chr(34))}}}'
    r = client.post(f"/v2/models/{name}/infer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert "id" in r.json()["error"]
    r = client.post(f"/v2/models/{name}/infer", json={**req, "id": "request-7"})
    assert r.status_code == 200 and r.json()["id"] == "request-7"
