"""export.source: the ExportConfig (validation, thresholds, options, the parity subset), the evaluation
data, the reference logits and the metadata written into every artifact."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mnist_deploy.artifacts.files import sha256_file
from mnist_deploy.errors import CheckpointError, InputError
from mnist_deploy.export.source import (
    DEFAULT_THRESHOLDS,
    EvalData,
    ExportConfig,
    artifact_metadata,
    load_source,
    reference_logits,
)
from mnist_deploy.formats import FORMATS, exportable


def test_from_arguments_splits_fields_from_format_options():
    c = ExportConfig.from_arguments(formats=["onnx", "onnx"], atol=1e-5, parity=False, parity_images=100,
                                    opset=18, torchscript_method=None)
    assert c.formats == ("onnx",) and c.atol == 1e-5 and c.parity is False and c.parity_images == 100
    assert c.options == {"opset": 18}  # None: the format's own default


def test_selected_formats():
    assert ExportConfig().selected() == exportable() and not ExportConfig().explicit
    assert ExportConfig(formats=("all",)).selected() == exportable()
    assert ExportConfig(formats=("pt2", "onnx")).selected() == ("pt2", "onnx")
    assert ExportConfig(formats=("pt2",)).explicit


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"formats": ("tflite",)}, "unknown format 'tflite'"),
    ({"options": {"quantisation": "static"}}, "unknown export option"),
    ({"atol": -1.0}, "--atol must be a finite number >= 0"),
    ({"rtol": math.nan}, "--rtol must be a finite number >= 0"),
    ({"min_agreement": 1.5}, "--min-agreement is a fraction"),
    ({"int8_max_accuracy_drop": -0.1}, "--int8-max-accuracy-drop is a fraction"),
    ({"parity_images": 0}, "--parity-images must be a whole number of images >= 1"),
    ({"parity_images": True}, "--parity-images"),
    ({"parity_images": 2.5}, "--parity-images"),
    ({"formats": ("onnx",), "options": {"opset": 3}}, "--opset"),
])
def test_validate_refuses_bad_input(kwargs, message):
    with pytest.raises(InputError, match=message):
        ExportConfig(**kwargs).validate()


def test_thresholds_default_to_the_formats_own_and_override_by_kind():
    fp32, reduced = FORMATS["onnx"], FORMATS["onnx-int8"]
    assert ExportConfig().criteria(fp32) == fp32.parity.criteria()
    assert ExportConfig().criteria(reduced) == reduced.parity.criteria()
    c = ExportConfig(atol=1e-3, int8_min_agreement=0.9)
    assert c.criteria(fp32)["atol"] == 1e-3 and c.criteria(fp32)["rtol"] == fp32.parity.rtol
    assert c.criteria(reduced) == {"kind": "predictions", "min_agreement": 0.9,
                                   "max_accuracy_drop": reduced.parity.max_accuracy_drop}
    assert DEFAULT_THRESHOLDS["atol"] == fp32.parity.atol


def _data(n=50):
    rng = np.random.default_rng(0)
    return EvalData(rng.normal(size=(n, 784)).astype(np.float32), np.arange(n) % 10,
                    rng.integers(0, 255, size=(200, 784)).astype(np.float32), (784,))


def test_head_is_the_first_images_and_keeps_the_calibration_set():
    data = _data()
    head = data.head(10)
    assert np.array_equal(head.images, data.images[:10]) and np.array_equal(head.labels, data.labels[:10])
    assert head.train_images is data.train_images
    assert data.head(None) is data and data.head(50) is data and data.head(10_000) is data


def test_calibration_is_the_same_images_for_the_same_n():
    data = _data()
    a, b = data.calibration(32), data.calibration(32)
    assert a.shape == (32, 784) and a.dtype == np.float32 and np.array_equal(a, b)
    # at most the calibration pool: of 200 training images, half are held out for INT8 tuning
    assert data.calibration(1000).shape == (100, 784)
    held_out = set(data.tuning_indices(1000).tolist())
    assert len(held_out) == 100 and not held_out & {i for i in range(200) if any(
        np.array_equal(data.train_images[i], row) for row in data.calibration(1000))}


def test_artifact_metadata_says_how_to_feed_the_model():
    manifest = {"model": {"name": "cnn", "hparams": {"c1": 32}, "input_shape": [1, 28, 28]},
                "preprocessing": {"scale": 1 / 255, "mean": 0.5, "std": 0.25, "layout": "N,1,28,28"}}
    meta = artifact_metadata(manifest, "ab" * 32)
    assert meta["model_name"] == "cnn" and json.loads(meta["model_hparams"]) == {"c1": 32}
    assert json.loads(meta["input_shape"]) == ["batch", 1, 28, 28]
    assert float(meta["preprocessing_mean"]) == 0.5 and float(meta["preprocessing_std"]) == 0.25
    assert json.loads(meta["class_labels"]) == [str(i) for i in range(10)]
    assert meta["source_state_dict_sha256"] == "ab" * 32 and all(isinstance(v, str) for v in meta.values())


def test_load_source_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_source(tmp_path / "nope.pth")


@pytest.mark.integration
def test_load_source_and_reference_logits(trained_mlp):
    import torch

    checkpoint = trained_mlp / "mnist_model_state_dict.pth"
    source = load_source(checkpoint)
    assert source.sha256 == sha256_file(checkpoint) and source.manifest["model"]["name"] == "mlp"
    x = np.random.default_rng(0).normal(size=(7, 784)).astype(np.float32)
    with torch.no_grad():
        expected = source.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(reference_logits(source.model, x), expected, rtol=1e-5, atol=1e-5)
