"""End to end on a few dozen real image files: train -> run folder -> evaluate / explain / predict."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from medsight.checkpoint import CheckpointError, load_checkpoint, load_model
from medsight.cli import main
from medsight.config import ConfigError, apply_overrides, Config
from medsight.engine import HISTORY_FIELDS, TrainingError, train

from conftest import tiny_overrides, write_class_folders

RUN_FILES = ["config.yaml", "best.pt", "last.pt", "history.csv", "metrics.json", "curves.png",
             "confusion_matrix.png", "roc.png", "gradcam_gallery.png", "report.html"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    data = write_class_folders(root / "images", n_per_class=24)
    out = root / "run"
    cfg = apply_overrides(Config(), tiny_overrides(out, data, epochs=2) + ["data.image_size=64"])
    result = train(cfg, progress=False)
    return result, data, out


def test_run_folder_contract(trained_run):
    result, _, out = trained_run
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert list(rows[0]) == HISTORY_FIELDS and len(rows) == 2
    m = json.loads((out / "metrics.json").read_text())
    test = m["test"]
    for key in ("accuracy", "balanced_accuracy", "auc", "ece", "per_class", "confusion_matrix", "ci95"):
        assert key in test
    assert set(test["per_class"]) == {"normal", "pneumonia"}
    assert set(test["per_class"]["normal"]) == {"precision", "recall", "specificity", "f1", "support"}
    assert sum(map(sum, test["confusion_matrix"])) == test["n"] == sum(
        c["support"] for c in test["per_class"].values())
    lo, hi = test["ci95"]["accuracy"]
    assert lo <= test["accuracy"] <= hi
    e = m["explain"]
    if e["n"]:  # maps with any heat have a border score; all-empty maps have none
        assert 0.0 <= e["border_score_mean"] <= 1.0
    else:
        assert e["border_score_mean"] is None and not e["border_warning"]
    html = (out / "report.html").read_text()
    # curves, confusion, ROC, gallery, faithfulness, reliability, risk-coverage
    assert html.count("data:image/png;base64,") == 7
    faith = m["faithfulness"]["methods"]
    assert set(faith) == {"gradcam", "gradcam++", "hirescam", "layercam", "eigencam", "random"}
    assert all(0 <= v["deletion_auc"] <= 1 and 0 <= v["insertion_auc"] <= 1 for v in faith.values())
    assert "not for clinical use" in html
    sh = m["sharpness"]
    assert sh["rho"] == 0.05 and sh["ascent"] >= 0 and sh["images"] > 0 and "Sharpness" in html


def test_cli_sharpness_measures_and_stores(trained_run, tmp_path, capsys):
    _, _, out = trained_run
    before = json.loads((out / "metrics.json").read_text())["sharpness"]
    assert main(["sharpness", str(out / "best.pt"), "--rho", "0.1", "--batches", "4"]) == 0  # same images
    assert "ascent" in capsys.readouterr().out
    after = json.loads((out / "metrics.json").read_text())["sharpness"]
    assert after["rho"] == 0.1 and after["ascent"] > before["ascent"]  # a bigger ball holds a higher point
    assert main(["sharpness", str(out / "best.pt"), "--rho", "0"]) == 2


def test_checkpoint_reloads_and_reproduces_metrics(trained_run):
    result, data, out = trained_run
    model, ckpt = load_model(out / "best.pt")
    assert ckpt["classes"] == ["normal", "pneumonia"] and ckpt["image_size"] == 64
    from medsight.api import evaluate
    from medsight.config import config_from_dict
    from medsight.data import ImageDataset, load_data, make_loader
    from medsight.inference import eval_transform, predict_loader
    from medsight.tasks import task_from_checkpoint

    # a fresh evaluation of best.pt on the run's own test split gives exactly what the run stored
    bundle = load_data(config_from_dict(ckpt["config"]).data)
    task = task_from_checkpoint(ckpt)
    loader = make_loader(ImageDataset(bundle.splits["test"], eval_transform(ckpt)), 16, False, 0)
    probs, labels, _, _ = predict_loader(model, loader, torch.device("cpu"), task)
    with np.load(out / "predictions.npz") as z:
        np.testing.assert_allclose(probs, z["test_probs"], atol=1e-5)
        np.testing.assert_array_equal(labels, z["test_labels"])
    fresh = task.metrics(labels, probs, n_boot=0)
    stored = json.loads((out / "metrics.json").read_text())["test"]
    assert (fresh["accuracy"], fresh["auc"]) == pytest.approx((stored["accuracy"], stored["auc"]), abs=1e-9)
    # evaluate() on the unsplit folder scores every image, with the same model
    again = evaluate(out / "best.pt", str(data))
    assert again["test"]["n"] == 48
    assert again["test"]["confusion_matrix"] != [[0, 0], [0, 0]]


def test_cli_evaluate_explain_predict(trained_run, tmp_path, capsys):
    _, data, out = trained_run
    assert main(["evaluate", str(out / "best.pt"), "--data", str(data), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["test"]["n"] == 48
    images = sorted((data / "pneumonia").glob("*.png"))[:2]
    assert main(["explain", str(out / "best.pt"), *map(str, images), "--out", str(tmp_path / "ex"),
                 "--method", "gradcam++"]) == 0
    lines = (tmp_path / "ex" / "explanations.jsonl").read_text().strip().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    assert rec["label"] in ("normal", "pneumonia") and (tmp_path / "ex" / f"{images[0].stem}_gradcampp.png").is_file()
    assert rec["target_layer"] and len(rec["cell_offset_px"]) == 2  # which layer the map came from, and its registration
    assert main(["predict", str(out / "best.pt"), str(images[0]), "--json"]) == 0
    pred = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(sum(pred["probabilities"].values()) - 1) < 1e-5


def test_explain_class_out_of_range_via_cli(trained_run, tmp_path, capsys):
    _, data, out = trained_run
    image = next((data / "normal").glob("*.png"))
    assert main(["explain", str(out / "best.pt"), str(image), "--out", str(tmp_path), "--class", "7"]) == 2
    assert "class index 7 is out of range" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(trained_run):
    _, data, out = trained_run
    before = (out / "last.pt").read_bytes()
    with pytest.raises(TrainingError, match="already holds a run"):
        train(apply_overrides(Config(), tiny_overrides(out, data)), progress=False)
    assert (out / "last.pt").read_bytes() == before


def test_checkpoint_with_wrong_class_count_is_refused(trained_run, small_npz, tmp_path):
    _, _, out = trained_run
    ckpt = load_checkpoint(out / "best.pt")
    ckpt["classes"] = ["a", "b", "c"]
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="classes .* disagree with its task's"):
        load_model(tmp_path / "edited.pt")
    ckpt["task"]["classes"] = ["a", "b", "c"]
    torch.save(ckpt, tmp_path / "three.pt")
    with pytest.raises(CheckpointError, match="coatnet_tiny.*3 outputs"):
        load_model(tmp_path / "three.pt")


def test_checkpoint_is_data_not_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"format": "medsight-checkpoint-1", "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="holds code/objects, refused: its pickle imports .*print") as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert "weights_only=False" not in str(err.value)  # never advise the unsafe way round
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_interrupted_run_resumes_to_the_same_result(tmp_path, small_npz, monkeypatch):
    """Ctrl-C in the middle of epoch 2 leaves last.pt and history.csv at epoch 1, nothing half-written;
    --resume then finishes with the same weights as a run never interrupted (seeded, CPU)."""
    import medsight.engine.loop as T

    straight = train(apply_overrides(Config(), tiny_overrides(tmp_path / "a", small_npz, epochs=3)), progress=False)
    out = tmp_path / "b"
    real_step, calls = T.train_step, {"n": 0}

    def step_then_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the middle of epoch 2 (3 steps per epoch)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(T, "train_step", step_then_ctrl_c)
    result = train(apply_overrides(Config(), tiny_overrides(out, small_npz, epochs=3)), progress=False)
    assert result.interrupted
    assert len(list(csv.DictReader((out / "history.csv").open()))) == 1
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not list(out.glob(".*.tmp"))  # no half-written files left behind
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(T, "train_step", real_step)
    resumed = train(apply_overrides(Config(), tiny_overrides(out, small_npz, epochs=3)), resume=True, progress=False)
    assert not resumed.interrupted
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert (out / "metrics.json").is_file()
    sa = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    sb = load_checkpoint(out / "last.pt")["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)
    assert straight.history[-1]["train_loss"] == pytest.approx(resumed.history[-1]["train_loss"])


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/xray"], "data path not found: /nonexistent/xray"),
    (["--lr", "0"], "optim.lr must be > 0"),
    (["--batch-size", "0"], "train.batch_size must be >= 1"),
    (["--set", "optim.rho=-0.1"], "optim.rho must be > 0"),
    (["--model", "coatnet_00"], "unknown model 'coatnet_00'.*coatnet_0"),
    (["--set", "train.epohcs=3"], "unknown config key 'train.epohcs'.*'epochs'"),
    (["--image-size", "48"], "multiple of 32.*try 32 or 64"),
    (["--set", "model.freeze_stages=9"], "has 4 stages"),
])
def test_bad_train_input_fails_fast_with_named_cause(args, message, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), *args]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "r" / "last.pt").exists()


def test_pretrained_offline_is_a_clear_error(tmp_path, small_npz):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "medsight", "train", "--model", "resnet18", "--pretrained",
                           "--data", str(small_npz), "--out", str(tmp_path / "r")], capture_output=True, text=True,
                          env=env)
    err = done.stderr
    assert done.returncode == 2
    assert "pretrained weights for resnet18" in err and "--weights PATH" in err


def test_local_weights_file_is_loaded(tmp_path):
    from medsight.models import create_model

    src = create_model("resnet18", num_classes=5, img_size=32)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pt")
    dst = create_model("resnet18", num_classes=2, img_size=32, weights=str(tmp_path / "w.pt"))
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight)
    assert dst.fc.weight.shape == (2, 512)  # the head does not fit and stays fresh


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "medsight", "models", "coatnet_*"], capture_output=True, text=True)
    assert done.returncode == 0 and "coatnet_tiny" in done.stdout and "coatnet_0" in done.stdout


def test_diverging_loss_stops_the_run_with_its_cause(tmp_path, small_npz, monkeypatch):
    import medsight.engine.loop as train_module

    real, calls = train_module.train_step, []

    def nan_from_second_step(*args, **kwargs):
        loss, logits = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 2 else loss), logits

    monkeypatch.setattr(train_module, "train_step", nan_from_second_step)
    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", small_npz))
    with pytest.raises(TrainingError, match="nan at epoch 1"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()
