"""One error mapping for every route (issue 19): each error class carries its HTTP status, and the
JSON routes and the v2 routes answer it through one handler, during a drain too."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from mnist_deploy import errors
from mnist_deploy.serve import create_app
from mnist_deploy.serve.routes import error_reply

pytestmark = pytest.mark.integration


def test_every_error_class_carries_an_exit_code_and_an_http_status():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.MnistDeployError)]
    assert len(classes) >= 14
    for cls in classes:
        assert isinstance(cls.exit_code, int) and cls.exit_code > 0, cls
        assert 400 <= cls.http_status <= 599, cls
    assert errors.InputError.http_status == 422 and errors.BadRequest.http_status == 400
    assert errors.NotReady.http_status == errors.BatcherClosed.http_status == 503


@pytest.mark.parametrize("exc, path, status, key", [
    (errors.InputError("bad"), "/predict", 422, "detail"), (errors.InputError("bad"), "/v2/models/m/infer", 400, "error"),
    (errors.PayloadTooLarge("big"), "/v2/models/m/infer", 413, "error"), (errors.NotFound("no"), "/static/x", 404, "detail"),
    (errors.BatcherClosed("closed"), "/predict/batch", 503, "detail"), (RuntimeError("secret"), "/predict", 500, "detail"),
])
def test_error_reply_maps_the_class_and_the_protocol(exc, path, status, key):
    import json

    code, body = error_reply(exc, path)
    assert code == status
    text = json.loads(body)[key]
    assert text == (str(exc) if status != 500 else "internal server error")


@pytest.mark.parametrize("batch", [0, 8], ids=["pass-through", "batching"])
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "fastapi-route"])
def test_requests_after_the_batcher_closed_are_503_on_every_route(model, batch, fast_path):
    name = model.manifest["model"]["name"]
    app = create_app(model=model, max_batch_size=batch, fast_path=fast_path)
    with TestClient(app) as c:
        c.portal.call(app.service.batcher.close)  # what the lifespan's shutdown does during a drain
        r = c.post("/predict/batch", json={"pixels": [[0] * 784] * 2})
        assert r.status_code == 503 and "detail" in r.json(), r.text
        r = c.post("/predict", json={"pixels": [0] * 784})
        assert r.status_code == 503 and "detail" in r.json(), r.text
        r = c.post(f"/v2/models/{name}/infer", json={"inputs": [
            {"name": "pixels", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}]})
        assert r.status_code == 503 and "error" in r.json(), r.text
