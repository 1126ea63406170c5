"""The Open Inference Protocol core with no transport: model names, metadata, input validation, outputs
(the contract the HTTP routes and the gRPC server share), on the real served ONNX model."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_deploy.data.mnist import normalize_pixels
from mnist_deploy.errors import InputError, NotFound, NotReady
from mnist_deploy.serve import v2_core as core
from mnist_deploy.serve.service import Service


@pytest.fixture(scope="module")
def service(model):
    return Service(model)


def test_both_names_resolve_and_unknown_ones_name_both(service, model):
    name = model.manifest["model"]["name"]
    plain, pixels = core.resolve(service, name), core.resolve(service, f"{name}-pixels", "1")
    assert (plain.name, plain.input, plain.accepts) == (name, "input", ("input", "pixels"))
    assert (pixels.name, pixels.input, pixels.accepts) == (f"{name}-pixels", "pixels", ("pixels",))
    assert plain.model is pixels.model is model
    with pytest.raises(NotFound, match=f"'{name}' .*and '{name}-pixels'"):
        core.resolve(service, "resnet")
    with pytest.raises(NotFound, match="unknown version '2'"):
        core.resolve(service, f"{name}-pixels", "2")
    with pytest.raises(NotReady):
        core.resolve(Service(None), name)


def test_each_metadata_lists_one_input(service, model):
    name = model.manifest["model"]["name"]
    plain = core.metadata(core.resolve(service, name))
    pixels = core.metadata(core.resolve(service, f"{name}-pixels"))
    assert [i["name"] for i in plain["inputs"]] == ["input"] and plain["inputs"][0]["shape"] == [-1, 784]
    assert pixels["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 28, 28]}]
    lo, hi = plain["inputs"][0]["parameters"]["min"], plain["inputs"][0]["parameters"]["max"]
    ends = normalize_pixels(np.array([[0] * 783 + [255]], np.float32))[0, [0, -1]]
    assert lo < ends[0] < ends[1] < hi


def test_input_batch_normalises_pixels_and_passes_input_through(service, model):
    pixels = np.arange(784 * 2, dtype=np.int64).reshape(2, 28, 28) % 256
    want = normalize_pixels(pixels)
    for served, name, datatype, data in [
        (core.resolve(service, "mlp-pixels"), "pixels", "UINT8", pixels.astype(np.uint8)),  # raw bytes, gRPC
        (core.resolve(service, "mlp-pixels"), "pixels", "UINT8", pixels.tolist()),  # JSON
        (core.resolve(service, "mlp"), "pixels", "UINT8", pixels.ravel()),  # the old request
        (core.resolve(service, "mlp"), "input", "FP32", want.ravel().tolist()),
    ]:
        x = core.input_batch(service, served, name, datatype, [2, 28, 28], data)
        assert x.dtype == np.float32 and x.shape == (2, 784)
        np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize(("model_name", "name", "datatype", "shape", "data", "message"), [
    ("mlp-pixels", "input", "FP32", [1, 784], [0.0] * 784, "send 'input' to model 'mlp'"),
    ("mlp", "x", "FP32", [1, 784], [0.0] * 784, "unknown input 'x'"),
    ("mlp-pixels", "pixels", "FP32", [1, 784], [0] * 784, "has datatype UINT8"),
    ("mlp-pixels", "pixels", "UINT8", [1, -784], [0] * 784, "non-negative integers"),
    ("mlp-pixels", "pixels", "UINT8", [1, 783], [0] * 783, "not a batch of 28x28"),
    ("mlp-pixels", "pixels", "UINT8", [257, 784], [0] * 784 * 257, "at most 256 images"),
    ("mlp-pixels", "pixels", "UINT8", [1, 784], [0] * 783, "must hold 784 numbers"),
    ("mlp-pixels", "pixels", "UINT8", [1, 784], [300] * 784, "in 0..255"),
    ("mlp-pixels", "pixels", "UINT8", [1, 784], [0.5] * 784, "must be integers"),
    ("mlp", "input", "FP32", [1, 784], [3e38] * 784, "normalised pixels"),
    ("mlp", "input", "FP32", [1, 784], np.full(784, np.nan, np.float32), "finite"),
])
def test_input_batch_refuses_with_one_clear_message(service, model_name, name, datatype, shape, data, message):
    with pytest.raises(InputError, match=message):
        core.input_batch(service, core.resolve(service, model_name), name, datatype, shape, data)


def test_array_from_bytes_needs_the_exact_byte_count():
    raw = np.arange(784, dtype="<f4").tobytes()
    assert core.array_from_bytes("input", "FP32", 784, raw).tolist() == list(range(784))
    with pytest.raises(InputError, match="3,135 bytes of data, but shape x FP32 size is 3,136"):
        core.array_from_bytes("input", "FP32", 784, raw[:-1])
    assert core.array_from_bytes("pixels", "UINT8", 784, bytes(784)).dtype == np.uint8


def test_outputs_are_named_once_and_computed_from_the_logits():
    assert core.output_names(None) == core.output_names([]) == ["logits"]
    with pytest.raises(InputError, match="at most once"):
        core.output_names(["logits", "logits"])
    with pytest.raises(InputError, match="names from"):
        core.output_names(["scores"])
    logits = np.array([[0.0] * 9 + [5.0], [1.0] * 10], np.float32)
    out = dict(core.output_arrays(["probabilities", "logits"], logits))
    assert list(out) == ["probabilities", "logits"]
    assert out["probabilities"].dtype == np.float32 and out["probabilities"].flags.c_contiguous
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(out["logits"], logits)
