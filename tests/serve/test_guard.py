"""The guard's accounting under vanishing clients (issue 18, item 6), over real sockets on 127.0.0.1."""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest

from mnist_deploy.serve import create_app

pytestmark = pytest.mark.integration

N = 6  # clients per route that send half a body, then hang up


def _half_body_then_hang_up(url: str, path: str, content_type: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    start = (b'--zz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
             b"Content-Type: image/png\r\n\r\n") if content_type.startswith("multipart") else b'{"pixels": ['
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: 4000\r\n\r\n".encode() + start + b"0" * 1500)
        time.sleep(0.05)  # the server starts reading the body
    # closed here, with 2,500 bytes of the body never sent


def _counts(text: str, route: str) -> dict[str, float]:
    pattern = rf'mnist_deploy_http_requests_total\{{method="POST",route="{re.escape(route)}",status="(\d+)"\}} (\S+)'
    return {code: float(v) for code, v in re.findall(pattern, text)}


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "fastapi-route"])
def test_client_disconnects_are_499_not_5xx_or_413(live, model, fast_path):
    name = model.manifest["model"]["name"]
    routes = [("/predict", "application/json"), ("/predict", "multipart/form-data; boundary=zz"),
              ("/predict/batch", "application/json"), (f"/v2/models/{name}/infer", "application/json")]
    with live(create_app(model=model, fast_path=fast_path)) as url:
        for path, ctype in routes:
            for _ in range(N):
                _half_body_then_hang_up(url, path, ctype)
        want = {"/predict": 2 * N, "/predict/batch": N, "/v2/models/{name}/infer": N}
        deadline = time.monotonic() + 15
        while True:
            text = httpx.get(url + "/metrics", timeout=5).text
            got = {route: _counts(text, route) for route in want}
            if all(sum(got[r].values()) >= n for r, n in want.items()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    for route, n in want.items():
        assert got[route] == {"499": n}, (route, got[route])
    assert 'mnist_deploy_http_request_errors_total{route="/predict",status="499"}' in text


def test_v2_infer_is_answered_by_the_guard_not_the_framework(model):
    """v2 infer, JSON and binary, takes the fast path /predict takes (the FastAPI route cost it two thirds
    of its time, docs/protocol.md); everything else still reaches FastAPI, and metrics count both."""
    from starlette.testclient import TestClient

    app = create_app(model=model)
    seen, framework = [], app.app

    async def recorder(scope, receive, send):
        if scope["type"] == "http":
            seen.append(scope["path"])
        await framework(scope, receive, send)

    app.app = recorder
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, 784]}
    head = b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784], ' \
           b'"parameters": {"binary_data_size": 784}}]}'
    with TestClient(app) as c:
        assert c.post("/v2/models/mlp/infer", json={"inputs": [{**pixels, "data": [0] * 784}]}).status_code == 200
        r = c.post("/v2/models/mlp-pixels/versions/1/infer", content=head + bytes(784),
                   headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 200, r.text
        assert c.post("/v2/models/nope/infer", json={}).status_code == 404
        assert c.get("/v2/models/mlp-pixels").status_code == 200
        assert c.post("/predict", json={"pixels": [0] * 784}).status_code == 200
        metrics = c.get("/metrics").text
    assert seen == ["/v2/models/mlp-pixels", "/metrics"]
    assert _counts(metrics, "/v2/models/{name}/infer") == {"200": 2.0, "404": 1.0}
