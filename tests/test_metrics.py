"""Clinical metrics: AUC (binary, multi-class, classes missing from a split), per-class rates, ECE, intervals."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medsight.metrics import (auc_score, choose_threshold, bootstrap_ci, classification_metrics,
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
    t = choose_threshold(labels == 1, p1)
    assert 0.2 < t <= 0.3


# ------------------------------------------------------------------ one home of statistics: one bootstrap rule

def test_an_interval_needs_half_of_the_resamples_to_define_the_statistic():
    from medsight.metrics import percentile_ci

    assert percentile_ci([0.5] * 50 + [None] * 50, n_boot=100) == [0.5, 0.5]  # exactly half defined: given
    assert percentile_ci([0.5] * 49 + [None] * 51, n_boot=100) is None
    assert percentile_ci([float("nan")] * 60 + [0.1] * 40, n_boot=100) is None  # NaN counts as undefined
    lo, hi = percentile_ci(list(np.linspace(0, 1, 1001)), n_boot=1001)
    assert lo == pytest.approx(0.025) and hi == pytest.approx(0.975)


def test_binary_rates_by_hand():
    from medsight.metrics import binary_rates

    y = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    called = np.array([1, 1, 0, 1, 0, 0, 0], bool)  # TP 2, FN 1, FP 1, TN 3
    assert binary_rates(y, called) == {"sensitivity": 2 / 3, "specificity": 3 / 4, "ppv": 2 / 3, "npv": 3 / 4}
    none = binary_rates(np.zeros(3, bool), np.zeros(3, bool))
    assert none["sensitivity"] is None and none["ppv"] is None and none["specificity"] == 1.0


def test_every_task_kind_and_the_audits_take_their_intervals_from_the_one_bootstrap(monkeypatch):
    """A single-label, ordinal and multi-label task, the operating points and the subgroup audit all report
    what medsight.metrics.bootstrap.percentile_ci says (here a marker), so the rule is the same for all."""
    import medsight.metrics.bootstrap as boot
    from medsight.evaluation.subgroups import subgroup_metrics
    from medsight.metrics.operating_points import operating_point
    from medsight.tasks import MultiLabelTask, OrdinalTask, SingleLabelTask

    marker = [-1.0, -2.0]
    monkeypatch.setattr(boot, "percentile_ci", lambda draws, n_boot, level=0.95: marker)
    rng = np.random.default_rng(0)
    y3 = np.arange(60) % 3
    p3 = rng.dirichlet(np.ones(3), 60)
    single = SingleLabelTask(["a", "b", "c"]).metrics(y3, p3, n_boot=5)
    assert single["ci95"] == {"auc": marker, "accuracy": marker}
    ordinal = OrdinalTask(["0", "1", "2"]).metrics(y3, p3, n_boot=5)
    assert ordinal["ci95"]["qwk"] == marker and ordinal["refer"]["ci95"]["auc"] == marker
    y_ml = (rng.random((60, 2)) < 0.5).astype(float)
    multi = MultiLabelTask(["x", "z"]).metrics(y_ml, rng.random((60, 2)), n_boot=5)
    assert multi["ci95"]["auc"] == marker and multi["findings"]["x"]["ci95"]["auc"] == marker
    assert operating_point(y3 == 1, p3[:, 1], 0.3, n_boot=5)["ci95"]["ppv"] == marker
    groups = ["f" if i % 2 else "m" for i in range(60)]
    sub = subgroup_metrics(y3 == 1, p3[:, 1], 0.3, groups, min_size=10, n_boot=5)
    assert sub["groups"]["f"]["ci95"]["auc"] == marker and sub["gaps"]["auc"]["ci95"] == marker


def test_confidence_intervals_are_formatted_in_one_place():
    from medsight.metrics import format_ci

    assert format_ci([0.12345, 0.98765]) == "[0.1235, 0.9877]"
    assert format_ci([0.12345, 0.98765], 3) == "[0.123, 0.988]"
    assert format_ci(None) == ""


def test_a_findings_rates_at_its_threshold_by_hand():
    from medsight.metrics import multilabel_metrics

    labels = np.array([[1], [1], [0], [0], [-1]], dtype=float)  # the last label is masked
    probs = np.array([[0.9], [0.4], [0.5], [0.1], [0.99]])
    f = multilabel_metrics(labels, probs, ["effusion"], [0.5], n_boot=0)["findings"]["effusion"]
    assert (f["sensitivity"], f["specificity"]) == (0.5, 0.5)  # a score equal to the threshold is called positive
