"""The OpenVINO predictor's static-shape compiles on a real exported IR: the same answers as the dynamic
model, at most the LRU's number of compiled models (counted on the predictor, each checked static), and
batch sizes beyond the cache still answered by the dynamic model."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_deploy.artifacts.manifest import verified_path
from mnist_deploy.formats import OpenVINOPredictor, get_format

pytestmark = pytest.mark.integration
RUNTIMES = [n for n in ("openvino", "openvino-int8") if get_format(n).unavailable("cpu") is None]


@pytest.fixture(scope="module")
def ir(exported_mlp, mnist_dir):
    """The session's exported MLP (every format, the full parity gate) and 2,000 test images."""
    from _serving import mnist_test_digits

    from mnist_deploy.data import normalize_pixels

    folder, report = exported_mlp
    for name in RUNTIMES:
        assert next(r for r in report.results if r.format == name).status == "ok", report.table()
    digits, _ = mnist_test_digits(mnist_dir, 2000)
    return folder, np.ascontiguousarray(normalize_pixels(digits), dtype=np.float32)


def _load(folder, name: str, **kw) -> OpenVINOPredictor:
    return OpenVINOPredictor(verified_path(folder, name), name, "f32", **kw)


def _same(got: np.ndarray, want: np.ndarray, name: str) -> None:
    if name.endswith("int8"):
        # The fused input quantization may round a value on a quantization boundary the other way:
        # at most a step here and there, never a different answer on more than a handful of images.
        np.testing.assert_allclose(got, want, atol=0.2, rtol=0)
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.999
    else:
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("name", RUNTIMES)
def test_static_shape_answers_as_the_dynamic_model(ir, name):
    folder, x = ir
    static, dynamic = _load(folder, name), _load(folder, name, static_shapes=0)
    want = dynamic(x[:1024])
    first = static(x[:1024])  # a size's first call runs on the dynamic model
    assert static.static.compiles == 0
    got = static(x[:1024])  # its second gets, and uses, a model compiled for (1024, 784)
    assert list(static.static.models) == [(1024, 784)] and static.static.compiles == 1
    shape = static.static.models[(1024, 784)].get_compiled_model().input(0).get_partial_shape()
    assert shape.is_static and [d.get_length() for d in shape] == [1024, 784]
    _same(first, want, name)
    _same(got, want, name)
    assert dynamic.static.compiles == 0 and not dynamic.static.models and dynamic.details["shapes"] == "dynamic"
    assert static.details["shapes"].startswith("static per batch size")


@pytest.mark.parametrize("name", RUNTIMES)
def test_lru_bound_and_sizes_beyond_it_still_answered(ir, name):
    folder, x = ir
    predictor, dynamic = _load(folder, name, static_shapes=3), _load(folder, name, static_shapes=0)
    for n in (1, 7, 64, 100, 333, 1000):  # six sizes, each called three times: three slots
        want = dynamic(x[:n])
        for _ in range(3):
            _same(predictor(x[:n]), want, name)
        assert len(predictor.static.models) <= 3
    assert list(predictor.static.models) == [(1, 784), (7, 784), (64, 784)] and predictor.static.compiles == 3
    for request in predictor.static.models.values():
        assert request.get_compiled_model().input(0).get_partial_shape().is_static
    _same(predictor(x), dynamic(x), name)  # 2,000: beyond the cache, on the dynamic model
    assert len(predictor.static.models) == 3 and not predictor.static.failed
