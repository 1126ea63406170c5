"""Availability: every format's check says why it cannot run here, and $MNIST_DEPLOY_UNAVAILABLE rules
formats (by format name, runtime name or alias) or the CUDA device out as if the capability were missing,
with a one-line reason. No model, no data: the registry's own entries and its checks."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from mnist_deploy.bench.config import plan_devices
from mnist_deploy.cli import cli
from mnist_deploy.errors import InputError
from mnist_deploy.formats import FORMATS, UNAVAILABLE_ENV, available, exportable, ruled_out


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(UNAVAILABLE_ENV, raising=False)


def test_unset_rules_nothing_out():
    assert all(ruled_out(fmt, "cpu") is None for fmt in FORMATS.values())
    assert ruled_out(None, "cuda") is None
    # the checks themselves still decide: available() is exactly the formats whose check says nothing
    assert available("cpu") == tuple(n for n, f in FORMATS.items() if f.unavailable("cpu") is None)


@pytest.mark.parametrize("value", ["onnx-int8", "onnxruntime-int8", " ONNX-INT8 ,", "pt2,onnx-int8"])
def test_a_format_ruled_out_by_name_runtime_or_alias(monkeypatch, value):
    monkeypatch.setenv(UNAVAILABLE_ENV, value)
    reason = FORMATS["onnx-int8"].unavailable("cpu")
    assert reason == f"ruled out by {UNAVAILABLE_ENV}={value.strip()}"
    assert "onnx-int8" not in available("cpu") and "onnx-int8" not in available("cpu", exportable())
    assert FORMATS["onnx"].unavailable("cpu") is None  # the fp32 sibling is untouched
    assert "onnx" in available("cpu")


def test_cuda_ruled_out_for_every_format_and_for_bench(monkeypatch):
    monkeypatch.setenv(UNAVAILABLE_ENV, "cuda")
    for fmt in FORMATS.values():
        assert fmt.unavailable("cuda:0") == f"ruled out by {UNAVAILABLE_ENV}=cuda"
    assert FORMATS["onnx"].unavailable("cpu") is None
    assert plan_devices("all") == [("cpu", None), ("cuda", f"ruled out by {UNAVAILABLE_ENV}=cuda")]


def test_a_typo_is_an_error_not_a_silent_no_op(monkeypatch):
    monkeypatch.setenv(UNAVAILABLE_ENV, "openvino-bf61")
    with pytest.raises(InputError, match="unknown name 'openvino-bf61'.*openvino-bf16"):
        FORMATS["onnx"].unavailable("cpu")
    res = CliRunner().invoke(cli, ["export", "--out", "/nonexistent-p16", "--format", "onnx"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    line, = res.stderr.strip().splitlines()
    assert "MNIST_DEPLOY_UNAVAILABLE=openvino-bf61: unknown name" in line


def test_a_named_format_that_is_ruled_out_is_refused_by_export(monkeypatch, tmp_path):
    from mnist_deploy.errors import RuntimeUnavailable
    from mnist_deploy.export.run import export_artifacts

    monkeypatch.setenv(UNAVAILABLE_ENV, "pt2")
    with pytest.raises(RuntimeUnavailable, match=f"cannot export pt2: ruled out by {UNAVAILABLE_ENV}=pt2"):
        export_artifacts(artifacts=tmp_path, formats=["pt2"])
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_ruled_out_runtime_is_not_loaded(monkeypatch, tmp_path):
    from mnist_deploy.errors import RuntimeUnavailable
    from mnist_deploy.formats import load_predictor

    monkeypatch.setenv(UNAVAILABLE_ENV, "onnxruntime")
    with pytest.raises(RuntimeUnavailable, match=f"onnx on cpu: ruled out by {UNAVAILABLE_ENV}"):
        load_predictor("onnx", tmp_path / "mnist_model.onnx")
