"""export.verify: every manifest entry re-checked (sha256, made from the recorded state_dict, loads,
parity), one problem line per thing that does not check out."""

from __future__ import annotations

import json
import shutil

import pytest

from mnist_deploy.export.verify import VerifyReport, verify_artifacts

pytestmark = pytest.mark.integration


def _verify(folder, mnist_dir, cache_dir):
    return verify_artifacts(artifacts=folder, data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False)


@pytest.fixture
def folder(served, tmp_path):
    dst = tmp_path / "artifacts"
    shutil.copytree(served, dst)
    return dst


def _edit_manifest(folder, change):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest["artifacts"])
    path.write_text(json.dumps(manifest))


def test_a_trained_folder_without_exports_verifies_by_sha256_alone(trained_mlp, mnist_dir, cache_dir):
    report = _verify(trained_mlp, mnist_dir, cache_dir)
    assert report.ok and report.problems == []
    assert {i.key for i in report.items} >= {"state_dict", "metrics"}
    assert all(i.checks == ["sha256"] and i.parity is None for i in report.items)


def test_an_export_is_rechecked_for_parity(folder, mnist_dir, cache_dir):
    report = _verify(folder, mnist_dir, cache_dir)
    assert report.ok, report.problems
    onnx = next(i for i in report.items if i.key == "onnx")
    assert onnx.checks[0] == "sha256" and "loads in onnxruntime" in onnx.checks and "parity" in onnx.checks
    assert onnx.parity["passed"] and onnx.parity["batch_sizes"]["1"]["images"] == 10_000  # always all of them
    as_dict = report.to_dict()
    assert as_dict["ok"] is True and json.dumps(as_dict)


def test_an_export_from_another_state_dict_is_refused(folder, mnist_dir, cache_dir):
    _edit_manifest(folder, lambda a: a["onnx"].update(source_state_dict_sha256="0" * 64))
    report = _verify(folder, mnist_dir, cache_dir)
    assert not report.ok
    assert report.problems == [f"onnx: {folder / 'mnist_model.onnx'}: exported from another state_dict than the "
                               "one in the manifest"]


def test_a_changed_state_dict_fails_it_and_every_export(folder, mnist_dir, cache_dir):
    sd = folder / "mnist_model_state_dict.pth"
    sd.write_bytes(sd.read_bytes() + b"\0")
    report = _verify(folder, mnist_dir, cache_dir)
    problems = dict(p.split(": ", 1) for p in report.problems)
    assert "sha256" in problems["state_dict"]
    assert problems["onnx"] == "cannot check parity: the state_dict is missing or changed"


def test_a_missing_file_and_a_failed_export_are_problems(folder, mnist_dir, cache_dir):
    (folder / "metrics.json").unlink()
    _edit_manifest(folder, lambda a: a["onnx"].update(status="failed", error="exporter crashed"))
    report = _verify(folder, mnist_dir, cache_dir)
    assert any(p.startswith("metrics: ") and "missing" in p for p in report.problems)
    assert "onnx: recorded as 'failed' at export: exporter crashed" in report.problems


def test_report_without_items_is_ok(tmp_path):
    assert VerifyReport(tmp_path).ok and VerifyReport(tmp_path).to_dict()["items"] == []
