"""Tests that pin behaviour, not lines: known answers for the metrics (computed by hand in the comments),
decisions fitted on validation and used unchanged on test for every task kind (on data where validation
and test disagree, so a re-fit on test gives another number), the referable view and the per-epoch
selection metric of graded labels, and the planner's rules on a synthetic data set of each task kind."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medsight.config import Config, EvalConfig
from medsight.data.sources import DataBundle, SplitData
from medsight.evaluation.subgroups import subgroup_metrics
from medsight.evaluation.trust import decision_probs, fit_calibration, fit_on_validation, measure
from medsight.engine.trainer import monitor_value
from medsight.metrics.calibration import binary_ece, reliability_bins
from medsight.metrics.classification import auc_score, classification_metrics, expected_calibration_error
from medsight.metrics.conformal import conformal_quantile, fit_conformal
from medsight.metrics.multilabel import finding_thresholds, multilabel_metrics
from medsight.metrics.operating_points import choose_threshold, operating_point
from medsight.metrics.ordinal import (apply_cutpoints, fast_auc, fit_cutpoints, ordinal_metrics, quadratic_kappa,
                                      referable, weighted_kappa)
from medsight.metrics.selective import abstention_threshold
from medsight.planning import fingerprint, make_plan
from medsight.planning.fingerprint import Fingerprint
from medsight.planning.planner import CNN_BELOW, COATNET0_FROM, TARGET_STEPS
from medsight.tasks import TaskConfigError, build_task
from medsight.tasks.multilabel import MultiLabelTask
from medsight.tasks.ordinal import OrdinalTask
from medsight.tasks.single_label import SingleLabelTask

# ------------------------------------------------------------------------------------------ known answers

# A 3-grade confusion (rows: truth, columns: prediction), n = 10:
#   [[2, 1, 0],
#    [0, 2, 1],
#    [1, 0, 3]]
# Row and column sums are both (3, 3, 4), so E = outer / 10 = [[.9, .9, 1.2], [.9, .9, 1.2], [1.2, 1.2, 1.6]].
# Quadratic weights |i-j|^2: Σ w·O = 1 + 1 + 4 = 6 and Σ w·E = .9 + 4.8 + .9 + 1.2 + 4.8 + 1.2 = 13.8,
# so QWK = 1 - 6 / 13.8 = 13/23. Linear weights |i-j|: Σ w·O = 1 + 1 + 2 = 4, Σ w·E = 9.0: 1 - 4/9 = 5/9.
CONFUSION = np.array([[2, 1, 0], [0, 2, 1], [1, 0, 3]])


def _pairs(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = [], []
    for i, row in enumerate(confusion):
        for j, n in enumerate(row):
            y += [i] * int(n)
            p += [j] * int(n)
    return np.array(y), np.array(p)


def test_quadratic_and_linear_kappa_on_a_hand_computed_confusion():
    y, p = _pairs(CONFUSION)
    assert weighted_kappa(y, p, 3, 2) == pytest.approx(13 / 23, abs=1e-12)
    assert weighted_kappa(y, p, 3, 1) == pytest.approx(5 / 9, abs=1e-12)
    assert quadratic_kappa(y, p, 3) == pytest.approx(13 / 23, abs=1e-12)
    assert quadratic_kappa(y, p, 3, "linear") == pytest.approx(5 / 9, abs=1e-12)
    assert weighted_kappa(y, y, 3, 2) == pytest.approx(1.0)
    assert weighted_kappa(np.zeros(4, int), np.zeros(4, int), 3, 2) is None  # one grade everywhere: undefined


def test_ordinal_metrics_known_answers_and_referable_view():
    y, p = _pairs(CONFUSION)
    probs = np.eye(3)[p] * 0.8 + 0.2 / 3
    refer_scores = probs[:, 2]
    m = ordinal_metrics(y, probs, p, ["0", "1", "2"], refer_scores=refer_scores, refer_grade=2, refer_at=0.5,
                        n_boot=0)
    assert m["qwk"] == pytest.approx(13 / 23) and m["linear_kappa"] == pytest.approx(5 / 9)
    # errors: 1 (0->1), 1 (1->2), 2 (2->0): within one grade 9/10, MAE 4/10
    assert m["within_one"] == pytest.approx(0.9) and m["mae"] == pytest.approx(0.4)
    assert m["accuracy"] == pytest.approx(0.7)
    # referable = grade 2 (4 images); referred where predicted 2: 3 of 4 positives, 1 of 6 negatives (1->2)
    r = m["refer"]
    assert r["n_refer"] == 4 and r["sensitivity"] == pytest.approx(3 / 4) and r["specificity"] == pytest.approx(5 / 6)
    assert r["sensitivity_at_grade"] == pytest.approx(3 / 4) and r["specificity_at_grade"] == pytest.approx(5 / 6)
    low = referable(y, refer_scores, 1, 0.5)  # grade >= 1: 7 positives, 4 referred (predicted 2)
    assert low["n_refer"] == 7 and low["sensitivity"] == pytest.approx(4 / 7)


def test_classification_metrics_known_answers():
    # binary: truth 1 1 1 0 0 0 0 0; P(1) .9 .6 .3 .7 .2 .1 .1 .4
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p1 = np.array([0.9, 0.6, 0.3, 0.7, 0.2, 0.1, 0.1, 0.4])
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, probs, ["neg", "pos"], n_boot=0, threshold=0.35)
    # argmax (p >= .5): TP 2 (.9 .6), FN 1, FP 1 (.7), TN 4 -> accuracy 6/8
    assert m["accuracy"] == pytest.approx(6 / 8) and m["confusion_matrix"] == [[4, 1], [1, 2]]
    assert m["per_class"]["pos"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["pos"]["specificity"] == pytest.approx(4 / 5)
    assert m["per_class"]["neg"]["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # at .35: called .9 .6 .7 .4 -> TP 2, FP 2, TN 3, FN 1 -> 5/8
    assert m["accuracy_at_threshold"] == pytest.approx(5 / 8) and m["threshold"] == 0.35
    # AUC: of 15 positive-negative pairs the positive ranks higher in 12 (.6 loses to .7; .3 to .7 and .4)
    assert m["auc"] == pytest.approx(12 / 15) and auc_score(y, probs) == pytest.approx(12 / 15)
    assert fast_auc(y == 1, p1) == pytest.approx(12 / 15)
    assert fast_auc(np.array([1, 0], bool), np.array([0.5, 0.5])) == pytest.approx(0.5)  # a tie counts half


def test_expected_calibration_error_known_answers():
    # two images at confidence .9 (one right) and two at .6 (both right), 10 bins:
    # bin (.8, .9]: |0.5 - 0.9| * 2/4 = 0.2; bin (.5, .6]: |1 - .6| * 2/4 = 0.2 -> ECE 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    assert expected_calibration_error(labels, probs, n_bins=10) == pytest.approx(0.4)
    # binary ECE of a probability: scores .25 .25 .75 .75, outcomes 0 1 1 1 (2 bins):
    # bin [0, .5): |.5 - .25| * 1/2; bin [.5, 1]: |1 - .75| * 1/2 -> .25
    assert binary_ece(np.array([0, 1, 1, 1]), np.array([0.25, 0.25, 0.75, 0.75]), n_bins=2) == pytest.approx(0.25)
    bins = reliability_bins(np.array([0.25, 0.25, 0.75, 0.75]), np.array([0, 1, 1, 1]), n_bins=2)
    assert bins["count"] == [2, 2] and bins["frequency"] == [0.5, 1.0] and bins["confidence"] == [0.25, 0.75]


@pytest.mark.parametrize("n_pos,target,expected_rank", [(10, 0.7, 7), (10, 0.9, 9), (10, 0.85, 9), (10, 1.0, 10),
                                                       (10, 0.05, 1), (25, 0.28, 7), (50, 0.14, 7)])
def test_threshold_at_a_sensitivity_target_where_rounding_matters(n_pos, target, expected_rank):
    # positives with distinct scores: the threshold is the score of the ceil(target * n)-th highest positive;
    # 0.28 * 25 and 0.14 * 50 are 7.000000000000001 in floating point, and still mean 7
    pos = np.linspace(0.10, 0.55, n_pos)
    neg = np.array([0.05, 0.2, 0.6])
    y = np.r_[np.ones(n_pos, bool), np.zeros(3, bool)]
    s = np.r_[pos, neg]
    t = choose_threshold(y, s, target_sensitivity=target)
    assert t == pytest.approx(np.sort(pos)[::-1][expected_rank - 1])
    point = operating_point(y, s, t, n_boot=0)
    assert point["sensitivity"] == pytest.approx(expected_rank / n_pos)
    assert point["sensitivity"] >= target - 1e-12


def test_threshold_at_a_specificity_target_and_the_rates_it_gives():
    # 10 negatives .05 .. .50; target .7 -> at least 7 negatives strictly below: just above the 7th lowest (.35)
    neg = np.linspace(0.05, 0.50, 10)
    y = np.r_[np.zeros(10, bool), np.ones(4, bool)]
    s = np.r_[neg, [0.32, 0.36, 0.8, 0.9]]
    t = choose_threshold(y, s, target_specificity=0.7)
    assert 0.35 < t < 0.35 + 1e-12
    point = operating_point(y, s, t, n_boot=0)
    # called: negatives .40 .45 .50 (3 of 10) and positives .36 .8 .9 (3 of 4)
    assert point["specificity"] == pytest.approx(0.7) and point["sensitivity"] == pytest.approx(0.75)
    assert point["ppv"] == pytest.approx(3 / 6) and point["npv"] == pytest.approx(7 / 8)
    youden = choose_threshold(y, s)  # J: at .8 .5 + 1 - 1 = .5; at .36 .75 + .7 - 1 = .45; at .32 1 + .6 - 1 = .6
    assert youden == pytest.approx(0.32)


def test_subgroup_sensitivity_and_specificity_known_answers():
    # group A: positives scored .9 .8 .2, negatives .1 .6 ; group B: positives .7 .4, negatives .3 .2 .1
    y = np.array([1, 1, 1, 0, 0, 1, 1, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.2, 0.1, 0.6, 0.7, 0.4, 0.3, 0.2, 0.1])
    g = ["A"] * 5 + ["B"] * 5
    m = subgroup_metrics(y, s, 0.5, g, min_size=5, n_boot=0)
    a, b = m["groups"]["A"], m["groups"]["B"]
    assert a["n"] == 5 and a["n_positive"] == 3 and b["n_positive"] == 2
    assert a["sensitivity"] == pytest.approx(2 / 3) and a["specificity"] == pytest.approx(1 / 2)
    assert b["sensitivity"] == pytest.approx(1 / 2) and b["specificity"] == pytest.approx(1.0)
    assert a["auc"] == pytest.approx(5 / 6) and b["auc"] == pytest.approx(1.0)
    gap = m["gaps"]["sensitivity"]
    assert gap["best"] == "A" and gap["worst"] == "B" and gap["gap"] == pytest.approx(2 / 3 - 1 / 2)
    small = subgroup_metrics(y, s, 0.5, g, min_size=6, n_boot=0)  # both groups under the minimum size
    assert not small["groups"]["A"]["eligible"] and small["gaps"]["sensitivity"] is None


def test_multilabel_metrics_known_answers_with_masked_labels():
    labels = np.array([[1, 0], [0, -1], [1, 1], [0, 0]], dtype=np.float64)
    probs = np.array([[0.8, 0.2], [0.6, 0.9], [0.4, 0.7], [0.1, 0.6]])
    m = multilabel_metrics(labels, probs, ["a", "b"], [0.5, 0.65], n_boot=0)
    fa, fb = m["findings"]["a"], m["findings"]["b"]
    assert fa["sensitivity"] == pytest.approx(1 / 2) and fa["specificity"] == pytest.approx(1 / 2)
    assert fb["n"] == 3 and fb["masked"] == 1  # the -1 is left out
    assert fb["sensitivity"] == pytest.approx(1.0) and fb["specificity"] == pytest.approx(1.0)  # .6 < .65
    # decided at (.5, .65): [1 0] [1 1] [0 1] [0 0]; exact match (masked cells ignored): rows 1 and 4 -> 1/2;
    # Hamming: of 7 labelled cells, a is wrong on rows 2 and 3 -> 5/7
    assert m["exact_match"] == pytest.approx(0.5) and m["hamming_accuracy"] == pytest.approx(5 / 7)
    assert fa["auc"] == pytest.approx(3 / 4) and fb["auc"] == pytest.approx(1.0)
    assert m["auc"] == pytest.approx((3 / 4 + 1.0) / 2)


def test_conformal_quantile_is_the_finite_sample_corrected_rank():
    scores = np.arange(1, 11) / 10.0  # 10 scores .1 .. 1.0
    # alpha .2: rank ceil((10 + 1) * .8) = ceil(8.8) = 9 -> the 9th smallest, .9 (without the +1: 8 -> .8)
    assert conformal_quantile(scores, 0.2) == pytest.approx(0.9)
    assert conformal_quantile(scores, 0.1) == pytest.approx(1.0)  # ceil(9.9) = 10
    assert conformal_quantile(scores, 0.05) == float("inf")  # ceil(10.45) = 11 > 10: no finite quantile


def test_abstention_threshold_refers_the_asked_share():
    conf = np.linspace(0.5, 1.0, 11)  # .50 .55 ... 1.0: the 20% quantile is .6
    assert abstention_threshold(conf, 0.2) == pytest.approx(0.6)
    assert abstention_threshold(conf, 0.0) is None


def test_cutpoints_fitted_where_rounding_is_wrong():
    # expected grades all shifted up by .6: the rounding cuts (.5, 1.5) misgrade every grade 0 and 1 image
    labels = np.repeat([0, 1, 2], 20)
    scores = labels + 0.6 + np.tile(np.linspace(-0.05, 0.05, 20), 3)
    cuts = fit_cutpoints(labels, scores, 3)
    assert (apply_cutpoints(scores, cuts) == labels).all()
    assert 0.65 < cuts[0] < 1.55 and 1.65 < cuts[1] < 2.55
    assert (apply_cutpoints(scores, [0.5, 1.5]) != labels).sum() == 40


# --------------------------------------------------------------------- decisions fitted on validation only

def _disagreeing_binary(seed: int) -> tuple[np.ndarray, ...]:
    """Validation where the best threshold is high (~.7), test where it is low (~.3)."""
    rng = np.random.default_rng(seed)
    vy = np.r_[np.ones(40, int), np.zeros(40, int)]
    vp = np.r_[rng.uniform(0.65, 1.0, 40), rng.uniform(0.0, 0.7, 40)]
    ty = np.r_[np.ones(40, int), np.zeros(40, int)]
    tp = np.r_[rng.uniform(0.25, 1.0, 40), rng.uniform(0.0, 0.3, 40)]
    return vy, np.stack([1 - vp, vp], 1), ty, np.stack([1 - tp, tp], 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_label_test_metrics_use_the_validation_threshold(seed):
    vy, vp, ty, tp = _disagreeing_binary(seed)
    task = SingleLabelTask(["neg", "pos"])
    task.fit_decision(vy, vp)
    t_val = task.rules.threshold
    assert t_val is not None and t_val > 0.55
    m = task.metrics(ty, tp, n_boot=0)
    assert m["threshold"] == pytest.approx(t_val)
    assert m["accuracy_at_threshold"] == pytest.approx(((tp[:, 1] >= t_val) == ty).mean())
    refit = SingleLabelTask(["neg", "pos"])
    refit.fit_decision(ty, tp)
    assert refit.metrics(ty, tp, n_boot=0)["accuracy_at_threshold"] > m["accuracy_at_threshold"]


def test_temperature_fitted_on_validation_is_the_one_test_probabilities_use():
    rng = np.random.default_rng(0)
    vy = rng.integers(0, 3, 300)
    vlog = np.eye(3)[vy] * 1.0 + rng.normal(0, 1.0, (300, 3))  # weak logits: T < 1 sharpens them
    ty = rng.integers(0, 3, 300)
    tlog = np.eye(3)[ty] * 6.0 + rng.normal(0, 1.0, (300, 3))
    task = SingleLabelTask(["a", "b", "c"])
    fit_on_validation(task, EvalConfig(), vlog.astype(np.float32), vy)
    t_val = task.rules.temperature
    other = SingleLabelTask(["a", "b", "c"])
    fit_calibration(other, tlog.astype(np.float32), ty)
    assert abs(other.rules.temperature - t_val) > 0.1  # the two splits call for different temperatures
    expected = torch.softmax(torch.as_tensor(tlog, dtype=torch.float32) / t_val, 1).numpy()
    np.testing.assert_allclose(decision_probs(task, tlog.astype(np.float32)), expected, atol=1e-5)


@pytest.mark.parametrize("target", [None, 0.95])
def test_trust_rules_fitted_on_validation_are_applied_unchanged_to_test(target):
    vy, vp, ty, tp = _disagreeing_binary(3)
    vlog, tlog = np.log(np.clip(vp, 1e-4, 1)).astype(np.float32), np.log(np.clip(tp, 1e-4, 1)).astype(np.float32)
    ev = EvalConfig(target_sensitivity=target, abstain_fraction=0.2, bootstrap=0)
    task = SingleLabelTask(["neg", "pos"])
    vprobs = fit_on_validation(task, ev, vlog, vy)
    (name, y, score), = task.readout.binary_views(vy, vprobs)
    t = choose_threshold(y, score, target)
    m = measure(task, ev, tlog, ty)
    op = m["operating_points"]["views"][name]
    assert op["threshold"] == pytest.approx(t)
    tprobs = decision_probs(task, tlog)
    (_, ty_view, tscore), = task.readout.binary_views(ty, tprobs)
    assert op["sensitivity"] == pytest.approx((tscore[ty_view == 1] >= t).mean())
    assert op["specificity"] == pytest.approx((tscore[ty_view == 0] < t).mean())
    assert m["conformal"]["qhat"] == pytest.approx(fit_conformal(vy, vprobs, ev.conformal_coverage,
                                                                 ev.conformal_score)["qhat"])
    below = abstention_threshold(task.readout.confidence(vprobs), 0.2)
    assert (task.readout.confidence(vprobs) < below).mean() == pytest.approx(0.2, abs=0.02)  # a fifth of val is referred
    assert m["selective"]["abstention"]["threshold"] == pytest.approx(below)
    assert m["selective"]["abstention"]["referred"] == pytest.approx((task.readout.confidence(tprobs) < below).mean())


def test_multilabel_test_metrics_use_the_validation_thresholds():
    rng = np.random.default_rng(0)
    n = 200
    vy = rng.integers(0, 2, (n, 2)).astype(np.float32)
    ty = rng.integers(0, 2, (n, 2)).astype(np.float32)
    # finding 0: validation separates at ~.8, test at ~.2; finding 1 the other way round
    vp = np.where(vy == 1, rng.uniform([0.75, 0.15], [1.0, 1.0], (n, 2)), rng.uniform([0.0, 0.0], [0.8, 0.2], (n, 2)))
    tp = np.where(ty == 1, rng.uniform([0.15, 0.75], [1.0, 1.0], (n, 2)), rng.uniform([0.0, 0.0], [0.2, 0.8], (n, 2)))
    task = MultiLabelTask(["a", "b"])
    task.fit_decision(vy, vp)
    t_val, _ = finding_thresholds(vy, vp, task.options["threshold_rule"], float(task.options["target_sensitivity"]))
    assert task.thresholds == pytest.approx(t_val)
    m = task.metrics(ty, tp, n_boot=0)
    for k, c in enumerate(["a", "b"]):
        f = m["findings"][c]
        assert f["threshold"] == pytest.approx(t_val[k])
        called = tp[:, k] >= t_val[k]
        assert f["sensitivity"] == pytest.approx(called[ty[:, k] == 1].mean())
        assert f["specificity"] == pytest.approx((~called[ty[:, k] == 0]).mean())
    t_test, _ = finding_thresholds(ty, tp)
    assert abs(t_test[0] - t_val[0]) > 0.3  # a re-fit on test would give other thresholds
    np.testing.assert_array_equal(task.decide(tp), (tp >= np.array(t_val)[None]).astype(int))


def _graded(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Grades 0..3 whose probabilities put the expected grade at ``grade + shift``."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), n // 4)
    target = np.clip(y + shift + rng.uniform(-0.15, 0.15, len(y)), 0, 3)
    lo = np.floor(target).astype(int).clip(0, 2)
    w = target - lo
    p = np.zeros((len(y), 4))
    p[np.arange(len(y)), lo] = 1 - w
    p[np.arange(len(y)), lo + 1] += w
    return y, p


def test_ordinal_test_metrics_use_the_validation_cutpoints_and_referral_threshold():
    vy, vp = _graded(80, 0.4, 0)  # validation: expected grades shifted up
    ty, tp = _graded(80, -0.4, 1)  # test: shifted down
    task = OrdinalTask(["0", "1", "2", "3"], options={"head": "regression", "refer_grade": 2})
    task.fit_decision(vy, vp)
    cuts = task.head.cutpoints(task.rules)
    assert cuts == pytest.approx(fit_cutpoints(vy, (vp @ np.arange(4)), 4))
    assert cuts[0] > 0.6  # fitted to the upward shift, not the rounding cuts
    m = task.metrics(ty, tp, n_boot=0)
    pred = apply_cutpoints((tp @ np.arange(4)), cuts)
    assert m["cutpoints"] == pytest.approx(cuts)
    assert m["qwk"] == pytest.approx(quadratic_kappa(ty, pred, 4))
    refit = fit_cutpoints(ty, (tp @ np.arange(4)), 4)
    assert quadratic_kappa(ty, apply_cutpoints((tp @ np.arange(4)), refit), 4) > m["qwk"] + 0.05
    t_val = choose_threshold(vy >= 2, task.refer_scores(vp), target_sensitivity=0.9)
    assert m["refer"]["threshold"] == pytest.approx(t_val)
    scores = task.refer_scores(tp)
    assert m["refer"]["sensitivity"] == pytest.approx((scores[ty >= 2] >= t_val).mean())


def test_ordinal_softmax_head_decides_the_most_probable_grade_and_epoch_qwk_selects():
    y, p = _pairs(CONFUSION)
    probs = np.eye(3)[p] * 0.7 + 0.1
    task = OrdinalTask(["0", "1", "2"], options={"head": "ce", "refer_grade": 1})
    em = task.epoch_metrics(y, probs)
    assert em["qwk"] == pytest.approx(13 / 23) and em["accuracy"] == pytest.approx(0.7)
    assert em["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)
    assert monitor_value(em, val_loss=0.3, monitor="qwk") == pytest.approx(13 / 23)
    assert monitor_value(em, val_loss=0.3, monitor="loss") == pytest.approx(-0.3)
    better = task.epoch_metrics(y, np.eye(3)[y] * 0.7 + 0.1)
    assert monitor_value(better, 0.3, "qwk") > monitor_value(em, 0.3, "qwk")


# ------------------------------------------------------------------------------------- grades as grades

def test_refer_grade_is_read_in_the_labels_units():
    task = OrdinalTask(["1", "2", "3", "4", "5"], options={"refer_grade": 3})
    y = np.array([1, 2, 3, 4, 5]) - 1  # label indices of grades 1..5
    probs = np.eye(5)[y]
    (name, positive, score), = task.readout.binary_views(y, probs)
    assert name == "grade ≥ 3" and positive.tolist() == [0, 0, 1, 1, 1]  # grades 3, 4, 5 are referred
    assert score.tolist() == [0, 0, 1, 1, 1]
    assert OrdinalTask(["0", "1", "2", "3", "4"], options={"refer_grade": 2}).refer_grade == 2  # 0-based grades
    with pytest.raises(TaskConfigError, match=r"refer_grade=1 .* would refer every grade"):
        OrdinalTask(["1", "2", "3"], options={"refer_grade": 1})
    with pytest.raises(TaskConfigError, match=r"refer_grade=6 .* would refer no grade"):
        OrdinalTask(["1", "2", "3", "4", "5"], options={"refer_grade": 6})


def test_grades_spelled_two_ways_are_named():
    with pytest.raises(TaskConfigError, match=r"'01' and '1' are both grade 1"):
        OrdinalTask(["0", "01", "1", "2"])


# ------------------------------------------------------------------------------------------- the planner

def _fp(task: str, n_train: int, counts_val: list[int], *, side: int = 28, aspect: float = 1.0, mixed: bool = False,
        imbalance: float = 1.0, classes: int = 2, prepared: dict | None = None) -> Fingerprint:
    return Fingerprint(source="synthetic", task=task, classes=[str(i) for i in range(classes)],
                       counts={"train": [n_train // classes] * classes, "val": counts_val, "test": counts_val},
                       n_train=n_train, image_side=side, aspect=aspect, channels=1, mixed=mixed, imbalance=imbalance,
                       sampled=10, prepared=prepared)


def _decided(fp: Fingerprint) -> dict:
    plan = make_plan(fp, Config())
    return {d.key: d.value for d in plan.decisions}


def test_planner_single_label_rules_at_their_boundaries():
    small = _decided(_fp("single_label", CNN_BELOW - 1, [10, 10], side=100))
    assert small["model.name"] == "resnet18" and small["data.image_size"] == 128
    assert small["train.monitor"] == "auc" and small["data.rotate_degrees"] == 10.0
    assert _decided(_fp("single_label", CNN_BELOW, [10, 10]))["model.name"] == "coatnet_tiny"
    assert _decided(_fp("single_label", COATNET0_FROM, [10, 10]))["model.name"] == "coatnet_0"
    big = _decided(_fp("single_label", 4708, [10, 10], side=28))
    assert big["data.image_size"] == 64 and big["train.batch_size"] == 64
    assert big["train.epochs"] == max(4, round(TARGET_STEPS / math.ceil(4708 / 64)))  # 300 / 74 -> 4
    assert big["optim.lr"] == pytest.approx(2e-3)
    tiny = _decided(_fp("single_label", 200, [5, 5]))
    assert tiny["train.batch_size"] == 8 and tiny["train.epochs"] == 12 and tiny["optim.lr"] == pytest.approx(2.5e-4)
    assert _decided(_fp("single_label", 200, [5, 0]))["train.monitor"] == "loss"  # one class in val
    part = _decided(_fp("single_label", 1000, [5, 5]))  # batch 32, ceil(1000 / 32) = 32 steps: round(300 / 32) = 9
    assert part["train.batch_size"] == 32 and part["train.epochs"] == 9
    assert _decided(_fp("single_label", 3000, [5, 5], side=600))["data.image_size"] == 224


def test_planner_imbalance_and_resize_rules():
    skewed = _decided(_fp("single_label", 3000, [5, 5, 5], classes=3, imbalance=10))
    assert skewed["train.class_weights"] is True and skewed["train.class_weight_mode"] == "effective"
    mild = _decided(_fp("single_label", 3000, [5, 5, 5], classes=3, imbalance=9.9))
    assert mild["train.class_weights"] is False
    assert _decided(_fp("single_label", 3000, [5, 5], imbalance=2))["train.class_weight_mode"] == "inverse"
    assert _decided(_fp("single_label", 3000, [5, 5], aspect=1.1))["data.resize"] == "squash"
    assert _decided(_fp("single_label", 3000, [5, 5], aspect=1.11))["data.resize"] == "pad"
    assert _decided(_fp("single_label", 3000, [5, 5], aspect=1 / 1.11))["data.resize"] == "pad"
    assert _decided(_fp("single_label", 3000, [5, 5], mixed=True))["data.resize"] == "pad"


def test_planner_multilabel_monitoring_rule():
    some = _decided(_fp("multilabel", 3000, [0, 3, 0], classes=3))
    assert some["train.monitor"] == "auc" and some["train.class_weights"] is True
    none = _decided(_fp("multilabel", 3000, [0, 0, 0], classes=3))
    assert none["train.monitor"] == "loss"


def test_planner_ordinal_monitors_kappa_with_two_grades_in_validation():
    assert _decided(_fp("ordinal", 3000, [5, 5, 0, 0], classes=4))["train.monitor"] == "qwk"
    assert _decided(_fp("ordinal", 3000, [5, 0, 0, 0], classes=4))["train.monitor"] == "loss"


def test_planner_keeps_a_prepared_caches_preprocessing():
    fp = _fp("single_label", 3000, [5, 5], side=900, aspect=1.5, prepared={"size": 128, "resize": "squash"})
    d = _decided(fp)
    assert d["data.image_size"] == 128 and d["data.resize"] == "squash"


def _bundle(labels: dict[str, np.ndarray], classes: list[str], side: int = 20) -> DataBundle:
    splits = {s: SplitData(labels=y, images=np.zeros((len(y), side, side + 4), np.uint8)) for s, y in labels.items()}
    return DataBundle(classes=classes, splits=splits, source="synthetic")


@pytest.mark.parametrize("kind", ["single_label", "multilabel", "ordinal"])
def test_fingerprint_and_plan_of_a_synthetic_bundle_of_each_task_kind(kind):
    rng = np.random.default_rng(0)
    if kind == "multilabel":
        train = (rng.random((300, 3)) < [0.5, 0.1, 0.02]).astype(np.float32)
        val = np.zeros((40, 3), np.float32)
        val[:5, 1] = 1
        labels, classes = {"train": train, "val": val, "test": val}, ["a", "b", "c"]
    else:
        train = np.r_[np.zeros(200, int), np.ones(50, int), np.full(50, 2)]
        labels, classes = {"train": train, "val": np.array([0, 0, 1, 2]), "test": np.array([0, 1, 2, 2])}, ["0", "1", "2"]
    bundle = _bundle(labels, classes)
    task = build_task(kind, classes, labels["train"])
    fp = fingerprint(bundle, task.kind)
    assert fp.n_train == 300 and fp.task == kind and fp.image_side == 20 and fp.aspect == pytest.approx(1.2)
    assert fp.counts["train"] == ([int(c) for c in (train == 1).sum(0)] if kind == "multilabel" else [200, 50, 50])
    if kind != "multilabel":
        assert fp.imbalance == pytest.approx(4.0)
    d = _decided(fp)
    assert d["data.resize"] == "pad" and d["data.image_size"] == 64 and d["model.name"] == "resnet18"
    assert d["train.monitor"] == {"single_label": "auc", "multilabel": "auc", "ordinal": "qwk"}[kind]
    assert d["train.batch_size"] == 16  # at least 16 steps per epoch on 300 images


# ------------------------------------------------------------------- what predict and the server answer

def test_answers_of_each_task_kind_known_values():
    single = SingleLabelTask(["a", "b", "c"], rules={"abstain_below": 0.6})
    rec = single.readout.answer(np.array([0.2, 0.5, 0.3]))
    assert rec["label"] == "b" and rec["probability"] == pytest.approx(0.5)
    assert rec["confidence"] == pytest.approx(0.5) and rec["refer_to_clinician"] is True
    assert single.readout.answer(np.array([0.1, 0.7, 0.2]))["refer_to_clinician"] is False

    multi = MultiLabelTask(["x", "y", "z"], rules={"thresholds": [0.3, 0.8, 0.5], "abstain_below": 0.7})
    rec = multi.readout.answer(np.array([0.4, 0.75, 0.9]))
    assert rec["findings"] == ["x", "z"] and rec["explained"] == "z"
    # margins: x (.4-.3)/.7 = 1/7, y (.8-.75)/.8 = 1/16, z (.9-.5)/.5 = .8 -> least sure y, confidence .5 + 1/32
    assert rec["confidence"] == pytest.approx(0.5 + 0.5 / 16) and rec["refer_to_clinician"] is True
    assert rec["least_certain_finding"] == "y"
    # above its threshold a margin is the share of the way to 1: x (.35-.3)/.7 = 1/14, y (.95-.8)/.2 = .75,
    # z (.5-.2)/.5 = .6 below it -> least sure x
    rec = multi.readout.answer(np.array([0.35, 0.95, 0.2]))
    assert rec["least_certain_finding"] == "x" and rec["confidence"] == pytest.approx(0.5 + 0.5 / 14)

    graded = OrdinalTask(["0", "1", "2", "3"], rules={"refer_threshold": 0.4}, options={"refer_grade": 2})
    rec = graded.readout.answer(np.array([0.1, 0.45, 0.3, 0.15]))
    assert rec["grade"] == 1 and rec["label"] == "1"
    assert rec["refer_score"] == pytest.approx(0.45) and rec["refer"] is True  # P(grade >= 2) = .3 + .15
    assert rec["expected_grade"] == pytest.approx(0.45 + 0.6 + 0.45)


def test_split_fractions_and_patients_of_a_source_without_its_own_split():
    from medsight.config import DataConfig
    from medsight.data.sources import complete_splits

    y = np.repeat([0, 1], 100)
    groups = [f"p{i // 2}" for i in range(200)]
    data = SplitData(labels=y, images=np.zeros((200, 4, 4), np.uint8))
    out = complete_splits({"all": data}, DataConfig(val_fraction=0.1, test_fraction=0.15), [])
    assert {k: len(v) for k, v in out.items()} == {"train": 150, "val": 20, "test": 30}
    assert [int((v.labels == 1).sum()) for v in out.values()] == [75, 10, 15]  # stratified
    grouped = complete_splits({"all": SplitData(labels=y, groups=groups, images=data.images)},
                              DataConfig(val_fraction=0.1, test_fraction=0.15), [])
    seen = [set(s.groups) for s in grouped.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert sum(len(s) for s in grouped.values()) == 200 and 20 <= len(grouped["test"]) <= 40
