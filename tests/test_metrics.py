"""metrics against scikit-learn, the independent oracle."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from mnist_deploy.metrics import classification_metrics


@pytest.mark.parametrize("seed", [0, 1])
def test_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, 2000)
    pred = np.where(rng.random(2000) < 0.8, y, rng.integers(0, 10, 2000))
    if seed == 1:
        pred[pred == 3] = 4  # a class never predicted: precision 0 by convention
    m = classification_metrics(y, pred)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    for ours, avg_fn in (("precision_macro", skm.precision_score), ("recall_macro", skm.recall_score),
                         ("f1_macro", skm.f1_score)):
        assert m[ours] == pytest.approx(avg_fn(y, pred, average="macro", zero_division=0))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(10), zero_division=0)
    for c in range(10):
        assert m["per_class"][str(c)]["precision"] == pytest.approx(p[c])
        assert m["per_class"][str(c)]["recall"] == pytest.approx(r[c])
        assert m["per_class"][str(c)]["f1"] == pytest.approx(f[c])
        assert m["per_class"][str(c)]["support"] == s[c]
    np.testing.assert_array_equal(np.array(m["confusion_matrix"]), skm.confusion_matrix(y, pred, labels=range(10)))
