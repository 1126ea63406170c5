"""INT8 export on the real test set: the CPU's 8-bit path in the manifest, the accuracy ladder (tuned on
held-out training images, never test images), and verify naming both CPUs' 8-bit paths."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from mnist_deploy.artifacts.manifest import load_manifest, save_manifest
from mnist_deploy.export.run import export_artifacts, verify_artifacts
from mnist_deploy.export.source import load_eval_data
from mnist_deploy.formats import get_format
from mnist_deploy.formats.cpu_int8 import PATHS, int8_path

pytestmark = pytest.mark.integration
INT8 = [n for n in ("onnx-int8", "openvino-int8") if get_format(n).unavailable("cpu") is None]


def _hashes(images: np.ndarray) -> set[bytes]:
    flat = np.ascontiguousarray(images, dtype=np.float32).reshape(len(images), -1)
    return {hashlib.sha256(row.tobytes()).digest() for row in flat}


@pytest.fixture(scope="module")
def exported(trained_mlp, tmp_path_factory, mnist_dir, cache_dir):
    """The default MLP with every INT8 format exported by default flags."""
    out = tmp_path_factory.mktemp("int8")
    report = export_artifacts(artifacts=out, checkpoint=trained_mlp / "mnist_model_state_dict.pth", formats=INT8,
                              data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False)
    return out, report


@pytest.mark.parametrize("name", INT8)
def test_default_int8_passes_and_records_its_8_bit_path_and_rungs(exported, name):
    out, report = exported
    result = next(r for r in report.results if r.format == name)
    assert result.status == "ok", result.error
    entry = load_manifest(out)["artifacts"][name]
    q = entry["int8"]
    assert q["cpu_int8_path"] == int8_path() and q["cpu_int8_path"]["path"] in PATHS
    assert q["rungs"] and q["rungs"][0]["step"] == "first" and q["chosen"]["passed"]
    assert q["tuned_on"]["images"] > 0
    if name == "openvino-int8":  # read back from the compiled model: its quantized layers run in 8 bits
        applied = entry["parity"]["applied"]
        assert applied["precision"] == "int8 (f32 elsewhere)" and applied["int8_ops"] > 0
        assert q["quantizer"].startswith("nncf ")
    table = report.table()
    assert f"{name}: 8-bit path here {int8_path()['path']}" in table and "rung 1 first" in table


def test_tuning_images_are_training_images_never_test_images(trained_mlp, mnist_dir, cache_dir):
    data = load_eval_data(load_manifest(trained_mlp), mnist_dir, cache_dir, False)
    images, labels = data.tuning(5000)
    assert len(images) == 5000 and len(labels) == 5000
    idx = data.tuning_indices(5000)
    np.testing.assert_array_equal(images.reshape(5000, -1), data.train_images[idx].reshape(5000, -1))
    tuning = _hashes(images)
    assert not tuning & _hashes(data.images)  # no test image
    assert not tuning & _hashes(data.calibration(2000))  # and none the quantizer calibrated on


def test_export_tunes_on_what_the_context_offers_and_never_on_test_images(trained_mlp, tmp_path, monkeypatch,
                                                                          mnist_dir, cache_dir):
    """Whatever reaches the ladder as tuning data contains no test image (checked by content)."""
    from mnist_deploy.formats import quantize

    seen = []
    real = quantize.tuning_data

    def spy(model, ctx):
        out = real(model, ctx)
        seen.append(out[0][0])
        return out

    monkeypatch.setattr(quantize, "tuning_data", spy)
    report = export_artifacts(artifacts=tmp_path, checkpoint=trained_mlp / "mnist_model_state_dict.pth",
                              formats=["onnx-int8"], data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False)
    assert report.ok and len(seen) == 1
    test = load_eval_data(load_manifest(trained_mlp), mnist_dir, cache_dir, False).images
    assert not _hashes(seen[0]) & _hashes(test)


def test_ladder_climbs_when_the_gate_is_out_of_reach_and_records_every_step(trained_mlp, tmp_path, mnist_dir,
                                                                            cache_dir):
    # 100% agreement plus the tuning margin cannot be met: every rung misses, the best is kept, and the
    # verdict on the test images is the gate's (a fail unless the test set happens to agree fully).
    report = export_artifacts(artifacts=tmp_path, checkpoint=trained_mlp / "mnist_model_state_dict.pth",
                              formats=["onnx-int8"], int8_min_agreement=1.0, calibration_size=100,
                              data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False)
    entry = load_manifest(tmp_path)["artifacts"]["onnx-int8"]
    q = entry["int8"]
    steps = [r["step"] for r in q["rungs"]]
    assert steps[:4] == ["first", "method percentile", "method entropy", "calibration 400"]
    assert [s for s in steps if s.endswith("(sensitivity)")] == [f"fp32 {n} (sensitivity)"
                                                                  for n in q["layer_sensitivity"]]
    assert steps[-1] == f"fp32 top {len(q['layer_sensitivity']) - 1}"  # never all layers in fp32
    assert not any(r["passed"] for r in q["rungs"])
    assert all(r["agreement"] is not None or r["error"] for r in q["rungs"])
    assert q["chosen"]["agreement"] == max(r["agreement"] or 0 for r in q["rungs"])
    result = report.results[0]
    assert (result.status == "ok") is (result.parity["agreement"] == 1.0)
    assert "rung 5" in report.table()


def test_verify_names_both_8_bit_paths_when_an_int8_artifact_fails_here(exported, copy_artifacts, mnist_dir,
                                                                         cache_dir):
    out = copy_artifacts(exported[0])
    manifest = load_manifest(out)
    entry = manifest["artifacts"]["onnx-int8"]
    here = int8_path()["path"]
    other = "AVX2" if here != "AVX2" else "VNNI"
    entry["int8"]["cpu_int8_path"] = {"path": other, "saturating": other == "AVX2", "detail": other.lower()}
    # Another CPU whose arithmetic gives other predictions, played by a gate this one cannot meet.
    entry["parity"]["criteria"]["min_agreement"] = 1.0
    save_manifest(out, manifest)
    report = verify_artifacts(artifacts=out, data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False)
    problems = " ".join(report.problems)
    if report.ok:
        pytest.skip("the INT8 model agrees with fp32 on every test image: nothing to fail")
    assert "onnx-int8: parity failed" in problems and "passed at export" in problems
    assert f"8-bit path is {other} ({other.lower()}" in problems and f"this CPU's is {here} (" in problems
    assert "another path" in problems
    json.dumps(report.to_dict())
