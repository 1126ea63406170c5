"""The NumPy emulation of 8-bit matrix products: exact int32 sums (VNNI, ARM) against ``vpmaddubsw``'s
saturating int16 pair sums (x86 without VNNI), on hand-made numbers and on a real quantized MLP."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mnist_deploy.formats.cpu_int8 import int8_path
from mnist_deploy.formats.int8_emulation import EmulationStats, pair_products, run, saturation_report


def test_a_pair_over_int16_is_clipped_only_when_saturating():
    a = np.array([[255, 255, 1, 2]])
    w = np.array([[127, 127, 3, 4], [-128, -128, 0, 0], [64, 64, 0, 0]])
    exact = pair_products(a, w, saturate=False)
    stats = EmulationStats()
    sat = pair_products(a, w, saturate=True, stats=stats)
    assert exact.tolist() == [[64770 + 11, -65280, 32640]]
    assert sat.tolist() == [[32767 + 11, -32768, 32640]]  # 7-bit weights: 2 * 255 * 64 = 32640 fits
    assert stats.saturated_pairs == 2 and stats.max_abs_pair == 65280


def test_exact_matches_integer_matmul_and_7_bit_weights_never_saturate():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(64, 101))  # odd K: padded with a zero like the kernels do
    w8 = rng.integers(-127, 128, size=(16, 101))
    np.testing.assert_array_equal(pair_products(a, w8, saturate=False), a @ w8.T)
    assert (pair_products(a, w8, saturate=True) != a @ w8.T).any()  # full-range weights do saturate here
    w7 = rng.integers(-64, 65, size=(16, 101))
    stats = EmulationStats()
    np.testing.assert_array_equal(pair_products(a, w7, saturate=True, stats=stats), a @ w7.T)
    assert stats.saturated_pairs == 0 and stats.max_abs_pair <= 32767


@pytest.fixture(scope="module")
def quantized(trained_mlp, tmp_path_factory, mnist_dir, cache_dir):
    """The trained MLP quantized with the old default (8-bit weights, 8-bit logits) and the new one."""
    import torch
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from mnist_deploy.export.source import load_eval_data, load_source, reference_logits
    from mnist_deploy.formats.base import ExportContext
    from mnist_deploy.formats.onnx_family import OnnxOptions, _write_onnx_fp32
    from mnist_deploy.formats.quantize import QuantConfig, quantize_onnx

    folder = tmp_path_factory.mktemp("int8-emulation")
    source = load_source(trained_mlp / "mnist_model_state_dict.pth")
    data = load_eval_data(source.manifest, mnist_dir, cache_dir, False)
    images = data.images[:2000]
    fp32, prep = folder / "fp32.onnx", folder / "prep.onnx"
    _write_onnx_fp32(source.model, fp32, OnnxOptions(), ExportContext(example=torch.from_numpy(images[:2].copy())))
    quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
    calib = data.calibration(500)
    models = {}
    for name, cfg in {"old": replace(QuantConfig(), weights="s8", float_logits=False),
                      "new": QuantConfig()}.items():
        models[name] = folder / f"{name}.onnx"
        quantize_onnx(prep, models[name], cfg, calib)
    return models, images, reference_logits(source.model, images)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["old", "new"])
def test_emulation_computes_what_onnxruntime_computes_on_this_cpu(quantized, name):
    """The oracle is ONNX Runtime on this CPU, whose arithmetic is read from its flags: a VNNI or ARM CPU
    must match the exact emulation, an x86 CPU without VNNI the saturating one."""
    import onnxruntime as ort

    models, images, _ = quantized
    session = ort.InferenceSession(str(models[name]), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"input": images})[0]
    arithmetic = "saturating" if int8_path()["saturating"] else "exact"
    emulated = run(models[name], images, arithmetic)
    assert (ours.argmax(1) == emulated.argmax(1)).mean() >= 0.999
    # Requantizing in float may round one intermediate code differently; the logits stay close.
    assert np.abs(ours - emulated).mean() < 0.01 * np.abs(ours).mean()


@pytest.mark.integration
def test_old_default_saturates_and_new_default_is_exact(quantized):
    models, images, reference = quantized
    old = saturation_report(models["old"], images, reference)
    new = saturation_report(models["new"], images, reference)
    assert old["saturated_pairs"] > 0 and old["max_abs_pair"] > 32767
    assert new["saturated_pairs"] == 0 and new["max_abs_pair"] <= 32767
    assert new["changed_predictions"] == 0  # the same predictions on every ISA
    assert new["agreement_exact"] == new["agreement_saturating"]
