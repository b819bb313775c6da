"""Ordinal grading (data.task=ordinal): kappa and referable metrics by hand, the heads' losses and decoding,
cut-points and the referral threshold fitted on validation only, the fundus preset, bad input, and one tiny
end-to-end run per head through train -> predict -> ONNX -> ensemble -> explain."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from medsight.config import Config, ConfigError, DataConfig, apply_overrides
from medsight.data import DataError, load_data
from medsight.data.transforms import (AspectResize, FovNotFoundWarning, FundusView, display_view, find_field_of_view,
                                      make_transform)
from medsight.explainers.cam import border_score, overlay
from medsight.losses import CornLoss, DistanceSmoothedCE
from medsight.losses.ordinal import corn_probabilities, distance_targets
from medsight.metrics import (fast_auc, fit_cutpoints, ordinal_metrics, quadratic_kappa, choose_threshold,
                              weighted_kappa)
from medsight.tasks import OrdinalTask, TaskConfigError, build_task, task_from_state

from conftest import tiny_overrides

# ------------------------------------------------------------------------------------------ metrics

# true 0,0,1,1,2,2 called 0,1,1,1,2,0: O = [[1,1,0],[0,2,0],[1,0,1]], E = outer([2,2,2],[2,3,1])/6;
# quadratic weights: Σw·O = 1 + 4 = 5, Σw·E = 7 -> 1 - 5/7; linear: Σw·O = 1 + 2 = 3, Σw·E = 5 -> 1 - 3/5
KNOWN = (np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0]))


def test_quadratic_weighted_kappa_of_a_known_confusion():
    y, p = KNOWN
    assert quadratic_kappa(y, p, 3) == pytest.approx(2 / 7)
    assert quadratic_kappa(y, p, 3, "linear") == pytest.approx(0.4)
    assert weighted_kappa(y, p, 3, 2) == pytest.approx(2 / 7)  # the bootstrap's own formula agrees
    assert weighted_kappa(y, p, 3, 1) == pytest.approx(0.4)
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert weighted_kappa(y, p, 5) == pytest.approx(cohen_kappa_score(y, p, weights="quadratic"))
    assert quadratic_kappa(np.zeros(4, int), np.zeros(4, int), 3) is None  # one grade everywhere: undefined


def test_ordinal_metrics_by_hand():
    y, p = KNOWN
    probs = np.eye(3)[p] * 0.7 + 0.1
    m = ordinal_metrics(y, probs, p, ["0", "1", "2"], refer_scores=probs[:, 2], refer_grade=2, refer_at=0.5,
                        n_boot=200, seed=0)
    assert m["qwk"] == pytest.approx(2 / 7) and m["linear_kappa"] == pytest.approx(0.4)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["within_one"] == pytest.approx(5 / 6)
    assert m["mae"] == pytest.approx(3 / 6)  # errors 0,1,0,0,0,2
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # refer = grade 2: called 2 (score 0.8) once of the two grade-2 eyes; no other eye scores above 0.5
    assert m["refer"]["sensitivity"] == 0.5 and m["refer"]["specificity"] == 1.0
    assert m["refer"]["sensitivity_at_grade"] == 0.5
    lo, hi = m["ci95"]["qwk"]
    assert -1 <= lo <= 2 / 7 <= hi <= 1 and m["refer"]["ci95"]["sensitivity"] is not None


def test_rank_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300).astype(bool)
    s = np.round(rng.random(300) + 0.3 * y, 1)  # rounded: many ties
    assert fast_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert fast_auc(np.ones(3, bool), s[:3]) is None


def test_refer_threshold_reaches_the_target_sensitivity_on_validation():
    pos = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1]  # ten referable eyes (grade >= 2)
    neg = [0.05, 0.2, 0.35, 0.1]
    labels = np.array([2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 0, 1, 0, 1])
    scores = np.array(pos + neg)
    # 90% of ten: the ninth-highest referable score
    assert choose_threshold(labels >= 2, scores, 0.9) == 0.3
    assert choose_threshold(labels >= 2, scores, 0.5) == 0.7  # five of ten
    assert choose_threshold(np.zeros(3, int) >= 2, np.ones(3), 0.9) is None
    # through the task: P(grade >= 2) is the score; chosen on val, kept for test
    probs = np.zeros((14, 5))
    probs[:, 2], probs[:, 0] = scores, 1 - scores
    task = OrdinalTask([str(g) for g in range(5)])
    task.fit_decision(labels, probs)
    assert task.rules.refer_threshold == pytest.approx(0.3)
    m = task.metrics(labels, probs, n_boot=0)["refer"]
    assert m["sensitivity"] == pytest.approx(0.9) and m["specificity"] == pytest.approx(0.75)  # 0.35 is referred
    test_probs = np.zeros((2, 5))
    test_probs[:, 2], test_probs[:, 0] = [0.31, 0.29], [0.69, 0.71]
    assert [r["refer"] for r in map(task.readout.record, test_probs)] == [True, False]


# ------------------------------------------------------------------------------------------ heads

def test_distance_smoothing_puts_mass_on_neighbouring_grades():
    t = distance_targets(torch.tensor([0, 2]), 3, 0.2)
    e1, e2 = math.exp(-1), math.exp(-2)
    torch.testing.assert_close(t[0], torch.tensor([0.8, 0.2 * e1 / (e1 + e2), 0.2 * e2 / (e1 + e2)]))
    torch.testing.assert_close(t[1], torch.tensor([0.2 * e2 / (e1 + e2), 0.2 * e1 / (e1 + e2), 0.8]))
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    expected = -(t[:1] * torch.log_softmax(logits, 1)).sum()
    torch.testing.assert_close(DistanceSmoothedCE(0.2)(logits, torch.tensor([0])), expected)


def test_corn_probabilities_and_median_decoding():
    # conditionals P(y>0) = 0.9, P(y>1 | y>0) = 0.7, P(y>2 | y>1) = 0.6 -> P(y>j) = 0.9, 0.63, 0.378
    z = torch.tensor([[5.0, math.log(9), math.log(7 / 3), math.log(1.5)]])  # output 0 (grade-0 logit) unused
    p = corn_probabilities(z)
    torch.testing.assert_close(p, torch.tensor([[0.1, 0.27, 0.252, 0.378]]))
    torch.testing.assert_close(corn_probabilities(z.clone().index_fill_(1, torch.tensor([0]), -3.0)), p)
    task = OrdinalTask(["0", "1", "2", "3"], options={"head": "corn", "refer_grade": 2})
    assert task.decide(p.numpy()).tolist() == [2]  # the median grade; the most probable would be 3
    assert task.head.correct(z, torch.tensor([2]), task.rules).item() == 1


def test_corn_loss_by_hand():
    # zero logits, grades 0 and 2 of three: task 0 sees both (targets 0, 1), task 1 only the grade 2 (target 1):
    # three BCEs of ln 2 over three pairs, plus the grade-0 output's mean BCE ln 2
    loss = CornLoss()(torch.zeros(2, 3), torch.tensor([0, 2]))
    assert float(loss) == pytest.approx(2 * math.log(2))


def test_cutpoints_are_fitted_on_validation_and_used_on_test():
    def probs_of(scores):  # per-grade probabilities whose expected grade is the score
        p = np.zeros((len(scores), 3))
        for i, s in enumerate(scores):
            lo = min(int(s), 1)
            p[i, lo], p[i, lo + 1] = 1 - (s - lo), s - lo
        return p

    val_y = np.array([0, 0, 1, 1, 2, 2])
    val_s = np.array([0.2, 0.3, 0.6, 0.7, 0.9, 1.0])  # a compressed scale: rounding at 0.5 / 1.5 misgrades
    cuts = fit_cutpoints(val_y, val_s, 3)
    assert 0.3 < cuts[0] < 0.6 and 0.7 < cuts[1] < 0.9
    task = OrdinalTask(["0", "1", "2"], options={"head": "regression", "refer_grade": 1})
    assert task.decide(probs_of(val_s)).tolist() == [0, 0, 1, 1, 1, 1]  # before fitting: cuts 0.5, 1.5
    task.fit_decision(val_y, probs_of(val_s))
    assert task.rules.cutpoints == pytest.approx(cuts)
    assert task.metrics(val_y, probs_of(val_s), n_boot=0)["qwk"] == pytest.approx(1.0)
    # test images whose own best cuts lie elsewhere are still cut at the validation cuts
    assert task.decide(probs_of(np.array([0.5, 0.85, 1.4]))).tolist() == [1 if 0.5 > cuts[0] else 0, 2, 2]
    restored = task_from_state(json.loads(json.dumps(task.state())))
    assert restored.rules == task.rules and restored.options["head"] == "regression"


# ---------------------------------------------------------------------------------------- fundus

def disc_image(h: int = 240, w: int = 400, cy: float = 120, cx: float = 250, r: float = 100) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r ** 2
    img = torch.zeros(3, h, w)
    for c, v in enumerate((0.8, 0.4, 0.2)):
        img[c][disc] = v
    return img


def test_fundus_preset_crops_to_the_field_of_view_and_masks_the_outside():
    cy, cx, r = find_field_of_view(disc_image())
    assert (cy, cx, r) == (pytest.approx(120, abs=1), pytest.approx(250, abs=1), pytest.approx(100, abs=1))
    # a camera that cuts the top and bottom of the circle off: the width still gives the diameter
    assert find_field_of_view(disc_image(h=240, cy=120, r=150))[2] == pytest.approx(150, abs=1)
    out = FundusView(64)(disc_image())
    assert out.shape == (3, 64, 64)
    assert float(out[0, 32, 32]) == pytest.approx(0.8) and float(out[0, 32, 1]) == pytest.approx(0.8, abs=0.05)
    assert float(out[:, :3, :3].abs().max()) == 0 and float(out[:, -3:, -3:].abs().max()) == 0  # outside: black
    graham = FundusView(64, graham=True)(disc_image())
    assert float(graham[0, 32, 32]) == pytest.approx(0.5, abs=0.02)  # flat colour minus its local average
    assert float(graham[0, 0, 0]) == pytest.approx(0.5)  # Graham's grey outside 90% of the radius


def test_an_image_without_a_disc_falls_back_to_the_whole_image_with_a_warning():
    img = torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.3
    with pytest.warns(FovNotFoundWarning, match="no circular field of view"):
        out = FundusView(32, fallback="pad")(img)
    torch.testing.assert_close(out, AspectResize(32, "pad")(img))


def test_aspect_preserving_resize_pads_or_crops():
    img = torch.zeros(3, 20, 40)
    img[:, :, 20:] = 1.0  # right half white
    pad = AspectResize(20, "pad")(img)  # scaled to 10 x 20, letterboxed top and bottom
    assert float(pad[:, :5].max()) == 0 and float(pad[:, 15:].max()) == 0 and float(pad[0, 10, 15]) == pytest.approx(1)
    crop = AspectResize(20, "crop")(img)  # the centre 20 x 20: half black, half white
    assert float(crop[0, 10, 2]) == 0 and float(crop[0, 10, 17]) == pytest.approx(1)
    squash = make_transform(16, [0, 0, 0], [1, 1, 1], train=False, cfg=DataConfig())(img)
    assert squash.shape == (3, 16, 16)  # the default is unchanged: stretched
    assert display_view(img, 16, "squash").shape == (3, 20, 40)  # displayed in its own aspect


def test_overlay_is_drawn_at_display_resolution_and_fov_border_score():
    disp = np.zeros((200, 200, 3), dtype=np.float32)
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[:3, :3] = 1.0  # heat in the corner: in the outer band, outside the inscribed circle
    assert overlay(disp, heat).shape == (200, 200, 3)
    h = torch.from_numpy(heat)[None]
    assert float(border_score(h)) == pytest.approx(1.0)
    assert math.isnan(float(border_score(h, fov=True)))  # nothing inside the field of view
    uniform = torch.ones(1, 64, 64)
    assert float(border_score(uniform, fov=True)) == pytest.approx(0.36, abs=0.03)


# --------------------------------------------------------------------------------------- bad input

def test_ordinal_task_refuses_unordered_names_and_missing_grades():
    with pytest.raises(TaskConfigError, match="data.grade_order"):
        build_task("ordinal", ["mild", "moderate", "none"])
    with pytest.raises(TaskConfigError, match=r"grade\(s\) 3 appear nowhere"):
        build_task("ordinal", ["0", "1", "2", "4"])
    with pytest.raises(TaskConfigError, match="refer_grade=5"):
        OrdinalTask(["0", "1", "2", "3", "4"], options={"refer_grade": 5})
    with pytest.raises(ConfigError, match="needs graded labels"):
        apply_overrides(Config(), ["train.monitor=qwk"])
    with pytest.raises(ConfigError, match="data.graham"):
        apply_overrides(Config(), ["data.graham=true"])


def test_grade_order_relabels_class_folders(tmp_path):
    for name in ("mild", "moderate", "none"):
        (tmp_path / "d" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "d" / name / f"{name}{i}.png")
    cfg = apply_overrides(Config(), [f"data.path={tmp_path / 'd'}", "data.task=ordinal",
                                     "data.grade_order=[none, mild, moderate]", "data.refer_grade=1"])
    bundle = load_data(cfg.data)
    assert bundle.classes == ["none", "mild", "moderate"]
    everything = [(p, y) for s in bundle.splits.values() for p, y in zip(s.paths, s.labels)]
    assert {Path(p).parent.name: int(y) for p, y in everything} == {"none": 0, "mild": 1, "moderate": 2}
    task = build_task("ordinal", bundle.classes, cfg=cfg)
    assert task.options["ordered_by"] == "data.grade_order"
    with pytest.raises(ValueError, match="the data has no class severe"):
        load_data(apply_overrides(cfg, ["data.grade_order=[none, mild, severe]"]).data)


def test_bad_grade_labels_are_refused_clearly(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (10, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "frac.npz", train_images=imgs, train_labels=np.array([0, 1, 2, 1.5, 0, 1, 2, 0, 1, 2]))
    with pytest.raises(DataError, match="non-integer"):
        load_data(DataConfig(path=str(tmp_path / "frac.npz"), task="ordinal"))
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    np.savez(tmp_path / "gap.npz", train_images=imgs, train_labels=labels, test_images=imgs[:2],
             test_labels=np.array([3, 0]))  # grade 3 only in test
    with pytest.raises(DataError, match="3 have no training images"):
        load_data(DataConfig(path=str(tmp_path / "gap.npz"), task="ordinal"))
    np.savez(tmp_path / "seven.npz", train_images=imgs, train_labels=np.array([0, 1, 2, 7, 0, 1, 2, 0, 1, 2]),
             val_images=imgs[:3], val_labels=labels[:3], test_images=imgs[:3], test_labels=labels[:3])
    with pytest.raises(DataError, match="data.num_classes is 5 but .* has 8 classes"):  # grade 7 of 0..4
        load_data(DataConfig(path=str(tmp_path / "seven.npz"), task="ordinal", num_classes=5))


# --------------------------------------------------------------------------------------- end to end

def fundus_like(grade: int, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """A bright disc on black (RGB) with more and brighter lesions the higher the grade."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size * 0.45) ** 2
    img = np.zeros((size, size, 3), np.uint8)
    img[disc] = (150, 70, 40)
    img[disc] += rng.integers(0, 20, (int(disc.sum()), 1)).astype(np.uint8)
    for _ in range(2 * grade):
        r, c = rng.integers(size // 3, 2 * size // 3, 2)
        img[r:r + 2, c:c + 2] = (230, 230, 120)
    return img


@pytest.fixture(scope="module")
def graded_runs(tmp_path_factory):
    """Two tiny ordinal runs (regression and CORN heads) on a 5-grade fundus-like npz, fundus preset on."""
    from medsight.engine import train

    root = tmp_path_factory.mktemp("ordinal")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 50), ("val", 20), ("test", 20)):
        y = np.arange(n) % 5
        arrays[f"{split}_images"] = np.stack([fundus_like(int(g), rng) for g in y])
        arrays[f"{split}_labels"] = y[:, None].astype(np.uint8)
    np.savez(root / "grades.npz", **arrays)
    runs = {}
    for head in ("regression", "corn"):
        extra = ["data.task=ordinal", f"train.ordinal={head}", "train.monitor=qwk", "data.preset=fundus",
                 "data.resize=pad", "train.sharpness_batches=0", "checklist.min_qwk=0.99",
                 "checklist.min_refer_sensitivity=0.5"]
        if head == "corn":
            extra += ["explain.faithfulness_images=0"]
        cfg = apply_overrides(Config(), tiny_overrides(root / head, root / "grades.npz") + extra)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FovNotFoundWarning)  # every synthetic eye has its disc found
            runs[head] = train(cfg, progress=False)
    return root, runs


def test_tiny_ordinal_runs_report_kappa_and_referral(graded_runs):
    root, runs = graded_runs
    for head, result in runs.items():
        m = result.metrics
        assert m["task"] == "ordinal" and m["monitor"] == "qwk" and m["test"]["head"] == head
        t = m["test"]
        for key in ("qwk", "linear_kappa", "within_one", "mae", "accuracy", "auc", "auc_per_grade", "confusion_matrix"):
            assert key in t
        assert t["ci95"]["qwk"] is not None and set(t["refer"]["ci95"]) == {"sensitivity", "specificity", "auc"}
        checks = {c["check"]: c for c in m["checklist"]["checks"]}
        assert checks["quadratic weighted kappa >="]["threshold"] == 0.99
        assert "referable (grade >= 2) sensitivity >=" in checks
        assert {"confusion_matrix.png", "roc.png", "refer_roc.png"} <= set(m["figures"])
        html = (root / head / "report.html").read_text()
        assert "quadratic weighted kappa" in html and "Referable: grade ≥ 2" in html
    # the regression head's cut-points and the referral threshold were fitted on validation predictions only
    ckpt = torch.load(root / "regression" / "best.pt", weights_only=True)
    pred = np.load(root / "regression" / "predictions.npz")
    expected = pred["val_probs"] @ np.arange(5)
    assert ckpt["task"]["rules"]["cutpoints"] == pytest.approx(fit_cutpoints(pred["val_labels"], expected, 5))
    assert ckpt["task"]["rules"]["refer_threshold"] == pytest.approx(
        choose_threshold(pred["val_labels"] >= 2, expected / 4, 0.9))


def test_tiny_ordinal_run_predicts_exports_ensembles_and_explains(graded_runs, tmp_path):
    from medsight.api import explain_files, predict
    from medsight.evaluation.ensemble import ensemble
    from medsight.inference import Predictor, export_onnx

    root, _ = graded_runs
    eye = tmp_path / "eye.png"  # a large photograph: the display keeps its resolution
    Image.fromarray((disc_image(h=180, w=300, cy=90, cx=150, r=80).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(eye)
    ckpt = root / "regression" / "best.pt"
    rec = predict(ckpt, [eye])[0]
    assert rec["label"] in [str(g) for g in range(5)] and set(rec) >= {"grade", "refer", "refer_score", "expected_grade"}
    assert sum(rec["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    onnx = export_onnx(ckpt, tmp_path / "grader.onnx")
    assert onnx["max_abs_diff"] < 1e-4
    rec_onnx = predict(tmp_path / "grader.onnx", [eye])[0]
    assert rec_onnx["label"] == rec["label"] and rec_onnx["refer"] == rec["refer"]
    assert rec_onnx["expected_grade"] == pytest.approx(rec["expected_grade"], abs=1e-4)  # same fundus preprocessing

    m = ensemble([root / "regression", root / "corn"], "soft", tmp_path / "ens")
    assert m["task"] == "ordinal" and m["test"]["qwk"] is not None and "refer" in m["test"]
    spec = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert spec["task"]["options"]["head"] == "regression"  # decided by the first member's rule, refitted on val
    assert predict(tmp_path / "ens" / "ensemble.json", [eye])[0]["grade"] in range(5)

    p = Predictor(ckpt, device="cpu")
    img = torch.from_numpy(np.array(Image.open(eye))).permute(2, 0, 1).float() / 255
    disp, heat = p.display(img), p.heatmap(img)
    assert abs(disp.shape[0] - 160) <= 2 and disp.shape[0] == disp.shape[1] and heat.shape == (32, 32)  # the disc's
    # square at its own resolution (diameter 160 px), not the model's 32 px
    assert overlay(disp, heat).shape == disp.shape
    out = explain_files(ckpt, [eye], tmp_path / "cams")[0]
    assert out["explained_class"] == rec["label"] and Path(out["overlay"]).is_file()
