"""The onnxruntime-web runtimes: the ONNX file in headless Chromium (Debian's, through Playwright), WASM
with threads and with one, through export (the parity gate on 10,000 test images at batch 1 and 10,000),
verify and bench; WebGPU a skipped row with the reason where the browser offers no GPU adapter; the
local server's files and headers; and the reasons given when Chromium, Playwright's package or ORT-web
is missing. No timing assertions."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from mnist_deploy.artifacts.manifest import load_manifest
from mnist_deploy.formats import FORMATS, js_web

WEB = ("onnxruntime-web", "onnxruntime-web-1t")
FAST = {"warmup": 2, "min_time": 0.05, "min_calls": 5, "peak_sizes": (256,), "threads": 2}


def _data(mnist_dir, cache_dir) -> dict:
    return {"data_dir": mnist_dir, "cache_dir": cache_dir, "allow_download": False}


def _needs_browser():
    reason = js_web.unavailable()
    if reason:
        if os.environ.get("MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def web_exported(trained_mlp, tmp_path_factory, mnist_dir, cache_dir) -> Path:
    from mnist_deploy.export.run import export_artifacts

    _needs_browser()
    folder = tmp_path_factory.mktemp("web") / "artifacts"
    shutil.copytree(trained_mlp, folder)
    report = export_artifacts(artifacts=folder, formats=["onnx", *WEB], **_data(mnist_dir, cache_dir))
    assert report.ok, [r.error for r in report.failures]
    return folder


# ---------------------------------------------------------------------------------------------
# Without a browser: availability and the local server.


def test_reasons_when_chromium_or_ort_web_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_DEPLOY_CHROMIUM", str(tmp_path / "no-chromium"))
    assert "no Chromium at" in js_web.unavailable()
    assert "no Chromium at" in FORMATS["onnxruntime-web"].unavailable("cpu")
    monkeypatch.delenv("MNIST_DEPLOY_CHROMIUM")
    if js_web.chromium() is None:
        pytest.skip("no Chromium here: the next reason cannot be reached")
    monkeypatch.setenv("MNIST_DEPLOY_JS", str(tmp_path))
    reason = js_web.unavailable()
    assert "onnxruntime-web is not installed" in reason and "scripts/js_env.sh" in reason
    assert FORMATS["onnxruntime-web-1t"].unavailable("cpu") == reason
    assert FORMATS["onnxruntime-web"].unavailable("cuda").startswith("onnxruntime-web runs on cpu")


def test_the_local_server_sends_only_its_files_cross_origin_isolated(tmp_path):
    with js_web.LocalServer(b"model bytes") as server:
        blob = server.put(b"\x00" * 8)

        def get(path):
            try:
                with urllib.request.urlopen(server.url + path, timeout=10) as r:
                    return r.status, dict(r.headers), r.read()
            except urllib.error.HTTPError as exc:
                return exc.code, dict(exc.headers), b""

        status, headers, body = get("/model.onnx")
        assert (status, body) == (200, b"model bytes")
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert get(blob)[2] == b"\x00" * 8 and get(blob)[0] == 404  # a batch is fetched once
        assert b"harness.js" in get("/")[2]
        for path in ("/ort/../../package.json", "/ort/ort.min.js.map", "/etc/passwd", "/harness.html"):
            assert get(path)[0] == 404, path


# ---------------------------------------------------------------------------------------------
# In Chromium.


@pytest.mark.slow
def test_web_runtimes_pass_the_gate_on_the_onnx_files_bytes(web_exported):
    entries = load_manifest(web_exported)["artifacts"]
    for name in WEB:
        parity = entries[name]["parity"]
        assert entries[name]["status"] == "ok" and parity["passed"] is True
        assert parity["max_abs_diff"] <= 1e-4 and parity["agreement"] == 1.0
        assert set(parity["batch_sizes"]) == {"1", "10000"}
        assert all(parity["batch_sizes"][b]["images"] == 10_000 for b in ("1", "10000"))
        assert entries[name]["sha256"] == entries["onnx"]["sha256"] and entries[name]["copy_of"] == "onnx"
    threaded = entries["onnxruntime-web"]["parity"]["applied"]
    single = entries["onnxruntime-web-1t"]["parity"]["applied"]
    # export gives no thread count: ORT-web's own default, min(4, ceil(cores / 2)), and what it applied
    assert threaded["cross_origin_isolated"] is True and threaded["threads_requested"] == 0
    assert threaded["threads"] == min(4, -(-threaded["hardware_concurrency"] // 2))
    assert single["threads"] == 1 and single["threads_requested"] == 1
    assert threaded["timer_resolution_us"] > 0


@pytest.mark.slow
def test_predictions_equal_onnxruntime_in_python(web_exported, mnist_dir):
    import onnxruntime as ort
    from _serving import mnist_test_digits

    from mnist_deploy.data.normalize import normalize
    from mnist_deploy.formats import open_artifact

    images, _labels = mnist_test_digits(mnist_dir, 300)
    x = normalize(images)
    session = ort.InferenceSession(str(web_exported / "mnist_model.onnx"))
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]
    predictor = open_artifact(load_manifest(web_exported), "onnxruntime-web", web_exported, threads=2)
    try:
        np.testing.assert_allclose(predictor(x), expected, atol=1e-4, rtol=0)  # one batch, sent by fetch
        np.testing.assert_allclose(predictor(x[:3]), expected[:3], atol=1e-4, rtol=0)  # inline base64
        times = predictor.time_calls(predictor.prepare(x[:1]), warmup=2, min_time=0.01, min_calls=5)
        assert times.dtype == np.int64 and len(times) >= 5 and (times >= 0).all()
    finally:
        predictor.close()


@pytest.mark.slow
def test_verify_rechecks_them_and_refuses_a_changed_copy(web_exported, tmp_path, mnist_dir, cache_dir):
    from mnist_deploy.export.run import verify_artifacts

    report = verify_artifacts(artifacts=web_exported, **_data(mnist_dir, cache_dir))
    assert report.ok, report.problems
    checked = {i.key: i.checks for i in report.items}
    assert "parity" in checked["onnxruntime-web"] and "parity" in checked["onnxruntime-web-1t"]
    folder = tmp_path / "artifacts"
    shutil.copytree(web_exported, folder)
    path = folder / "mnist_model_web.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    report = verify_artifacts(artifacts=folder, **_data(mnist_dir, cache_dir))
    problems = {i.key: i.problems for i in report.items}
    assert not report.ok and any("sha256" in p for p in problems["onnxruntime-web"])
    assert not problems["onnxruntime-web-1t"] and not problems["onnx"]


@pytest.mark.slow
def test_bench_times_them_in_the_page(web_exported, mnist_dir, cache_dir):
    from mnist_deploy.bench.run import run_bench

    result = run_bench(artifacts=web_exported, runtimes=("onnxruntime", *WEB, "onnxruntime-web-webgpu"),
                       batch_sizes="1,256", device="cpu", **_data(mnist_dir, cache_dir), **FAST)
    records = result["records"]
    rows = {(r["runtime"], r["batch_size"]): r for r in records}
    for name in WEB:
        for bs in (1, 256):
            row = rows[(name, bs)]
            assert row["status"] == "ok" and row["p50_ms"] > 0 and row["accuracy"] > 0.9, row
            assert row["n_calls"] >= FAST["min_calls"]
        assert "cross-origin isolated" in rows[(name, 1)]["performance_mode"]
    assert "2 threads" in rows[("onnxruntime-web", 1)]["performance_mode"]
    assert "1 thread," in rows[("onnxruntime-web-1t", 1)]["performance_mode"]
    webgpu = [r for r in records if r["runtime"] == "onnxruntime-web-webgpu"]
    assert webgpu and (webgpu[0]["status"] == "ok" or "WebGPU" in webgpu[0]["reason"]), webgpu
