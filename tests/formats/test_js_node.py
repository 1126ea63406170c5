"""Issue 22, Node: the ``onnx-node`` format (runtime ``onnxruntime-node``) through export, verify, bench and
predict, on the trained MLP, with the real Node runner (js/node_runner.mjs) and the onnxruntime-node that
scripts/js_env.sh installs from js/package-lock.json. Parity is checked against ONNX Runtime in Python and
PyTorch; the failure paths use a real runner told to return wrong logits, a PATH without node, an install
without node_modules and a node that is too old. No timing assertions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mnist_deploy.artifacts.files import sha256_file
from mnist_deploy.artifacts.manifest import load_manifest, save_manifest, verified_path
from mnist_deploy.cli import cli
from mnist_deploy.errors import RuntimeUnavailable
from mnist_deploy.formats import FORMATS, OrtPredictor, js_node, load_predictor, written_as

pytestmark = [pytest.mark.node, pytest.mark.integration]
FAST = {"warmup": 1, "min_time": 0.005, "min_calls": 3, "peak_sizes": (256,), "threads": 1}


def _data(mnist_dir, cache_dir) -> dict:
    return {"data_dir": mnist_dir, "cache_dir": cache_dir, "allow_download": False}


def _cli_data(mnist_dir, cache_dir) -> list[str]:
    return ["--data-dir", str(mnist_dir), "--cache-dir", str(cache_dir), "--no-download"]


def _needs_node():
    """Skip without node or onnxruntime-node (fail where CI demands the system tools: .ci/run installs them)."""
    reason = js_node.unavailable()
    if reason:
        if os.environ.get("MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail(reason)
        pytest.skip(reason)


def _test_images(mnist_dir, cache_dir, shape, n: int):
    from mnist_deploy.data.mnist import load_splits

    splits, _ = load_splits(mnist_dir, cache_dir=cache_dir, allow_download=False)
    return np.ascontiguousarray(splits["test"].images[:n].numpy().reshape(-1, *shape), dtype=np.float32)


@pytest.fixture(scope="module")
def node_exported(trained_mlp, tmp_path_factory, mnist_dir, cache_dir) -> Path:
    """The trained MLP exported to onnx and onnx-node, each with the full gate (10,000 images at batch 1
    and 10,000); read-only."""
    from mnist_deploy.export.run import export_artifacts

    _needs_node()
    folder = tmp_path_factory.mktemp("node") / "artifacts"
    shutil.copytree(trained_mlp, folder)
    report = export_artifacts(artifacts=folder, formats=["onnx", "onnx-node"], **_data(mnist_dir, cache_dir))
    assert report.ok, [r.error for r in report.failures]
    return folder


@pytest.fixture
def private(node_exported, tmp_path) -> Path:
    dst = tmp_path / "artifacts"
    shutil.copytree(node_exported, dst)
    return dst


def _tool_dir(tmp_path: Path, **scripts: str) -> Path:
    """A folder to put on PATH instead of the real one: the given shell scripts, no node unless given."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, body in scripts.items():
        path = folder / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return folder


# ---------------------------------------------------------------------------------------------
# Export, verify, predict: the gate passes in Node, on the very bytes Python proved.


def test_node_passes_the_gate_on_the_bytes_python_proved(node_exported):
    entries = load_manifest(node_exported)["artifacts"]
    entry, parity = entries["onnx-node"], entries["onnx-node"]["parity"]
    assert entry["status"] == "ok" and entry["runtime"] == "onnxruntime-node" and parity["passed"] is True
    assert parity["max_abs_diff"] <= 1e-4 and parity["agreement"] == 1.0
    assert set(parity["batch_sizes"]) == {"1", "10000"}
    assert all(run["images"] == 10_000 for run in parity["batch_sizes"].values())
    assert entry["sha256"] == entries["onnx"]["sha256"] and entry["copy_of"] == "onnx"
    # what ran is recorded: node and onnxruntime-node versions, from the runner itself
    lock = json.loads((js_node.js_dir() / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/onnxruntime-node"]["version"]
    applied = parity["applied"]
    assert applied["onnxruntime-node"] == pinned == entry["node"]["onnxruntime-node"]
    assert applied["node"] == entry["node"]["node"] and applied["timed_by"].startswith("the Node runner")


def test_node_logits_match_onnxruntime_in_python(node_exported, mnist_dir, cache_dir):
    shape = tuple(load_manifest(node_exported)["model"]["input_shape"])
    x = _test_images(mnist_dir, cache_dir, shape, 300)
    ref = OrtPredictor(verified_path(node_exported, "onnx"), "onnxruntime", threads=1)(x)
    predictor = load_predictor("onnx-node", verified_path(node_exported, "onnx-node"), threads=1)
    try:
        for n in (1, 7, 300):
            got = predictor(x[:n])
            assert got.shape == (n, 10) and got.dtype == np.float32
            np.testing.assert_allclose(got, ref[:n], atol=1e-4, rtol=0)
        # the configured thread count reached the session, as the Python row sets it
        details = predictor.details
        assert (details["threads"], details["intra_op_num_threads"], details["inter_op_num_threads"]) == (1, 1, 1)
    finally:
        predictor.close()


def test_verify_rechecks_the_node_runtime(node_exported, mnist_dir, cache_dir):
    from mnist_deploy.export.verify import verify_artifacts

    report = verify_artifacts(artifacts=node_exported, **_data(mnist_dir, cache_dir))
    assert report.ok, report.problems
    checks = {i.key: i.checks for i in report.items}["onnx-node"]
    assert "loads in onnxruntime-node" in checks and "parity" in checks and "onnx-node checks" in checks


def test_predict_with_the_node_runtime(node_exported, mnist_dir, tmp_path):
    from _serving import mnist_test_digits
    from PIL import Image

    from mnist_deploy.predict import predict_files

    images, labels = mnist_test_digits(mnist_dir, 4)
    for i, a in enumerate(images):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    files = [tmp_path / f"{i}.png" for i in range(4)]
    in_node = predict_files(files, artifacts=node_exported, runtime="onnx-node")
    in_python = predict_files(files, artifacts=node_exported, runtime="onnx")
    assert [r["digit"] for r in in_node] == [r["digit"] for r in in_python] == labels.tolist()
    for a, b in zip(in_node, in_python, strict=True):
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)
    res = CliRunner().invoke(cli, ["predict", str(files[0]), "--artifacts", str(node_exported),
                                   "--runtime", "onnx-node"])
    assert res.exit_code == 0 and res.stdout.split()[1] == str(labels[0]), res.output


def test_a_copy_is_not_offered_as_another_onnx_model():
    # package (Triton, KServe) takes the .onnx formats; the Node copy is the same file as onnx
    assert "onnx-node" not in written_as(".onnx") and "onnx" in written_as(".onnx")
    assert FORMATS["onnx-node"].copy_of == "onnx"


# ---------------------------------------------------------------------------------------------
# What must fail.


def test_wrong_logits_from_node_fail_the_gate(private, monkeypatch, mnist_dir, cache_dir):
    monkeypatch.setenv("MNIST_DEPLOY_FAULT", "node:wrong-logits")  # the runner adds 1.0 to logit 0
    res = CliRunner().invoke(cli, ["export", "--artifacts", str(private), "--format", "onnx-node",
                                   *_cli_data(mnist_dir, cache_dir)])
    assert res.exit_code == 1, res.output
    entry = load_manifest(private)["artifacts"]["onnx-node"]
    assert entry["status"] == "failed" and entry["parity"]["passed"] is False
    assert entry["parity"]["max_abs_diff"] > 0.5
    assert not (private / "mnist_model_node.onnx").exists()  # a failed file never keeps its name
    assert load_manifest(private)["artifacts"]["onnx"]["status"] == "ok"  # the Python row is untouched


def test_tampered_file_fails_verify(private, mnist_dir, cache_dir):
    from mnist_deploy.export.verify import verify_artifacts

    path = private / "mnist_model_node.onnx"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit inside the weights
    path.write_bytes(bytes(blob))
    report = verify_artifacts(artifacts=private, **_data(mnist_dir, cache_dir))
    assert not report.ok
    problems = {i.key: i.problems for i in report.items}
    assert any("sha256" in p for p in problems["onnx-node"]) and not problems["onnx"]


def test_changed_weights_with_a_matching_manifest_fail_parity_in_node(private, mnist_dir, cache_dir):
    """A file whose manifest entry was rewritten to match still has to pass the gate, in Node."""
    import onnx
    from onnx import numpy_helper

    from mnist_deploy.export.verify import verify_artifacts

    path = private / "mnist_model_node.onnx"
    proto = onnx.load(str(path))
    bias = next(t for t in proto.graph.initializer if len(t.dims) == 1 and t.dims[0] == 10)  # the last layer's
    values = numpy_helper.to_array(bias).copy()
    values[3] += 0.5
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(proto, str(path))
    manifest = load_manifest(private)
    manifest["artifacts"]["onnx-node"].update(sha256=sha256_file(path), size_bytes=path.stat().st_size)
    save_manifest(private, manifest)
    report = verify_artifacts(artifacts=private, **_data(mnist_dir, cache_dir))
    item = next(i for i in report.items if i.key == "onnx-node")
    assert not item.ok and "loads in onnxruntime-node" in item.checks
    assert any(p.startswith("parity failed") for p in item.problems), item.problems
    assert item.parity["max_abs_diff"] >= 0.49


def test_a_bad_request_is_one_error_and_the_runner_goes_on(node_exported):
    predictor = load_predictor("onnx-node", verified_path(node_exported, "onnx-node"), threads=1)
    try:
        with pytest.raises(js_node.NodeError) as info:
            predictor(np.zeros((2, 5), dtype=np.float32))  # not the model's input shape: ORT refuses it
        assert str(info.value).startswith("the Node runner: ") and "\n" not in str(info.value)
        assert predictor(np.zeros((3, 784), dtype=np.float32)).shape == (3, 10)  # still serving
        predictor._proc.kill()
        predictor._proc.wait()
        with pytest.raises(js_node.NodeError, match=r"the Node runner died \(exit -9\)"):
            predictor(np.zeros((1, 784), dtype=np.float32))
    finally:
        predictor.close()


def test_a_file_onnxruntime_node_refuses_is_one_load_error(tmp_path):
    """A well-formed ONNX file (the onnx library reads it) that ONNX Runtime cannot load: refused by the
    Node runner's hello frame, in one line naming the file, and no process is left running."""
    import onnx
    from onnx import TensorProto, helper

    from mnist_deploy.formats import LoadError

    _needs_node()
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 784])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])])
    path = tmp_path / "bad.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what our exporter writes; onnxruntime-node 1.30 reads IR versions up to 13
    onnx.save(model, str(path))
    with pytest.raises(LoadError) as info:
        load_predictor("onnx-node", path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: the Node runner cannot load it (") and "NoSuchOp" in msg and "\n" not in msg


def test_missing_node_is_a_skipped_row_with_the_reason(node_exported, tmp_path, monkeypatch, mnist_dir, cache_dir):
    from mnist_deploy.bench.run import run_bench

    monkeypatch.setenv("PATH", str(_tool_dir(tmp_path)))  # a PATH without node
    reason = js_node.unavailable()
    assert reason.startswith("no node on PATH") and "scripts/js_env.sh" in reason
    result = run_bench(artifacts=node_exported, runtimes="onnxruntime-node", batch_sizes="1", device="cpu",
                       **_data(mnist_dir, cache_dir), **FAST)
    (row,) = [r for r in result["records"] if r["device"] == "cpu"]
    assert row["status"] == "skipped" and row["reason"] == reason
    assert result["environment"]["runtime_versions"] == {"onnxruntime-node": {}}
    res = CliRunner().invoke(cli, ["export", "--artifacts", str(node_exported), "--format", "onnx-node",
                                   *_cli_data(mnist_dir, cache_dir)])
    assert res.exit_code != 0 and "no node on PATH" in res.output and "Traceback" not in res.output
    with pytest.raises(RuntimeUnavailable, match="no node on PATH"):
        load_predictor("onnx-node", verified_path(node_exported, "onnx-node"))


def test_missing_node_modules_says_run_js_env(tmp_path, monkeypatch):
    folder = tmp_path / "js"
    folder.mkdir()
    for name in ("node_runner.mjs", "package.json", "package-lock.json"):
        shutil.copy(js_node.js_dir() / name, folder / name)
    monkeypatch.setenv(js_node.JS_DIR_ENV, str(folder))
    reason = FORMATS["onnx-node"].unavailable("cpu")
    assert "onnxruntime-node is not installed" in reason and "run scripts/js_env.sh" in reason


def test_node_too_old_is_refused_with_the_reason(tmp_path, monkeypatch):
    _needs_node()
    bin_dir = _tool_dir(tmp_path, node='echo v14.21.3')  # an old Node.js that answers --version
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    reason = js_node.unavailable()
    assert reason is not None and "node 14.21.3" in reason and "too old" in reason and "16" in reason


def test_unavailable_machinery_is_cached_but_sees_a_change(tmp_path, monkeypatch):
    _needs_node()
    assert js_node.unavailable() is None
    monkeypatch.setenv(js_node.NODE_ENV, str(tmp_path / "no-such-node"))
    assert "is not an executable" in js_node.unavailable()


# ---------------------------------------------------------------------------------------------
# Timing: the runner times its own loop, and the bench uses it.


def test_bench_rows_are_timed_by_the_node_runner(node_exported, mnist_dir, cache_dir):
    from mnist_deploy.bench.run import run_bench

    result = run_bench(artifacts=node_exported, runtimes="onnxruntime,onnxruntime-node", batch_sizes="1,3",
                       device="cpu", **_data(mnist_dir, cache_dir), **FAST)
    rows = [r for r in result["records"] if r["status"] == "ok"]
    assert sorted((r["runtime"], r["batch_size"]) for r in rows) == [
        ("onnxruntime", 1), ("onnxruntime", 3), ("onnxruntime-node", 1), ("onnxruntime-node", 3)]
    for r in rows:
        assert r["n_calls"] >= FAST["min_calls"] and 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["accuracy"] > 0.9 and r["threads"] == 1
    versions = result["environment"]["runtime_versions"]["onnxruntime-node"]
    assert versions["onnxruntime-node"] == js_node.installed_version(js_node.js_dir()) and versions["node"]


def test_time_calls_counts_calls_and_warmup(node_exported):
    predictor = load_predictor("onnx-node", verified_path(node_exported, "onnx-node"), threads=1)
    try:
        x = predictor.prepare(np.zeros((4, 784), dtype=np.float32))
        times = predictor.time_calls(x, warmup=2, min_time=0.0, min_calls=25)
        assert times.dtype == np.int64 and len(times) == 25 and (times > 0).all()
        longer = predictor.time_calls(x, warmup=0, min_time=0.05, min_calls=1)
        assert longer.sum() >= 0.05e9 * 0.5  # it ran until min_time had passed (clock reads excluded)
    finally:
        predictor.close()


def test_runner_one_shot_modes(node_exported, tmp_path):
    node = js_node.node_executable()
    runner = js_node.js_dir() / "node_runner.mjs"
    x = np.random.default_rng(0).random((2, 784), dtype=np.float32)
    (tmp_path / "x.f32").write_bytes(x.tobytes())
    model = verified_path(node_exported, "onnx-node")
    subprocess.run([node, str(runner), "run", "--model", str(model), "--input", str(tmp_path / "x.f32"),
                    "--shape", "2,784", "--output", str(tmp_path / "y.f32"), "--threads", "1"],
                   check=True, capture_output=True)
    got = np.frombuffer((tmp_path / "y.f32").read_bytes(), dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, OrtPredictor(model, "onnxruntime")(x), atol=1e-4, rtol=0)
    out = subprocess.run([node, str(runner), "bench", "--model", str(model), "--input", str(tmp_path / "x.f32"),
                          "--shape", "1,784", "--warmup", "2", "--min-time", "0.01", "--min-calls", "5",
                          "--threads", "1"], check=True, capture_output=True, text=True).stdout
    stats = json.loads(out)
    assert stats["n_calls"] >= 5 and stats["threads"] == 1 and stats["batch_size"] == 1
    assert 0 < stats["min_ms"] <= stats["p50_ms"] <= stats["p99_ms"] and stats["bare_loop_mean_ms"] > 0
    bad = subprocess.run([node, str(runner), "run", "--model", str(tmp_path / "x.f32"), "--input",
                          str(tmp_path / "x.f32"), "--shape", "2,784", "--output", str(tmp_path / "z.f32")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("node_runner: ") and bad.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# The CNN's ONNX file, in Node.


@pytest.mark.slow
def test_the_cnn_in_node_matches_python(quick_cnn, tmp_path, mnist_dir, cache_dir):
    from mnist_deploy.export.run import export_artifacts

    _needs_node()
    folder = tmp_path / "artifacts"
    shutil.copytree(quick_cnn, folder)
    report = export_artifacts(artifacts=folder, formats=["onnx", "onnx-node"], parity_images=2000,
                              **_data(mnist_dir, cache_dir))
    assert report.ok, [r.error for r in report.failures]
    assert load_manifest(folder)["artifacts"]["onnx-node"]["parity"]["agreement"] == 1.0
    x = _test_images(mnist_dir, cache_dir, (1, 28, 28), 64)
    predictor = load_predictor("onnx-node", verified_path(folder, "onnx-node"), threads=1)
    try:
        np.testing.assert_allclose(predictor(x), OrtPredictor(verified_path(folder, "onnx"), "onnxruntime")(x),
                                   atol=1e-4, rtol=0)
    finally:
        predictor.close()
