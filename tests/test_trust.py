"""Trust for clinical use: calibration, operating points, selective prediction, conformal sets, subgroups,
robustness, the model card and external validation."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from medsight.config import Config, ConfigError, apply_overrides
from medsight.evaluation.robustness import CORRUPTIONS, corrupt
from medsight.evaluation.subgroups import detect_columns, group_labels, subgroup_metrics
from medsight.evaluation.trust import fit_calibration
from medsight.metrics.calibration import fit_temperature, reliability_bins
from medsight.metrics.classification import expected_calibration_error
from medsight.metrics.conformal import conformal_quantile, fit_conformal, prediction_sets, set_metrics
from medsight.metrics.operating_points import choose_threshold, operating_point
from medsight.metrics.selective import abstention_threshold, risk_coverage


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _sampled(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """True logits and labels drawn from their softmax: a perfectly calibrated model's outputs."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, k))
    p = _softmax(z)
    y = np.array([rng.choice(k, p=row) for row in p])
    return z, y


# ------------------------------------------------------------------------------------------- calibration

def test_temperature_scaling_recovers_an_overconfident_models_temperature():
    z, y = _sampled(4000, 3, seed=0)
    t = fit_temperature(z * 3.0, y)  # logits three times too large: T should come back near 3
    assert 2.6 < t < 3.4
    before = expected_calibration_error(y, _softmax(z * 3.0))
    after = expected_calibration_error(y, _softmax(z * 3.0 / t))
    assert after < before / 2


def test_reliability_bins_agree_with_the_reported_ece():
    z, y = _sampled(500, 2, seed=1)
    p = _softmax(z * 2)
    bins = reliability_bins(p.max(1), p.argmax(1) == y)
    assert bins["ece"] == pytest.approx(expected_calibration_error(y, p), abs=1e-12)
    assert sum(bins["count"]) == 500


# ------------------------------------------------------------------------------------ operating points

def test_threshold_for_a_target_sensitivity_is_the_most_specific_that_reaches_it():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1])
    t = choose_threshold(y, s, target_sensitivity=0.75)
    assert t == 0.6  # 3 of 4 positives at >= 0.6; any higher threshold misses one more
    op = operating_point(y, s, t, n_boot=0)
    assert (op["sensitivity"], op["specificity"], op["ppv"], op["npv"]) == (0.75, 0.75, 0.75, 0.75)
    t_spec = choose_threshold(y, s, target_specificity=1.0)
    assert operating_point(y, s, t_spec, n_boot=0)["specificity"] == 1.0
    assert operating_point(y, s, t_spec, n_boot=0)["sensitivity"] == 0.5  # 0.9 and 0.8 above the 0.7 negative


def test_operating_point_intervals_contain_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = y * 0.5 + rng.random(300) * 0.7
    op = operating_point(y, s, 0.5, n_boot=300, seed=1)
    for k in ("sensitivity", "specificity", "ppv", "npv"):
        lo, hi = op["ci95"][k]
        assert lo <= op[k] <= hi and hi - lo < 0.3


@pytest.mark.parametrize("key, value, words", [
    ("eval.target_sensitivity", "1.5", "eval.target_sensitivity must be <= 1"),
    ("eval.target_sensitivity", "0", "eval.target_sensitivity must be > 0"),
    ("eval.target_specificity", "-0.1", "eval.target_specificity must be > 0"),
    ("eval.conformal_coverage", "1", "eval.conformal_coverage must be < 1"),
    ("eval.conformal_coverage", "0", "eval.conformal_coverage must be > 0"),
])
def test_out_of_range_targets_are_refused_by_name(key, value, words):
    with pytest.raises(ConfigError, match=words):
        apply_overrides(Config(), [f"{key}={value}"])


def test_a_sensitivity_of_one_is_a_valid_target_and_two_targets_are_refused():
    assert apply_overrides(Config(), ["eval.target_sensitivity=1"]).eval.target_sensitivity == 1.0
    with pytest.raises(ConfigError, match="both set"):
        apply_overrides(Config(), ["eval.target_sensitivity=0.9", "eval.target_specificity=0.9"])


# ---------------------------------------------------------------------------------- selective prediction

def test_aurc_rewards_a_score_that_ranks_errors_last():
    errors = np.array([0, 0, 0, 1, 1])
    good = risk_coverage(errors, np.array([0.9, 0.8, 0.7, 0.2, 0.1]))
    bad = risk_coverage(errors, np.array([0.1, 0.2, 0.3, 0.8, 0.9]))
    # good order: risks 0, 0, 0, 1/4, 2/5 -> mean 0.13; reversed: 1, 1, 2/3, 2/4, 2/5
    assert good["aurc"] == pytest.approx((0.25 + 0.4) / 5)
    assert bad["aurc"] == pytest.approx((1 + 1 + 2 / 3 + 0.5 + 0.4) / 5)
    assert good["risk"] == bad["risk"] == 0.4
    flat = risk_coverage(errors, np.ones(5))  # ties: no credit for a score that cannot rank
    assert flat["aurc"] >= bad["aurc"] - 1e-12


def test_abstention_threshold_refers_the_stated_share():
    conf = np.linspace(0.5, 1.0, 1001)
    t = abstention_threshold(conf, 0.1)
    assert (conf < t).mean() == pytest.approx(0.1, abs=0.002)
    assert abstention_threshold(conf, 0.0) is None


# ---------------------------------------------------------------------------------------------- conformal

def test_conformal_quantile_is_the_finite_sample_rank():
    scores = np.arange(1, 10) / 10  # n = 9, alpha 0.2: rank ceil(10 * 0.8) = 8
    assert conformal_quantile(scores, 0.2) == 0.8
    assert conformal_quantile(scores[:3], 0.05) == float("inf")  # too few for 95%


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_conformal_sets_reach_their_coverage_on_exchangeable_data(method):
    z, y = _sampled(6000, 4, seed=3)
    p = _softmax(z)
    cal = fit_conformal(y[:3000], p[:3000], 0.9, method)
    m = set_metrics(y[3000:], prediction_sets(p[3000:], cal))
    assert abs(m["coverage"] - 0.9) < 0.03
    assert 1 <= m["mean_set_size"] < 4  # informative: not every class every time


def test_class_conditional_conformal_covers_every_class():
    rng = np.random.default_rng(4)
    z, y = _sampled(6000, 3, seed=4)
    z[:, 2] += 2.0  # the model over-calls class 2: marginal sets under-cover classes 0 and 1
    p = _softmax(z)
    idx = rng.permutation(6000)
    cal_i, test_i = idx[:3000], idx[3000:]
    per_class = set_metrics(y[test_i], prediction_sets(p[test_i], fit_conformal(y[cal_i], p[cal_i], 0.9,
                                                                              class_conditional=True)))
    assert min(per_class["coverage_per_class"].values()) > 0.86


# ------------------------------------------------------------------------------------------- multi-label

def _multilabel_outputs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three findings' true logits and labels drawn from their sigmoids; finding 1 masked (-1) on a tenth."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, 3))
    y = (rng.random((n, 3)) < 1 / (1 + np.exp(-z))).astype(np.int64)
    y[rng.random(n) < 0.1, 1] = -1
    return z, y


def test_multilabel_temperature_is_fitted_per_finding_and_masked_labels_stay_out():
    from medsight.tasks import MultiLabelTask

    z, y = _multilabel_outputs(4000, seed=5)
    task = MultiLabelTask(["a", "b", "c"])
    fit_calibration(task, z * np.array([3.0, 1.0, 0.5]), y)  # over-, well- and under-confident findings
    t = task.rules.temperature
    assert 2.6 < t[0] < 3.4 and 0.85 < t[1] < 1.15 and 0.4 < t[2] < 0.6
    y_all_neg = y.copy()
    y_all_neg[:, 2] = 0
    fit_calibration(task, z, y_all_neg)
    assert task.rules.temperature[2] == 1.0 and task.rules.temperature_not_fitted == ["c"]
    views = task.readout.binary_views(y, 1 / (1 + np.exp(-z)))
    assert [v[0] for v in views] == ["a", "b", "c"] and len(views[1][1]) == (y[:, 1] >= 0).sum() < len(y)
    assert (task.readout.view_labelled(y).sum(0) == [len(v[1]) for v in views]).all()


def test_multilabel_calibration_undoes_the_positive_weights_shift():
    from medsight.config import Config, apply_overrides
    from medsight.metrics.calibration import binary_ece
    from medsight.tasks import MultiLabelTask
    from medsight.tasks.rules import Temperature

    rng = np.random.default_rng(3)
    n = 6000
    z = rng.normal(-3, 1.5, (n, 2))  # rare findings (about 8% positive)
    y = (rng.random((n, 2)) < 1 / (1 + np.exp(-z))).astype(np.int64)
    cfg = apply_overrides(Config(), ["train.class_weights=true", "train.loss=ce"])
    task = MultiLabelTask(["a", "b"])
    task.rules.logit_offset = task.head.logit_offset(cfg, y[: n // 2])
    w = (y[: n // 2] == 0).sum(0) / (y[: n // 2] == 1).sum(0)
    np.testing.assert_allclose(task.rules.logit_offset, np.log(w), rtol=1e-5)
    shifted = z + np.log(w)[None, :]  # what weighted BCE's minimizer outputs: logit(p) + log w
    fit_calibration(task, shifted[: n // 2], y[: n // 2])
    assert all(0.85 < t < 1.15 for t in task.rules.temperature)  # the offset, not the temperature, does the work
    p_cal = task.probabilities(torch.as_tensor(shifted[n // 2:])).numpy()
    p_raw = 1 / (1 + np.exp(-shifted[n // 2:]))
    for k in range(2):
        assert binary_ece(y[n // 2:, k], p_raw[:, k]) > 0.2  # inflated by the weights
        assert binary_ece(y[n // 2:, k], p_cal[:, k]) < 0.03
    mod = task.rules.calibration_module()  # the ONNX graph's step: the same subtraction and division
    assert isinstance(mod, Temperature)
    np.testing.assert_allclose(torch.sigmoid(mod(torch.as_tensor(shifted[:5], dtype=torch.float32))).numpy(),
                               task.probabilities(torch.as_tensor(shifted[:5])).numpy(), atol=1e-5)
    assert task.head.logit_offset(apply_overrides(Config(), ["train.class_weights=false"]), y) is None  # unweighted training: nothing to undo


def test_multilabel_confidence_errors_and_referral_by_hand():
    from medsight.tasks import MultiLabelTask

    task = MultiLabelTask(["a", "b"], {"thresholds": [0.2, 0.5], "abstain_below": 0.7})
    p = np.array([[0.6, 0.9], [0.1, 0.55], [0.25, 0.05]])
    # margins from the thresholds: a (0.6-0.2)/0.8=0.5, b 0.8; a 0.5, b 0.1; a 0.0625, b 0.9
    np.testing.assert_allclose(task.readout.confidence(p), [0.75, 0.55, 0.53125])
    y = np.array([[1, 1], [0, 1], [-1, 1]])  # image 2: a right, b right; image 3: a masked, b decided absent
    assert task.readout.errors(y, p).tolist() == [0, 0, 1]
    assert task.readout.errors(np.array([[0, 0]]), p[:1]).tolist() == [1]  # both findings wrong
    assert task.readout.errors(np.array([[1, 0]]), p[:1]).tolist() == [0.5]  # one of two: the Hamming loss
    rec = task.readout.answer(p[1])
    assert rec["refer_to_clinician"] and rec["least_certain_finding"] == "b" and rec["findings"] == ["b"]
    assert not task.readout.answer(p[0])["refer_to_clinician"]


def test_multilabel_trust_fits_on_validation_and_covers_each_finding():
    from medsight.evaluation.trust import fit_on_validation, measure
    from medsight.tasks import MultiLabelTask

    z, y = _multilabel_outputs(6000, seed=6)
    task = MultiLabelTask(["a", "b", "c"])
    ev = Config().eval.model_copy(update={"bootstrap": 0})
    fit_on_validation(task, ev, z[:3000] * 2, y[:3000])
    assert len(task.rules.temperature) == 3 and task.rules.thresholds is not None  # the decision rule keeps the temperature
    sex = ["FM"[i % 2] for i in range(3000)]
    res = measure(task, ev, z[3000:] * 2, y[3000:], meta={"sex": sex})
    c = res["conformal"]
    for name, m in c["per_finding"].items():
        assert abs(m["coverage"] - 0.9) < 0.03, name
        assert m["n"] == (y[3000:, "abc".index(name)] >= 0).sum()
    assert c["all_findings_covered"] < min(m["coverage"] for m in c["per_finding"].values())
    assert res["calibration"]["ece_after"] < res["calibration"]["ece_before"]
    assert set(res["operating_points"]["views"]) == {"a", "b", "c"}
    b = res["subgroups"]["columns"]["sex"]["b"]["groups"]  # masked labels left out, groups still aligned
    assert b["F"]["n"] + b["M"]["n"] == (y[3000:, 1] >= 0).sum()
    assert b["F"]["n_positive"] == ((y[3000:, 1] == 1) & (np.array(sex) == "F")).sum()


# ---------------------------------------------------------------------------------------------- subgroups

def test_subgroup_gap_is_flagged_when_one_group_is_under_diagnosed():
    rng = np.random.default_rng(5)
    n = 400
    y = rng.integers(0, 2, n)
    groups = ["F"] * (n // 2) + ["M"] * (n // 2)
    s = np.where(y == 1, 0.8, 0.2) + rng.normal(0, 0.1, n)
    s[n // 2:][y[n // 2:] == 1] -= 0.5  # half the men's positives fall below the threshold
    r = subgroup_metrics(y, s, 0.5, groups, n_boot=300)
    gap = r["gaps"]["sensitivity"]
    assert (gap["best"], gap["worst"]) == ("F", "M") and gap["gap"] > 0.5 and gap["flagged"]
    same = subgroup_metrics(y[: n // 2], s[: n // 2], 0.5, [("a", "b")[i % 2] for i in range(n // 2)], n_boot=300)
    assert not same["gaps"]["sensitivity"]["flagged"]


def test_one_value_and_tiny_groups_are_reported_not_crashed():
    y = np.array([0, 1] * 20)
    s = np.linspace(0, 1, 40)
    one = subgroup_metrics(y, s, 0.5, ["site A"] * 40, n_boot=50)
    assert "one value only" in one["note"] and one["gaps"]["auc"] is None
    tiny = subgroup_metrics(y, s, 0.5, ["big"] * 35 + ["small"] * 5, min_size=20, n_boot=50)
    assert not tiny["groups"]["small"]["eligible"] and "fewer than 20" in tiny["groups"]["small"]["note"]
    assert "ci95" in tiny["groups"]["big"] and tiny["gaps"]["auc"] is None


def test_subgroup_columns_are_detected_and_ages_binned():
    assert detect_columns(["path", "label", "Sex", "Patient Age", "Site", "notes"]) == ["Sex", "Patient Age", "Site"]
    assert group_labels("Patient Age", ["17", "18", "45", "79", "85", "", "n/a"]) == \
        ["0-17", "18-39", "40-59", "60-79", "80+", "missing", "missing"]
    assert group_labels("sex", ["F", " M", ""]) == ["F", "M", "missing"]


# --------------------------------------------------------------------------------------------- robustness

@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_worsens_with_severity_and_stays_an_image(name):
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.random((3, 48, 48)).astype(np.float32)) * 0.6 + 0.2
    img[:, 10:30, 10:30] = 0.9  # an edge for blur and resolution loss to soften
    dist = []
    for sev in (1, 2, 3):
        out = corrupt(img, name, sev, torch.Generator().manual_seed(0))
        assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
        dist.append(float((out - img).abs().mean()))
    assert 0 < dist[0] < dist[1] < dist[2]


def test_unknown_corruption_and_severity_are_refused():
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(torch.zeros(3, 8, 8), "fog", 1)
    with pytest.raises(ValueError, match="severity must be 1..3"):
        corrupt(torch.zeros(3, 8, 8), "blur", 4)


# ------------------------------------------------------------------------------------------ a trained run

def test_every_run_fits_and_stores_the_trust_rules(tiny_run):
    from medsight.checkpoint import load_checkpoint

    decision = load_checkpoint(tiny_run / "best.pt")["task"]["rules"]
    assert decision["temperature"] > 0
    assert decision["conformal"]["coverage"] == 0.9 and decision["conformal"]["method"] == "lac"
    assert decision["operating_points"]["target"].startswith("Youden")
    assert "abstain_below" in decision
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    trust = metrics["trust"]
    assert set(trust["selective"]["aurc"]) == {"max probability", "TTA mean probability", "TTA agreement (−std)"}
    assert trust["tta"]["views"] == 5 and "caveat" in trust["conformal"]
    card = (tiny_run / "model_card.md").read_text()
    for words in ("Not for clinical use", "Data provenance and splits", "Calibration", "Operating points",
                  "Conformal", "Robustness", "Code version", "TRIPOD+AI", "cannot answer"):
        assert words in card
    report = (tiny_run / "report.html").read_text()
    assert "<h2>Model card</h2>" in report and "reliability.png" in metrics["figures"]


def test_predict_applies_the_temperature_and_refers_unsure_images(tiny_run, tmp_path):
    from PIL import Image

    from medsight.api import predict
    from medsight.inference import Predictor
    from conftest import blob_image

    pred = Predictor(tiny_run / "best.pt", "cpu")
    img = torch.from_numpy(blob_image(1, np.random.default_rng(0))).float()[None] / 255
    with torch.no_grad():
        raw = torch.softmax(pred.model(pred.preprocess(img)), 1)[0].numpy()
        scaled = torch.softmax(pred.model(pred.preprocess(img)) / pred.task.rules.temperature, 1)[0].numpy()
    np.testing.assert_allclose(pred.probabilities(img), scaled, atol=1e-6)
    assert not np.allclose(raw, scaled, atol=1e-4)  # the temperature is not 1: calibration is really applied
    Image.fromarray(blob_image(0, np.random.default_rng(1))).save(tmp_path / "x.png")
    rec = predict(tiny_run / "best.pt", [tmp_path / "x.png"], device="cpu")[0]
    assert rec["refer_to_clinician"] == (rec["confidence"] < pred.task.rules.abstain_below)


def test_onnx_graph_divides_the_logits_by_the_temperature(tiny_run, tmp_path):
    from medsight.inference import OnnxPredictor, Predictor, export_onnx

    export_onnx(tiny_run / "best.pt", tmp_path / "m.onnx")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pt = Predictor(tiny_run / "best.pt", "cpu")
    with torch.no_grad():
        logits = pt.model(x)
    got = OnnxPredictor(tmp_path / "m.onnx").run(x.numpy())
    np.testing.assert_allclose(got, torch.softmax(logits / pt.task.rules.temperature, 1).numpy(), atol=1e-4)


def _manifest_with_sex(root, n_per_class=16):
    from conftest import write_class_folders

    write_class_folders(root / "images", n_per_class=n_per_class, seed=7)
    rows = [["path", "label", "sex", "site"]]
    for i, f in enumerate(sorted((root / "images").rglob("*.png"))):
        rows.append([str(f.relative_to(root)), f.parent.name, "FM"[i % 2], "one site"])
    with (root / "manifest.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root / "manifest.csv"


def test_manifest_metadata_reaches_the_splits(tmp_path):
    from medsight.config import DataConfig
    from medsight.data import load_data

    bundle = load_data(DataConfig(path=str(_manifest_with_sex(tmp_path))))
    for split in bundle.splits.values():
        assert set(split.meta) == {"sex", "site"} and len(split.meta["sex"]) == len(split)
        assert set(split.meta["sex"]) <= {"F", "M"}


def test_external_validation_writes_metrics_card_and_subgroups(tiny_run, tmp_path, capsys):
    from medsight.cli import main

    manifest = _manifest_with_sex(tmp_path / "other")
    assert main(["evaluate", str(tiny_run / "best.pt"), "--data", str(manifest), "--out", str(tmp_path / "ext")]) == 0
    assert "calibration here: ECE" in capsys.readouterr().out
    m = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    sub = m["trust"]["subgroups"]["columns"]
    assert set(sub) == {"sex", "site"}
    assert "one value only" in sub["site"]["pneumonia"]["note"]
    assert set(sub["sex"]["pneumonia"]["groups"]) == {"F", "M"}
    assert m["trust"]["calibration"]["temperature"] == pytest.approx(
        json.loads((tiny_run / "metrics.json").read_text())["trust"]["calibration"]["temperature"])
    card = (tmp_path / "ext" / "model_card.md").read_text()
    assert "external validation" in card and "**sex**" in card
    assert "Model card" in (tmp_path / "ext" / "report.html").read_text()


def test_robustness_command_and_missing_data_message(tiny_run, tmp_path, capsys):
    from medsight.cli import main

    assert main(["robustness", str(tiny_run / "best.pt"), "--corruptions", "blur", "jpeg", "--out",
                 str(tmp_path / "rob")]) == 0
    r = json.loads((tmp_path / "rob" / "robustness.json").read_text())
    assert set(r["corruptions"]) == {"blur", "jpeg"} and [x["severity"] for x in r["corruptions"]["blur"]] == [1, 2, 3]
    assert (tmp_path / "rob" / "robustness.png").is_file()
    ckpt = torch.load(tiny_run / "best.pt", weights_only=True)
    ckpt["config"]["data"]["path"] = str(tmp_path / "gone")
    torch.save(ckpt, tmp_path / "moved.pt")
    capsys.readouterr()
    assert main(["robustness", str(tmp_path / "moved.pt")]) == 2
    err = capsys.readouterr().err
    assert "cannot be found" in err and "--data" in err


def test_onnx_export_of_a_tta_run_averages_the_same_views_as_pytorch(tiny_run, tmp_path):
    """A run that decided on test-time augmentation answers with the mean over its views through ONNX too."""
    from medsight.inference import OnnxPredictor, Predictor, export_onnx

    ckpt = torch.load(tiny_run / "best.pt", map_location="cpu", weights_only=True)
    ckpt["task"]["rules"]["tta"] = True
    torch.save(ckpt, tmp_path / "tta.pt")
    export_onnx(tmp_path / "tta.pt", tmp_path / "m.onnx")
    imgs = [torch.rand(3, 40, 36, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    pt, ox = Predictor(tmp_path / "tta.pt", "cpu"), OnnxPredictor(tmp_path / "m.onnx")
    want = pt.probabilities_batch([pt.prepare(im) for im in imgs])
    got = ox.probabilities_batch([ox.prepare(im) for im in imgs])
    np.testing.assert_allclose(got, want, atol=1e-4)
    plain = ox.run(np.stack([ox.prepare(im) for im in imgs]))
    assert np.abs(plain - want).max() > 1e-4  # the views matter: without them the answer differs
