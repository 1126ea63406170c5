"""Parity arithmetic (compare_logits, judge, would_pass_hint) against numpy's allclose as the oracle.
Pure numpy: no MNIST files, no runtimes."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_deploy.export.parity import compare_logits, judge, would_pass_hint


def test_compare_logits_matches_numpy_allclose():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(500, 10)).astype(np.float32)
    cand = ref + rng.normal(scale=1e-3, size=ref.shape).astype(np.float32)
    labels = ref.argmax(1)
    for atol, rtol in ((1e-2, 0.0), (1e-4, 0.0), (0.0, 1e-2), (1e-4, 1e-3)):
        r = compare_logits(ref, cand, labels, atol=atol, rtol=rtol)
        assert r["within_tolerance"] == np.allclose(cand.astype(np.float64), ref.astype(np.float64),
                                                    atol=atol, rtol=rtol)
        # The smallest tolerances reported pass exactly, and anything smaller fails.
        assert np.allclose(cand.astype(np.float64), ref.astype(np.float64), atol=r["atol_needed"], rtol=rtol)
        assert not np.allclose(cand.astype(np.float64), ref.astype(np.float64), atol=r["atol_needed"] * 0.99,
                               rtol=rtol)
    d = np.abs(cand.astype(np.float64) - ref)
    assert r["max_abs_diff"] == pytest.approx(d.max())
    assert r["mean_abs_diff"] == pytest.approx(d.mean())
    assert r["max_rel_diff"] == pytest.approx((d / np.abs(ref)).max())


def test_judge_reports_disagreements_and_thresholds_that_would_pass():
    ref = np.eye(10, dtype=np.float32)[np.arange(100) % 10] * 5
    labels = ref.argmax(1)
    cand = ref.copy()
    cand[[3, 7], :] = cand[[3, 7], ::-1]  # two images now predict another digit
    runs = {"1": compare_logits(ref, cand, labels, atol=1e-4), "100": compare_logits(ref, cand, labels, atol=1e-4)}
    criteria = {"kind": "logits", "atol": 1e-4, "rtol": 0.0, "min_agreement": 1.0}
    passed, reasons, would = judge(runs, criteria, 1.0)
    assert not passed
    assert runs["1"]["first_disagreements"] == [3, 7]
    assert any("2 images predict another digit; first: 3, 7" in r for r in reasons)
    assert reasons[0].startswith("batch size 1 and 100:")
    assert would["min_agreement"] == pytest.approx(0.98)
    assert would["atol"] >= 5.0
    assert "--atol 5" in would_pass_hint("logits", would) and "--min-agreement 0.98" in would_pass_hint("logits", would)
    # Re-judged with the suggested thresholds, it passes.
    loose = {"kind": "logits", "atol": would["atol"], "rtol": 0.0, "min_agreement": would["min_agreement"]}
    runs2 = {k: compare_logits(ref, cand, labels, atol=would["atol"]) for k in runs}
    assert judge(runs2, loose, 1.0)[0]


def test_judge_int8_uses_agreement_and_accuracy_drop():
    ref = np.eye(10, dtype=np.float32)[np.arange(1000) % 10]
    labels = ref.argmax(1)
    cand = ref.copy()
    cand[:4] = np.roll(cand[:4], 1, axis=1)  # 4 of 1000 wrong: agreement 99.6%, accuracy drop 0.4 points
    runs = {"1000": compare_logits(ref, cand, labels, atol=None)}
    assert "within_tolerance" not in runs["1000"]
    crit = {"kind": "predictions", "min_agreement": 0.995, "max_accuracy_drop": 0.003}
    passed, reasons, would = judge(runs, crit, 1.0)
    assert not passed and len(reasons) == 1 and "0.40 points below" in reasons[0]
    assert would == {"max_accuracy_drop": 0.004}
    assert would_pass_hint("predictions", would) == "would pass with --int8-max-accuracy-drop 0.004"
    assert judge(runs, {**crit, "max_accuracy_drop": 0.004}, 1.0)[0]


def test_nan_output_fails():
    ref = np.ones((4, 10), dtype=np.float32)
    bad = ref.copy()
    bad[0, 0] = np.nan
    r = compare_logits(ref, bad, np.zeros(4, dtype=np.int64), atol=1.0)
    passed, reasons, _ = judge({"4": r}, {"kind": "logits", "atol": 1.0, "rtol": 0.0, "min_agreement": 0.0}, 1.0)
    assert not passed and "NaN" in reasons[0]
