"""open_artifact: manifest entry -> sha256-verified file -> predictor, and the one decision on an entry's
status, held to by all four callers (predict, package, bench, verify) on a real ONNX export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mnist_deploy.artifacts.manifest import load_manifest
from mnist_deploy.errors import IntegrityError, ManifestError
from mnist_deploy.formats import artifact_path, entry_problem, entry_usable, open_artifact
from mnist_deploy.formats.artifact import artifact_entry_checked

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------------------------------
# The decision, on plain entries.


def test_an_entry_is_usable_when_its_status_is_ok_or_absent():
    assert entry_usable({"status": "ok"}) and entry_usable({"path": "x.onnx", "sha256": "0" * 64})
    assert not entry_usable({"status": "failed"}) and not entry_usable({"status": "error"})
    assert not entry_usable({"status": "OK"})  # a status is a word the exporter wrote, not a guess


def test_entry_problem_says_why_not():
    assert entry_problem({"status": "ok"}) is None and entry_problem({"path": "x"}) is None
    assert entry_problem(None) == "was never exported"
    assert entry_problem({"status": "failed", "error": "parity: max |diff| 3.1"}) == \
        "export failed (parity: max |diff| 3.1)"
    assert entry_problem({"status": "failed"}) == "export failed (failed)"


def test_missing_and_failed_entries_are_manifest_errors(tmp_path):
    manifest = {"artifacts": {"onnx": {"status": "failed", "error": "exporter crashed"}}}
    with pytest.raises(ManifestError, match=r"no 'pt2' artifact; run `mnist-deploy export .* --format pt2` first"):
        artifact_entry_checked(manifest, "pt2", tmp_path)
    with pytest.raises(ManifestError, match=r"no 'state_dict' artifact; run `mnist-deploy train --out"):
        artifact_entry_checked(manifest, "pytorch", tmp_path)  # runs the state_dict: train makes it
    with pytest.raises(ManifestError, match=r"the 'onnx' export is marked 'failed' \(exporter crashed\); try"):
        artifact_entry_checked(manifest, "onnx", tmp_path, advice="; try")


# ---------------------------------------------------------------------------------------------
# On a real export, through every caller.


@pytest.fixture
def folder(served, tmp_path):
    dst = tmp_path / "artifacts"
    shutil.copytree(served, dst)
    return dst


def _set_status(folder, status: str | None) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = manifest["artifacts"]["onnx"]
    entry.pop("status")
    if status is not None:
        entry.update(status=status, error="parity: max abs diff 3.2 > 1e-4")
    path.write_text(json.dumps(manifest))


def test_open_artifact_returns_a_predictor_that_runs(folder):
    manifest = load_manifest(folder)
    predictor = open_artifact(manifest, "onnx", folder)
    assert predictor.runtime == "onnxruntime"
    assert predictor(np.zeros((3, 784), np.float32)).shape == (3, 10)
    assert artifact_path(manifest, "onnx", folder) == folder / "mnist_model.onnx"


def test_open_artifact_refuses_a_changed_file(folder):
    path = folder / "mnist_model.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        open_artifact(load_manifest(folder), "onnx", folder)


def test_an_entry_without_status_is_used_by_all_four_callers(folder, tmp_path, mnist_dir, cache_dir):
    from mnist_deploy.bench import run as bench
    from mnist_deploy.export.verify import verify_artifacts
    from mnist_deploy.package import package_artifacts
    from mnist_deploy.predict import load_model

    _set_status(folder, None)
    manifest = load_manifest(folder)
    assert "status" not in manifest["artifacts"]["onnx"]
    assert load_model(artifacts=folder, runtime="onnx").runtime == "onnx"
    assert package_artifacts(artifacts=folder, out=tmp_path / "pkg").model_path.is_file()
    assert bench.check_artifacts(folder, manifest, ("onnxruntime",), explicit=True) == {}
    assert bench.load_runtime("onnxruntime", folder, manifest, "cpu", 1)(np.zeros((1, 784), np.float32)).shape == (1, 10)
    report = verify_artifacts(artifacts=folder, data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False)
    item = next(i for i in report.items if i.key == "onnx")
    assert item.ok and "parity" in item.checks, item.problems  # still re-checked, not waved through


def test_a_failed_entry_is_refused_by_all_four_callers(folder, tmp_path, mnist_dir, cache_dir):
    from mnist_deploy.bench import run as bench
    from mnist_deploy.export.verify import verify_artifacts
    from mnist_deploy.package import package_artifacts
    from mnist_deploy.predict import load_model

    _set_status(folder, "failed")
    manifest = load_manifest(folder)
    with pytest.raises(ManifestError, match="marked 'failed'"):
        load_model(artifacts=folder, runtime="onnx")
    with pytest.raises(ManifestError, match="marked 'failed'.*parity gate is packaged"):
        package_artifacts(artifacts=folder, out=tmp_path / "pkg")
    assert not (tmp_path / "pkg" / "model_repository" / "mlp").exists()
    with pytest.raises(ManifestError, match="export failed"):
        bench.check_artifacts(folder, manifest, ("onnxruntime",), explicit=True)
    assert "export failed" in bench.check_artifacts(folder, manifest, ("onnxruntime",), explicit=False)["onnxruntime"]
    with pytest.raises(ManifestError, match="marked 'failed'"):
        bench.load_runtime("onnxruntime", folder, manifest, "cpu", 1)
    report = verify_artifacts(artifacts=folder, data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False)
    item = next(i for i in report.items if i.key == "onnx")
    assert not item.ok and "recorded as 'failed'" in item.problems[0]
