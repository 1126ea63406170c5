"""The accuracy ladder's logic, with a stand-in quantizer whose agreement depends on the configuration
(the real quantizers are exercised in tests/export/test_int8.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from mnist_deploy.formats.quantize import METHODS, TUNING_MARGIN, QuantConfig, climb

N = 2000
GATE = {"min_agreement": 0.995, "max_accuracy_drop": 0.003}
LAYERS = ["fc1", "fc2", "fc3"]


def _setup(disagreements):
    """``disagreements(config) -> int``: how many of N tuning images the quantized model flips."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(N, 10)).astype(np.float32)
    labels = reference.argmax(1)
    images = np.zeros((N, 4), np.float32)
    written = []

    def quantize(config: QuantConfig, stem: Path) -> Path:
        path = stem.with_suffix(".fake")
        path.write_text(json.dumps(asdict(config)))
        written.append(path)
        return path

    def load(path: Path):
        config = QuantConfig(**{**json.loads(path.read_text()), "fp32_layers": tuple(json.loads(
            path.read_text())["fp32_layers"])})
        flips = disagreements(config)

        def predict(x):
            out = reference.copy()
            out[:flips] = np.roll(out[:flips], 1, axis=1)  # another digit for the first `flips` images
            return out

        return predict

    return quantize, load, (images, labels), reference, written


def _flips(agreement: float) -> int:
    return int(round(N * (1 - agreement)))


def test_first_rung_that_passes_stops_the_ladder(tmp_path):
    quantize, load, tuning, reference, written = _setup(lambda c: _flips(0.9999))
    result = climb(QuantConfig(), quantize=quantize, workdir=tmp_path, layers=LAYERS, tuning=tuning,
                   reference=reference, criteria=GATE, load=load)
    assert [r.step for r in result.rungs] == ["first"]
    assert result.chosen.passed and result.path.is_file()


def test_ladder_climbs_through_methods_then_size_then_fp32_layers(tmp_path):
    # The larger calibration set helps a little (so the fp32 rungs start from it); only keeping fc2 in
    # fp32 on top of it gets the model over the gate.
    def flips(c):
        if c.calibration_size > 500:
            return _flips(0.999) if "fc2" in c.fp32_layers else _flips(0.991)
        return _flips(0.99)

    quantize, load, tuning, reference, written = _setup(flips)
    result = climb(QuantConfig(), quantize=quantize, workdir=tmp_path, layers=LAYERS, tuning=tuning,
                   reference=reference, criteria=GATE, load=load)
    steps = [r.step for r in result.rungs]
    assert steps[:4] == ["first", *[f"method {m}" for m in METHODS[1:]], "calibration 2000"]
    assert steps[4:] == ["fp32 fc1 (sensitivity)", "fp32 fc2 (sensitivity)"]
    assert result.chosen.step == "fp32 fc2 (sensitivity)" and result.chosen.config.fp32_layers == ("fc2",)
    assert result.chosen.config.calibration_size == 2000
    assert [r.passed for r in result.rungs] == [False] * 5 + [True]
    assert all(r.agreement is not None for r in result.rungs)
    recorded = result.to_dict()
    assert recorded["fp32_layers"] == ["fc2"] and len(recorded["rungs"]) == 6
    assert recorded["layer_sensitivity"]["fc2"] > recorded["layer_sensitivity"]["fc1"]
    # Only the chosen rung's file is left.
    assert [p for p in written if p.exists()] == [result.path]


def test_top_k_sensitive_layers_are_kept_together(tmp_path):
    # fc1 and fc3 each help a little; only both in fp32 pass.
    def flips(c):
        kept = set(c.fp32_layers)
        return _flips(0.999) if {"fc1", "fc3"} <= kept else _flips(0.99 + 0.002 * len(kept & {"fc1", "fc3"}))

    quantize, load, tuning, reference, _ = _setup(flips)
    result = climb(QuantConfig(), quantize=quantize, workdir=tmp_path, layers=LAYERS, tuning=tuning,
                   reference=reference, criteria=GATE, load=load)
    assert result.chosen.step == "fp32 top 2"
    assert set(result.chosen.config.fp32_layers) == {"fc1", "fc3"}


def test_a_model_that_passes_only_unquantized_fails_honestly(tmp_path):
    def flips(c):
        return _flips(1.0) if set(c.fp32_layers) == set(LAYERS) else _flips(0.98)

    quantize, load, tuning, reference, _ = _setup(flips)
    result = climb(QuantConfig(), quantize=quantize, workdir=tmp_path, layers=LAYERS, tuning=tuning,
                   reference=reference, criteria=GATE, load=load)
    assert not result.chosen.passed
    assert all(len(r.config.fp32_layers) < len(LAYERS) for r in result.rungs)  # never tried all in fp32
    assert result.rungs[-1].step == "fp32 top 2"


def test_margin_and_accuracy_drop_are_part_of_the_gate(tmp_path):
    # Exactly at the gate is not enough on tuning images: the margin asks for more.
    quantize, load, tuning, reference, _ = _setup(lambda c: _flips(GATE["min_agreement"] + TUNING_MARGIN / 2))
    result = climb(QuantConfig(), quantize=quantize, workdir=tmp_path, layers=LAYERS, tuning=tuning,
                   reference=reference, criteria=GATE, load=load, ladder=False)
    assert [r.step for r in result.rungs] == ["first"] and not result.chosen.passed
    assert result.chosen.accuracy_drop == pytest.approx(1 - result.chosen.agreement)


def test_without_tuning_images_only_the_first_rung_is_written_unscored(tmp_path):
    quantize, load, _, _, _ = _setup(lambda c: 0)
    result = climb(QuantConfig(), quantize=quantize, workdir=tmp_path, layers=LAYERS, tuning=None,
                   reference=None, criteria=GATE, load=load)
    assert len(result.rungs) == 1 and result.chosen.agreement is None and result.path.is_file()
