"""Many backbones in one command, compare, ensembles (soft, weighted, stacking, ovo), diversity, checklist."""

import json

import numpy as np
import pytest

from medsight.cli import main
from medsight.evaluation.compare import diversity
from medsight.evaluation.ensemble import _fit_combiner, ensemble
from medsight.evaluation.runs import EnsembleError, RunData, load_run
from medsight.inference import EnsemblePredictor, combine
from medsight.tasks import SingleLabelTask

from conftest import tiny_overrides, write_class_folders


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    data = write_class_folders(root / "images", n_per_class=24)
    sets = [s for s in tiny_overrides(root / "unused", data) if not s.startswith(("out=", "data.path="))]
    args = ["train", "--models", "coatnet_tiny", "resnet18", "--data", str(data), "--out", str(root / "runs"),
            "--no-progress", "--set", "train.sharpness_batches=1", "--set", "checklist.min_accuracy=0.0",
            "--set", "checklist.max_ece=0.0"]
    for s in sets:
        if not s.startswith("data.path"):
            args += ["--set", s]
    assert main(args) == 0
    return root / "runs"


def test_models_flag_trains_sibling_runs_and_compares_them(two_runs):
    for name in ("coatnet_tiny", "resnet18"):
        assert (two_runs / name / "best.pt").is_file() and (two_runs / name / "predictions.npz").is_file()
    result = json.loads((two_runs / "compare" / "compare.json").read_text())
    assert [r["model"] for r in result["runs"]] == ["coatnet_tiny", "resnet18"]
    for r in result["runs"]:
        m = json.loads((two_runs / r["run"] / "metrics.json").read_text())["test"]
        assert r["auc"] == m["auc"] and r["accuracy"] == m["accuracy"]
        assert r["images_per_s"] > 0
    html = (two_runs / "compare" / "compare.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "Q-statistic" in html


def test_checklist_pass_fail_in_metrics_and_report(two_runs):
    m = json.loads((two_runs / "coatnet_tiny" / "metrics.json").read_text())
    checks = {c["check"]: c for c in m["checklist"]["checks"]}
    assert checks["accuracy >="]["pass"] is True  # any accuracy >= 0
    assert checks["ECE <="]["pass"] is (m["test"]["ece"] <= 0.0)
    assert m["checklist"]["pass"] is all(c["pass"] for c in checks.values())
    assert "Validation checklist" in (two_runs / "coatnet_tiny" / "report.html").read_text()


def test_soft_and_weighted_ensembles_combine_member_probabilities(two_runs, tmp_path):
    runs = [load_run(two_runs / n) for n in ("coatnet_tiny", "resnet18")]
    m = ensemble([r.path for r in runs], "soft", tmp_path / "soft")
    with np.load(tmp_path / "soft" / "predictions.npz") as z:
        np.testing.assert_allclose(z["test_probs"], (runs[0].test_probs + runs[1].test_probs) / 2, atol=1e-12)
    assert m["test"]["n"] == len(runs[0].test_labels)
    for f in ("metrics.json", "report.html", "roc.png", "confusion_matrix.png", "ensemble.json"):
        assert (tmp_path / "soft" / f).is_file()
        assert (tmp_path / "soft" / f).stat().st_mode & 0o777 == 0o600  # like a run's files: owner-only
    ensemble([r.path for r in runs], "weighted", tmp_path / "weighted")
    spec = json.loads((tmp_path / "weighted" / "ensemble.json").read_text())
    from medsight.metrics import auc_score

    aucs = np.array([auc_score(r.val_labels, r.val_probs) for r in runs])
    np.testing.assert_allclose(spec["combiner"]["weights"], aucs / aucs.sum())


@pytest.mark.parametrize("meta", ["logistic", "mlp"])
def test_stacking_is_fit_on_validation_only(two_runs, tmp_path, meta):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    runs = [load_run(two_runs / n) for n in ("coatnet_tiny", "resnet18")]
    ensemble([r.path for r in runs], "stacking", tmp_path / meta, meta=meta)
    xv = np.concatenate([r.val_probs for r in runs], 1)
    xt = np.concatenate([r.test_probs for r in runs], 1)
    clf = (LogisticRegression(max_iter=2000) if meta == "logistic"
           else MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=0)).fit(xv, runs[0].val_labels)
    with np.load(tmp_path / meta / "predictions.npz") as z:
        np.testing.assert_allclose(z["test_probs"], clf.predict_proba(xt), atol=1e-8)


def fake_run(name, probs_val, probs_test, y_val, y_test, classes):
    per_class = {c: {"recall": float(np.mean(probs_test.argmax(1)[y_test == i] == i))} for i, c in enumerate(classes)}
    return RunData(path=None, name=name, model="m", classes=classes, val_probs=probs_val, val_labels=y_val,
                   test_probs=probs_test, test_labels=y_test, metrics={"test": {"per_class": per_class}},
                   task=SingleLabelTask(classes))


def noisy_probs(y, k, noise, rng):
    logits = np.eye(k)[y] * 3 + rng.normal(0, noise, (len(y), k))
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def test_ovo_combiner_on_three_classes():
    rng = np.random.default_rng(0)
    yv, yt = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    classes = ["a", "b", "c"]
    runs = [fake_run(f"r{i}", noisy_probs(yv, 3, 2.0, rng), noisy_probs(yt, 3, 2.0, rng), yv, yt, classes)
            for i in range(3)]
    comb = _fit_combiner("ovo", runs, "logistic", 0)
    assert len(comb["pairs"]) == 3
    p = combine("ovo", comb, [r.test_probs for r in runs], 3)
    np.testing.assert_allclose(p.sum(1), 1)
    member_acc = max(float((r.test_probs.argmax(1) == yt).mean()) for r in runs)
    assert float((p.argmax(1) == yt).mean()) > member_acc  # three noisy views beat the best single one
    with pytest.raises(EnsembleError, match="at least three classes"):
        _fit_combiner("ovo", [fake_run("x", r.val_probs[:, :2], r.test_probs[:, :2], yv % 2, yt % 2, ["a", "b"])
                              for r in runs], "logistic", 0)


def test_diversity_measures_by_hand():
    y = np.array([0, 0, 1, 1])
    a = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])  # right, right, right, wrong
    b = np.array([[0.4, 0.6], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]])  # wrong, right, right, right
    runs = [fake_run("a", a, a, y, y, ["n", "p"]), fake_run("b", b, b, y, y, ["n", "p"])]
    pair = diversity(runs)["pairs"][0]
    assert pair["disagreement"] == 0.5
    # N11 = 2, N00 = 0, N10 = 1, N01 = 1 -> Q = (2*0 - 1*1) / (2*0 + 1*1) = -1
    assert pair["q_statistic"] == -1.0
    same = diversity([runs[0], fake_run("c", a, a, y, y, ["n", "p"])])["pairs"][0]
    assert same["disagreement"] == 0.0


def test_ensemble_file_predicts_and_explains(two_runs, tmp_path, capsys):
    ensemble([two_runs / "coatnet_tiny", two_runs / "resnet18"], "soft", tmp_path / "ens")
    spec = tmp_path / "ens" / "ensemble.json"
    img = sorted((two_runs.parent / "images" / "pneumonia").glob("*.png"))[0]
    assert main(["predict", str(spec), str(img), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from medsight.inference import Predictor
    from medsight.data.imageio import read_image

    members = [Predictor(two_runs / n / "best.pt", "cpu").probabilities(read_image(img))
               for n in ("coatnet_tiny", "resnet18")]
    assert rec["probabilities"]["pneumonia"] == pytest.approx(float((members[0][1] + members[1][1]) / 2), abs=1e-6)
    heat = EnsemblePredictor(spec, "cpu").heatmap(read_image(img))
    assert heat.shape == (32, 32) and heat.min() >= 0 and heat.max() <= 1
    assert main(["explain", str(spec), str(img), "--out", str(tmp_path / "ex")]) == 0
    assert (tmp_path / "ex" / f"{img.stem}_gradcam.png").is_file()


def test_bad_ensembles_are_refused(two_runs, tmp_path, capsys):
    assert main(["ensemble", str(two_runs / "coatnet_tiny"), "--out", str(tmp_path / "e")]) == 2
    assert "at least two runs" in capsys.readouterr().err
    assert main(["ensemble", str(two_runs / "coatnet_tiny"), str(tmp_path / "nowhere"), "--out", str(tmp_path / "e")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    # a run evaluated on another test set
    other = tmp_path / "other"
    other.mkdir()
    for f in ("metrics.json", "best.pt"):
        (other / f).write_bytes((two_runs / "resnet18" / f).read_bytes())
    with np.load(two_runs / "resnet18" / "predictions.npz") as z:
        d = {k: z[k] for k in z.files}
    d["test_labels"] = d["test_labels"][:-1]
    d["test_probs"] = d["test_probs"][:-1]
    np.savez(other / "predictions.npz", **d)
    with pytest.raises(EnsembleError, match="different test sets"):
        ensemble([two_runs / "coatnet_tiny", other], "soft", tmp_path / "e2")
    with np.load(two_runs / "resnet18" / "predictions.npz") as z:
        d = {k: z[k] for k in z.files}
    d["classes"] = np.array(["healthy", "sick"])
    np.savez(other / "predictions.npz", **d)
    with pytest.raises(EnsembleError, match="has classes"):
        ensemble([two_runs / "coatnet_tiny", other], "soft", tmp_path / "e3")
    # stacking without two classes in validation
    rng = np.random.default_rng(0)
    y1 = np.zeros(10, dtype=int)
    runs = [fake_run("a", noisy_probs(y1, 2, 1, rng), noisy_probs(y1, 2, 1, rng), y1, y1, ["n", "p"])] * 2
    with pytest.raises(EnsembleError, match="at least two classes"):
        _fit_combiner("stacking", runs, "logistic", 0)
