"""Clinical metrics: AUC (binary, multi-class, classes missing from a split), per-class rates, ECE, intervals."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medsight.metrics import (auc_score, best_threshold, bootstrap_ci, classification_metrics,
                              expected_calibration_error)


def test_binary_metrics_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.4, 0.6, 0.3, 0.7, 0.8, 0.9, 0.95])
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(labels, probs, ["normal", "pneumonia"], n_boot=0, threshold=0.65)
    # argmax predictions: 0 0 1 0 1 1 1 1 -> one false positive, one false negative
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["per_class"]["pneumonia"]["recall"] == pytest.approx(4 / 5)  # sensitivity
    assert m["per_class"]["pneumonia"]["specificity"] == pytest.approx(2 / 3)
    assert m["per_class"]["normal"]["recall"] == pytest.approx(2 / 3)
    assert m["confusion_matrix"] == [[2, 1], [1, 4]]
    assert m["balanced_accuracy"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, p1))
    assert m["accuracy_at_threshold"] == pytest.approx(7 / 8)  # 0.6 becomes right; only 0.3 stays wrong


def test_multiclass_auc_over_the_classes_present():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), 40)
    labels = rng.integers(0, 4, 40)
    assert auc_score(labels, probs) == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    # a split where only classes 1 and 3 occur: the mean one-vs-rest AUC of those two
    two = np.where(rng.random(40) < 0.5, 1, 3)
    expected = np.mean([roc_auc_score(two == c, probs[:, c]) for c in (1, 3)])
    assert auc_score(two, probs) == pytest.approx(expected)
    assert auc_score(np.full(40, 2), probs) is None  # one class: undefined, not a crash


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bin of 0.9: accuracy 0.5 -> |0.5 - 0.9| x 1/2; bin of 0.6: accuracy 1.0 -> |1 - 0.6| x 1/2
    assert expected_calibration_error(labels, probs) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_n():
    rng = np.random.default_rng(1)

    def sample(n):
        labels = rng.integers(0, 2, n)
        p1 = np.clip(labels * 0.3 + rng.random(n) * 0.7, 0, 1)
        return labels, np.stack([1 - p1, p1], 1)

    small, large = sample(60), sample(2000)
    ci_small, ci_large = bootstrap_ci(*small, n_boot=300), bootstrap_ci(*large, n_boot=300)
    auc = auc_score(*large)
    assert ci_large["auc"][0] < auc < ci_large["auc"][1]
    assert ci_large["auc"][1] - ci_large["auc"][0] < ci_small["auc"][1] - ci_small["auc"][0]


def test_youden_threshold_separates_a_separable_set():
    labels = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.05, 0.1, 0.2, 0.3, 0.35])  # all below 0.5, yet perfectly ranked
    t = best_threshold(labels, np.stack([1 - p1, p1], 1))
    assert 0.2 < t <= 0.3
