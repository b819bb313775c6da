"""Multi-label findings (data.task=multilabel): readers on real NIH ChestX-ray14 PNGs and manifests, label
policies, patient-level stratification, losses and metrics by hand, bad input, and a tiny run through
train -> evaluate -> predict -> explain -> export -> ensemble -> REST."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from medsight.config import Config, ConfigError, DataConfig, apply_overrides, load_config
from medsight.data import DataError, load_data
from medsight.data.multilabel import NIH_FINDINGS, apply_label_policy, multilabel_split
from medsight.losses import AsymmetricLoss, BinaryFocal, MaskedBCE, positive_weights
from medsight.metrics import finding_thresholds, multilabel_metrics
from medsight.tasks import MultiLabelTask, build_task, infer_kind

from conftest import tiny_overrides

SHARED = Path(__file__).resolve().parents[1] / "data" / "nih_cxr14_1000.npz"
NIH_DIR = Path(__file__).resolve().parent / "data" / "nih_cxr14_sample"


def _nih_rows() -> list[dict[str, str]]:
    with (NIH_DIR / "Data_Entry.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _write_manifest(folder: Path, rows: list[dict[str, str]], fields: list[str] | None = None) -> Path:
    fields = fields or list(rows[0])
    path = folder / "Data_Entry.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def nih_copy(tmp_path: Path) -> Path:
    """The sample's real PNGs in NIH's own nesting (images_001/images/), with its manifest beside them."""
    dest = tmp_path / "nih" / "images_001" / "images"
    dest.mkdir(parents=True)
    for p in (NIH_DIR / "images").iterdir():
        shutil.copy(p, dest / p.name)
    return tmp_path / "nih"


# ----------------------------------------------------------------------------------------------- readers

def test_nih_manifest_reads_real_pngs_by_patient_and_split(nih_copy):
    rows = _nih_rows()
    path = _write_manifest(nih_copy, rows)
    bundle = load_data(DataConfig(path=str(path)))
    assert bundle.classes == NIH_FINDINGS and bundle.multilabel
    for name, split in bundle.splits.items():
        assert len(split) == sum(r["split"] == name for r in rows)
        for i, p in enumerate(split.paths):
            row = next(r for r in rows if r["Image Index"] == Path(p).name)
            expected = {f for f in row["Finding Labels"].split("|") if f != "No Finding"}
            assert {bundle.classes[k] for k in np.flatnonzero(split.labels[i] == 1)} == expected
            assert split.groups[i] == row["Patient ID"]
    # the manifest reader and the npz of the same 1,000 images put the findings in the same order
    assert [str(c) for c in np.load(SHARED)["class_names"]] == bundle.classes


def test_nih_manifest_without_split_is_split_by_patient_keeping_findings(nih_copy):
    rows = [{k: v for k, v in r.items() if k != "split"} for r in _nih_rows()]
    bundle = load_data(DataConfig(path=str(_write_manifest(nih_copy, rows)), val_fraction=0.2, test_fraction=0.2))
    seen: dict[str, str] = {}
    for name, split in bundle.splits.items():
        for g in split.groups:
            assert seen.setdefault(g, name) == name, f"patient {g} in two splits"
    assert sum(len(s) for s in bundle.splits.values()) == len(rows)
    assert any("split" in n and "by patient" in n for n in bundle.notes)


def test_new_finding_is_kept_and_said_and_missing_files_are_named(nih_copy):
    rows = _nih_rows()
    rows[0] = {**rows[0], "Finding Labels": "Effusion|Fracture"}
    rows.append({**rows[1], "Image Index": "99999999_000.png", "Patient ID": "99999999"})
    bundle = load_data(DataConfig(path=str(_write_manifest(nih_copy, rows))))
    assert bundle.classes == NIH_FINDINGS + ["Fracture"]
    assert any("Fracture" in n and "kept as a new finding (1 image" in n for n in bundle.notes)
    assert any("99999999_000.png" in n and "row" in n for n in bundle.notes)
    assert sum(len(s) for s in bundle.splits.values()) == len(rows) - 1
    assert any("no positive" in n and "Fracture" in n for n in bundle.notes)  # test/val: not scoreable


def test_manifest_whose_image_files_are_all_missing_is_refused(tmp_path):
    rows = _nih_rows()[:3]
    (tmp_path / "empty").mkdir()
    path = _write_manifest(tmp_path / "empty", rows)
    with pytest.raises(DataError, match=rows[0]["Image Index"]):
        load_data(DataConfig(path=str(path)))


def _chexpert(tmp_path: Path, cells: list[list[str]], extra: list[str] | None = None) -> Path:
    root = tmp_path / "CheXpert-v1.0-small"
    src = sorted((NIH_DIR / "images").iterdir())
    rows = []
    for i, c in enumerate(cells):
        rel = Path("CheXpert-v1.0-small") / "train" / f"patient{i // 2:05d}" / "study1" / f"view{i % 2}_frontal.png"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src[i], tmp_path / rel)
        rows.append([str(rel), "Female", str(40 + i), "Frontal", "AP", *c, *(extra or [])])
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Edema", "Cardiomegaly", "Effusion"]
    path = root / "train.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_per_finding_csv_detects_columns_and_applies_policies(tmp_path):
    cells = [["1", "0", "-1"], ["", "1", "0"], ["0", "-1", "1"], ["1", "", "0"]] * 5
    path = _chexpert(tmp_path, cells)
    raw = np.array([[np.nan if v == "" else float(v) for v in c] for c in cells], dtype=np.float32)
    for policy, blank, value_u, value_b in (("ignore", "ignore", -1, -1), ("ones", "zeros", 1, 0),
                                            ("zeros", "ignore", 0, -1)):
        b = load_data(DataConfig(path=str(path), uncertain=policy, blank=blank, val_fraction=0.2, test_fraction=0.2))
        assert b.classes == ["Edema", "Cardiomegaly", "Effusion"]  # Sex, Age, Frontal/Lateral, AP/PA left out
        assert any("finding columns found" in n and "Edema, Cardiomegaly, Effusion" in n for n in b.notes)
        for split in b.splits.values():
            for i, p in enumerate(split.paths):
                j = int(Path(p).parent.parent.name[len("patient"):]) * 2 + int(Path(p).name[4])
                want = raw[j].copy()
                want[raw[j] == -1] = value_u
                want[np.isnan(raw[j])] = value_b
                np.testing.assert_array_equal(split.labels[i], want)
        assert all(len({g for g in s.groups}) for s in b.splits.values())
    # a policy per finding overrides the run's
    b = load_data(DataConfig(path=str(path), uncertain="zeros", uncertain_per_finding={"Effusion": "ones"},
                             val_fraction=0.2, test_fraction=0.2))
    allp = np.concatenate([s.labels for s in b.splits.values()])
    assert (allp[:, 2] == 1).sum() == 10 and (allp[:, 1] == 1).sum() == 5  # Effusion U-Ones, Cardiomegaly U-Zeros
    with pytest.raises(DataError, match="Pneumo"):
        load_data(DataConfig(path=str(path), uncertain_per_finding={"Pneumo": "ones"}))


def test_text_in_a_finding_column_names_row_and_column(tmp_path):
    cells = [["1", "0", "-1"]] * 6 + [["1", "maybe", "0"]] + [["0", "1", "1"]] * 3
    path = _chexpert(tmp_path, cells)
    with pytest.raises(DataError, match=r"row 8, column 'Cardiomegaly': 'maybe' is text"):
        load_data(DataConfig(path=str(path)))
    with pytest.raises(DataError, match=r"row 2, column 'Edema': '2' is a number other than"):
        load_data(DataConfig(path=str(_chexpert(tmp_path / "b", [["2", "0", "1"]] * 10))))


def test_npz_with_findings_in_one_split_and_one_label_in_another_is_refused(tmp_path):
    imgs = np.zeros((4, 16, 16), np.uint8)
    np.savez(tmp_path / "x.npz", train_images=imgs, train_labels=np.eye(4, 3, dtype=np.uint8), val_images=imgs,
             val_labels=np.zeros((4, 1), np.uint8))
    with pytest.raises(DataError, match=r"train_labels 4×3, val_labels 4×1"):
        load_data(DataConfig(path=str(tmp_path / "x.npz")))
    np.savez(tmp_path / "y.npz", train_images=imgs, train_labels=np.full((4, 3), 2, np.uint8))
    with pytest.raises(DataError, match=r"train_labels\[0, 0\] is 2"):
        load_data(DataConfig(path=str(tmp_path / "y.npz")))


def test_embedded_npz_is_read_as_fourteen_findings_with_unscoreable_val_findings():
    b = load_data(DataConfig(path=str(SHARED)))
    assert b.classes == NIH_FINDINGS
    assert b.counts()["train"] == [51, 23, 78, 68, 12, 35, 5, 9, 11, 4, 16, 23, 19, 1]  # data/README.md's table
    assert {len(s) for s in b.splits.values()} == {572, 118, 310}
    assert any("Pneumonia, Edema, Hernia have no positive val images" in n for n in b.notes)
    assert infer_kind(b.splits["train"].labels) == "multilabel"


# ------------------------------------------------------------------------------------ policies, splits

def test_label_policy_by_hand():
    raw = np.array([[1, -1, np.nan], [0, -1, 1]], dtype=np.float32)
    out, notes = apply_label_policy(raw, ["a", "b", "c"], uncertain="ones", blank="zeros", per_finding={"b": "ignore"})
    np.testing.assert_array_equal(out, [[1, -1, 0], [0, -1, 1]])
    assert any("b: 2 uncertain label(s) -> ignore" in n for n in notes)


def test_multilabel_split_keeps_patients_whole_and_rare_findings_on_both_sides():
    rng = np.random.default_rng(0)
    patients = [f"p{i // 3}" for i in range(300)]
    labels = (rng.random((300, 5)) < [0.4, 0.2, 0.1, 0.04, 0.0]).astype(np.float32)
    for seed in range(3):
        keep, held = multilabel_split(labels, 0.2, seed, patients)
        assert sorted(np.concatenate([keep, held]).tolist()) == list(range(300))
        assert not {patients[i] for i in keep} & {patients[i] for i in held}
        assert 0.15 <= len(held) / 300 <= 0.25
        for k in range(4):  # every finding present in the set is on both sides
            assert labels[keep, k].sum() > 0 and labels[held, k].sum() > 0
            share = labels[held, k].sum() / labels[:, k].sum()
            assert 0.1 <= share <= 0.34


# -------------------------------------------------------------------------------------------- losses

def test_masked_bce_with_positive_weights_by_hand():
    labels = np.array([[1, 0], [0, 0], [0, -1], [1, 0]], dtype=np.float32)
    w = positive_weights(labels)
    assert w.tolist() == [1.0, 1.0]  # 2 negatives / 2 positives; no positives -> 1
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5], [-0.2, 9.0], [1.0, -3.0]])
    y = torch.from_numpy(labels)
    pw = torch.tensor([3.0, 1.0])
    loss = MaskedBCE(pw)(logits, y)
    p = torch.sigmoid(logits)
    terms = [-(3.0 * torch.log(p[0, 0])), -torch.log(1 - p[0, 1]), -torch.log(1 - p[1, 0]), -torch.log(1 - p[1, 1]),
             -torch.log(1 - p[2, 0]), -(3.0 * torch.log(p[3, 0])), -torch.log(1 - p[3, 1])]
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)
    changed = logits.clone()
    changed[2, 1] = -50.0  # the masked label's logit does not matter
    assert torch.allclose(MaskedBCE(pw)(changed, y), loss)


def test_asymmetric_and_focal_losses_by_hand():
    logits = torch.tensor([[1.5, -0.5]])
    y = torch.tensor([[1.0, 0.0]])
    p = torch.sigmoid(logits)[0]
    asl = AsymmetricLoss(gamma_neg=4, gamma_pos=1, clip=0.05)(logits, y)
    pm = (p[1] - 0.05).clamp_min(0)
    want = (-(1 - p[0]) * torch.log(p[0]) - pm ** 4 * torch.log(1 - pm)) / 2
    assert torch.allclose(asl, want, atol=1e-6)
    focal = BinaryFocal(gamma=2)(logits, y)
    want = (-(1 - p[0]) ** 2 * torch.log(p[0]) - p[1] ** 2 * torch.log(1 - p[1])) / 2
    assert torch.allclose(focal, want, atol=1e-6)
    assert AsymmetricLoss(clip=0.6)(torch.tensor([[-3.0]]), torch.tensor([[0.0]])) == 0  # easy negative discarded


# ------------------------------------------------------------------------------------------- metrics

def test_multilabel_metrics_by_hand():
    y = np.array([[1, 0, 0], [0, 0, -1], [1, 1, 0], [0, 0, 0], [1, -1, 0]], dtype=np.float32)
    p = np.array([[0.9, 0.2, 0.1], [0.3, 0.1, 0.8], [0.6, 0.7, 0.3], [0.4, 0.3, 0.2], [0.2, 0.9, 0.4]])
    m = multilabel_metrics(y, p, ["a", "b", "c"], [0.5, 0.5, 0.5], n_boot=200)
    a_auc = roc_auc_score([1, 0, 1, 0, 1], p[:, 0])
    b_auc = roc_auc_score([0, 0, 1, 0], p[[0, 1, 2, 3], 1])
    assert m["findings"]["a"]["auc"] == pytest.approx(a_auc)
    assert m["findings"]["b"]["auc"] == pytest.approx(b_auc)
    assert m["findings"]["b"]["masked"] == 1 and m["findings"]["b"]["n"] == 4
    assert m["findings"]["a"]["ap"] == pytest.approx(average_precision_score([1, 0, 1, 0, 1], p[:, 0]))
    assert m["unscoreable"] == {"c": "no positive images"} and m["findings"]["c"]["auc"] is None
    assert m["auc"] == pytest.approx((a_auc + b_auc) / 2)  # mean over the scoreable findings only
    assert m["findings"]["a"]["sensitivity"] == pytest.approx(2 / 3)  # 0.9, 0.6 >= 0.5; 0.2 not
    assert m["findings"]["a"]["specificity"] == pytest.approx(1.0)
    # decided at 0.5: only row 4's "a" (0.2, positive) is wrong; row 1's masked "c" (0.8) does not count
    assert m["exact_match"] == pytest.approx(4 / 5)
    assert m["hamming_accuracy"] == pytest.approx(12 / 13)
    assert m["findings"]["a"]["prevalence"] == pytest.approx(0.6)
    mask = y >= 0
    assert m["micro_auc"] == pytest.approx(roc_auc_score(y[mask], p[mask]))
    lo, hi = m["ci95"]["auc"]
    assert lo <= m["auc"] <= hi


def test_thresholds_on_validation_youden_and_target_sensitivity():
    y = np.array([[1], [1], [1], [1], [0], [0], [0], [0]], dtype=np.float32)
    p = np.array([[0.9], [0.8], [0.6], [0.3], [0.7], [0.2], [0.1], [0.05]])
    t, why = finding_thresholds(y, p, "youden")
    assert t == [pytest.approx(0.3)] and why == [None]  # J = 1 - 1/4 at 0.3 (0.8: 1/2, 0.6: 3/4 - 1/4)
    t, _ = finding_thresholds(y, p, "sensitivity", 0.75)
    assert t == [pytest.approx(0.6)]  # the highest threshold catching three of the four positives
    t, why = finding_thresholds(np.zeros((3, 1), np.float32), np.ones((3, 1)) * 0.4)
    assert t == [0.5] and why == ["no positive images"]


def test_config_refuses_multilabel_options_for_other_tasks():
    with pytest.raises(ConfigError, match="multi-label loss"):
        load_config(None, ["data.task=single_label", "train.loss=asl"])
    with pytest.raises(ConfigError, match="monitor=map"):
        load_config(None, ["train.monitor=map"])
    with pytest.raises(ConfigError, match="mixup"):
        load_config(None, ["data.task=multilabel", "train.mixup=0.2"])
    with pytest.raises(Exception, match="one class per image"):
        build_task("multilabel", ["a", "b"], np.array([0, 1, 0]))


# ----------------------------------------------------------------------------------- tiny end to end

@pytest.fixture(scope="module")
def ml_runs(tmp_path_factory):
    """Two tiny runs (different seeds and optimizers) on 32-px crops of the real chest X-rays."""
    from medsight.engine import train

    root = tmp_path_factory.mktemp("ml")
    z = np.load(SHARED)
    arrays = {"class_names": z["class_names"]}
    for split, n in (("train", 64), ("val", 40), ("test", 40)):
        arrays[f"{split}_images"] = z[f"{split}_images"][:n, ::2, ::2]
        arrays[f"{split}_labels"] = z[f"{split}_labels"][:n]
    data = root / "cxr.npz"
    np.savez(data, **arrays)
    runs = []
    for seed, opt in ((0, "sam-adamw"), (1, "adamw")):
        cfg = apply_overrides(Config(), tiny_overrides(root / f"run{seed}", data) + [
            f"train.seed={seed}", f"optim.name={opt}", f"train.sharpness_batches={1 - seed}",
            f"explain.faithfulness_images={4 * (1 - seed)}", "explain.gallery_per_class=2"])
        train(cfg, progress=False)
        runs.append(root / f"run{seed}")
    return root, runs, arrays


def test_tiny_run_reports_every_finding(ml_runs):
    root, (run, _), arrays = ml_runs
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "multilabel"
    test = m["test"]
    y = arrays["test_labels"]
    probs = np.load(run / "predictions.npz")["test_probs"]
    for k, name in enumerate(NIH_FINDINGS):
        f = test["findings"][name]
        assert f["positives"] == int(y[:, k].sum())
        if y[:, k].sum() in (0, len(y)):
            assert name in test["unscoreable"] and f["auc"] is None
        else:
            assert f["auc"] == pytest.approx(roc_auc_score(y[:, k], probs[:, k]))
    assert test["auc"] == pytest.approx(np.mean([f["auc"] for f in test["findings"].values() if f["auc"] is not None]))
    # Hernia has no training positives in these 64 images: trained on negatives, reported, no crash
    assert arrays["train_labels"][:, 13].sum() == 0 and "Hernia" in m["val"]["unscoreable"]
    html = (run / "report.html").read_text()
    for text in ("Per finding (test", "roc_findings.png", "Not scoreable on test"):
        assert text in html
    # the gallery's row titles ("Effusion: test images carrying it") are drawn into gradcam_gallery.png, not the
    # HTML; test_gallery_keeps_every_finding_of_an_image_outside_the_border_sample checks the rows themselves
    assert (run / "roc_findings.png").stat().st_size > 0 and (run / "gradcam_gallery.png").stat().st_size > 0
    per = m["explain"]["border_score_per_class"]
    assert per and set(per) <= set(NIH_FINDINGS)
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert len(best["task"]["rules"]["thresholds"]) == 14 and best["task"]["kind"] == "multilabel"


def test_tiny_run_predicts_explains_exports_and_evaluates(ml_runs, tmp_path, nih_copy):
    from medsight.api import evaluate, explain_files, predict
    from medsight.inference import OnnxPredictor, Predictor, export_onnx

    root, (run, _), _ = ml_runs
    images = sorted((NIH_DIR / "images").iterdir())[:3]
    out = predict(run / "best.pt", images, device="cpu")
    pred = Predictor(run / "best.pt", "cpu")
    for rec in out:
        t = rec["thresholds"]
        assert rec["findings"] == [c for c, v in rec["probabilities"].items() if v >= t[c]]
        assert set(rec["probabilities"]) == set(NIH_FINDINGS)
    ex = explain_files(run / "best.pt", images[:1], tmp_path / "cams", class_idx=2, device="cpu")
    assert ex[0]["explained_class"] == "Effusion" and Path(ex[0]["overlay"]).is_file()
    onnx = tmp_path / "m.onnx"
    export_onnx(run / "best.pt", onnx)
    from medsight.data import read_image
    img = read_image(images[0])
    np.testing.assert_allclose(OnnxPredictor(onnx).probabilities(img), pred.probabilities(img), atol=1e-4)
    assert OnnxPredictor(onnx).predict(img)["findings"] == pred.predict(img)["findings"]
    manifest = _write_manifest(nih_copy, _nih_rows())
    res = evaluate(run / "best.pt", str(manifest), device="cpu")
    assert res["task"] == "multilabel" and res["test"]["n"] == sum(r["split"] == "test" for r in _nih_rows())
    # the ONNX check above compares calibrated probabilities: the per-finding temperatures are really there
    assert len(set(pred.task.rules.temperature)) > 1


def test_tiny_run_fits_one_temperature_per_finding_and_the_trust_rules(ml_runs):
    from medsight.inference import Predictor

    root, (run, _), arrays = ml_runs
    decision = torch.load(run / "best.pt", map_location="cpu", weights_only=True)["task"]["rules"]
    temps, vy = decision["temperature"], arrays["val_labels"]
    one_answer = [n for k, n in enumerate(NIH_FINDINGS) if len(np.unique(vy[:, k])) < 2]
    assert len(temps) == 14 and all(t > 0 for t in temps) and decision["temperature_not_fitted"] == one_answer
    assert all(temps[NIH_FINDINGS.index(n)] == 1.0 for n in one_answer)
    assert set(decision["conformal"]["per_finding"]) == set(NIH_FINDINGS) and "abstain_below" in decision
    assert set(decision["operating_points"]["views"]) <= set(NIH_FINDINGS)
    # probabilities are sigmoid((logit - log w) / T) finding by finding, w the training loss's positive weights
    from medsight.losses import positive_weights

    offset = decision["logit_offset"]
    np.testing.assert_allclose(offset, positive_weights(arrays["train_labels"]).log().numpy(), rtol=1e-5)
    assert max(offset) > 1  # rare findings: a shift a temperature alone could not undo
    pred = Predictor(run / "best.pt", "cpu")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = pred.model(x)
    np.testing.assert_allclose(pred.task.probabilities(logits).numpy(),
                               torch.sigmoid((logits - torch.tensor(offset)) / torch.tensor(temps)).numpy(), atol=1e-6)
    trust = json.loads((run / "metrics.json").read_text())["trust"]
    per_view = trust["calibration"]["per_view"]
    assert list(per_view) == list(NIH_FINDINGS) and [v["temperature"] for v in per_view.values()] == temps
    c = trust["conformal"]
    assert set(c["per_finding"]) == set(NIH_FINDINGS) and 1 <= c["mean_set_size"] <= 2
    assert c["all_findings_covered"] <= min(m["coverage"] for m in c["per_finding"].values() if m["n"])
    assert set(trust["selective"]["aurc"]) == {"max probability", "TTA mean probability", "TTA agreement (−std)"}
    card = (run / "model_card.md").read_text()
    assert trust["calibration"]["logit_offset"] == offset
    for words in ("one temperature per finding", "after subtracting log w", "positive images per finding",
                  "mean AUC over scoreable findings",
                  "Split conformal (lac) per finding", "| Effusion |", "Refer to a clinician"):
        assert words in card
    assert "<h2>Model card</h2>" in (run / "report.html").read_text()


def test_predict_refers_the_least_sure_images_to_a_clinician(ml_runs):
    from medsight.api import predict
    from medsight.tasks import task_from_checkpoint

    _, (run, _), _ = ml_runs
    task = task_from_checkpoint(torch.load(run / "best.pt", map_location="cpu", weights_only=True))
    images = sorted((NIH_DIR / "images").iterdir())[:6]
    for rec in predict(run / "best.pt", images, device="cpu"):
        p = np.array([rec["probabilities"][c] for c in NIH_FINDINGS])
        t = np.array([rec["thresholds"][c] for c in NIH_FINDINGS])
        margin = np.where(p >= t, (p - t) / (1 - t), (t - p) / t)  # by hand: the least sure finding decides
        assert rec["confidence"] == pytest.approx(0.5 + 0.5 * margin.min())
        assert rec["least_certain_finding"] == NIH_FINDINGS[int(np.argmin(margin))]
        assert rec["refer_to_clinician"] == (rec["confidence"] < task.rules.abstain_below)
        assert set(rec["uncertain_findings"]) <= set(NIH_FINDINGS)


def test_external_validation_on_the_nih_manifest_counts_findings_and_subgroups(ml_runs, nih_copy, tmp_path):
    from medsight.api import evaluate

    _, (run, _), _ = ml_runs
    rows = [{**r, "Patient Gender": "FM"[int(r["Patient ID"]) % 2]} for r in _nih_rows()]
    manifest = _write_manifest(nih_copy, rows)
    res = evaluate(run / "best.pt", str(manifest), out=tmp_path / "ext", device="cpu")
    test_rows = [r for r in rows if r["split"] == "test"]
    m = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert m["task"] == "multilabel" and m["trust"]["n"] == len(test_rows)
    sub = m["trust"]["subgroups"]["columns"]["Patient Gender"]
    assert set(sub) == set(NIH_FINDINGS)
    for k, name in enumerate(NIH_FINDINGS):
        groups = sub[name]["groups"]
        assert sum(g["n"] for g in groups.values()) == len(test_rows)
        assert sum(g["n_positive"] for g in groups.values()) == sum(name in r["Finding Labels"] for r in test_rows)
    card = (tmp_path / "ext" / "model_card.md").read_text()
    effusion = sum("Effusion" in r["Finding Labels"].split("|") for r in test_rows)
    assert f"| external | {len(test_rows)} |" in card and f"Effusion {effusion}" in card
    assert "**Patient Gender**, Effusion" in card and res["trust"]["conformal"]["per_finding"]


def test_tiny_runs_ensemble_per_finding(ml_runs, tmp_path):
    from medsight.evaluation.ensemble import ensemble
    from medsight.inference import EnsemblePredictor

    root, runs, arrays = ml_runs
    vp = [np.load(r / "predictions.npz")["val_probs"] for r in runs]
    for method in ("soft", "weighted", "stacking"):
        m = ensemble(runs, method, tmp_path / method)
        spec = json.loads((tmp_path / method / "ensemble.json").read_text())
        assert m["task"] == "multilabel" and len(m["test"]["findings"]) == 14
        if method == "soft":
            combined = np.load(tmp_path / method / "predictions.npz")["val_probs"]
            np.testing.assert_allclose(combined, (vp[0] + vp[1]) / 2, atol=1e-6)
        if method == "stacking":
            c = spec["combiner"]
            assert c["meta"] == "logistic_per_finding" and len(c["coef"]) == 14
            # findings without both labels in validation keep the members' mean, and say so
            no_val = [n for k, n in enumerate(NIH_FINDINGS) if len(np.unique(arrays["val_labels"][:, k])) < 2]
            assert c["mean_only"] == no_val
    ens = EnsemblePredictor(tmp_path / "stacking" / "ensemble.json", "cpu")
    from medsight.data import read_image
    rec = ens.predict(read_image(sorted((NIH_DIR / "images").iterdir())[0]))
    assert set(rec["probabilities"]) == set(NIH_FINDINGS) and "findings" in rec
    with pytest.raises(Exception, match="multi-label"):
        ensemble(runs, "ovo", tmp_path / "ovo")


def test_rest_api_lists_findings_and_explains_the_chosen_one(ml_runs):
    from fastapi.testclient import TestClient

    from medsight.serve.app import create_app

    _, (run, _), _ = ml_runs
    client = TestClient(create_app(run / "best.pt", "cpu", page=False))
    assert client.get("/health").json()["task"] == "multilabel"
    png = sorted((NIH_DIR / "images").iterdir())[0].read_bytes()
    r = client.post("/predict", files={"file": ("x.png", png, "image/png")})
    body = r.json()
    assert r.status_code == 200 and body["findings"] == [c for c, v in body["probabilities"].items()
                                                         if v >= body["thresholds"][c]]
    r = client.post("/explain", files={"file": ("x.png", png, "image/png")}, data={"target": "Cardiomegaly"})
    assert r.status_code == 200 and r.headers["X-Explained"] == "Cardiomegaly"
    assert float(r.headers["X-Probability"]) == pytest.approx(body["probabilities"]["Cardiomegaly"], abs=1e-5)
    r = client.post("/explain", files={"file": ("x.png", png, "image/png")}, data={"target": "Fracture"})
    assert r.status_code == 400 and "Fracture" in r.json()["detail"]


def test_gallery_keeps_every_finding_of_an_image_outside_the_border_sample():
    """An image picked for two findings' rows gets both heatmaps, also when it is not among the 256 images
    the border score samples (the gallery once kept only the last finding of such an image)."""
    from medsight.data import ImageDataset
    from medsight.data.sources import SplitData
    from medsight.data.transforms import make_transform
    from medsight.explainers.gallery import gradcam_gallery
    from medsight.models import create_model
    from medsight.tasks import MultiLabelTask

    n, size = 270, 16  # more images than the border sample, so some lie outside it
    rng = np.random.default_rng(0)
    labels = np.ones((n, 2), dtype=np.int64)  # every image carries both findings: each is in both rows
    split = SplitData(labels=labels, images=(rng.random((n, size, size)) * 255).astype(np.uint8))
    ds = ImageDataset(split, make_transform(size, [0.5] * 3, [0.5] * 3, train=False))
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=2, img_size=size).eval()
    rows, _ = gradcam_gallery(model, ds, rng.random((n, 2)), labels, MultiLabelTask(["a", "b"]),
                              torch.device("cpu"), "gradcam", None, per_class=n)
    assert [len(r["items"]) for r in rows] == [n, n]
