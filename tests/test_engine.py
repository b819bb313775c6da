"""The engine's parts: the task stored in every checkpoint, callbacks and loggers, model selection,
early stopping, the run folder's safety, and the adapter's timm interface."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch

from medsight.checkpoint import load_checkpoint
from medsight.cli import main
from medsight.config import Config, apply_overrides
from medsight.engine import Callback, train
from medsight.engine.loop import TrainingError
from medsight.models import BACKBONES, create_model, freeze_stages, layer_groups
from medsight.tasks import FittedRules, SingleLabelTask, task_from_checkpoint

from conftest import tiny_overrides, write_class_folders


def test_checkpoint_carries_the_task_and_every_command_restores_it(tiny_run):
    ckpt = load_checkpoint(tiny_run / "best.pt")
    assert ckpt["task"]["kind"] == "single_label" and ckpt["task"]["classes"] == ["normal", "pneumonia"]
    task = task_from_checkpoint(ckpt)
    assert isinstance(task, SingleLabelTask)
    # the threshold was fitted on validation predictions, and only on them
    with np.load(tiny_run / "predictions.npz") as z:
        fresh = SingleLabelTask(["normal", "pneumonia"])
        fresh.fit_decision(z["val_labels"], z["val_probs"])
        assert task.rules.threshold == fresh.rules.threshold
        other = SingleLabelTask(["normal", "pneumonia"])
        other.fit_decision(z["test_labels"], z["test_probs"])
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    if "threshold" in metrics["test"]:
        assert metrics["test"]["threshold"] == task.rules.threshold


def test_old_checkpoints_without_a_task_are_single_label():
    task = task_from_checkpoint({"classes": ["a", "b"], "threshold": 0.3})
    assert task.kind == "single_label" and task.rules == FittedRules(threshold=0.3)


def test_best_pt_is_the_epoch_with_the_best_monitored_value(tmp_path, small_npz):
    out = tmp_path / "run"
    cfg = apply_overrides(Config(), tiny_overrides(out, small_npz, epochs=4) + [
        "train.monitor=loss", "train.sharpness_batches=0", "explain.faithfulness_images=0"])
    result = train(cfg, progress=False)
    rows = list(csv.DictReader((out / "history.csv").open()))
    best = min(range(len(rows)), key=lambda i: float(rows[i]["val_loss"])) + 1
    assert result.metrics["best_epoch"] == best
    assert load_checkpoint(out / "best.pt")["epoch"] == best
    assert load_checkpoint(out / "last.pt")["epoch"] == 4


def test_early_stopping_stops_after_patience_epochs(tmp_path, small_npz):
    seen = []

    class Record(Callback):
        def on_epoch_end(self, run, state, row, improved):
            seen.append(improved)

    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", small_npz, epochs=12) + [
        "train.patience=1", "optim.lr=1e-6", "schedule.name=none", "train.monitor=accuracy",
        "train.sharpness_batches=0", "explain.faithfulness_images=0"])
    result = train(cfg, progress=False, callbacks=[Record()])
    # with a learning rate this small the accuracy stalls; the first epoch without improvement ends the run
    assert False in seen and len(result.history) == seen.index(False) + 1 < 12
    assert len(list(csv.DictReader((tmp_path / "run" / "history.csv").open()))) == len(result.history)


def test_config_is_not_changed_by_training(tmp_path, small_npz):
    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", small_npz) + ["train.sharpness_batches=0"])
    before = cfg.model_dump()
    train(cfg, progress=False)
    assert cfg.model_dump() == before


def test_a_non_empty_folder_is_not_overwritten_without_force(tmp_path, small_npz):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.html").write_text("my own report")
    cfg = apply_overrides(Config(), tiny_overrides(out, small_npz) + ["train.sharpness_batches=0"])
    with pytest.raises(TrainingError, match="not empty.*--force"):
        train(cfg, progress=False)
    assert (out / "report.html").read_text() == "my own report"
    train(cfg, progress=False, force=True)
    assert (out / "best.pt").is_file()


def test_file_as_out_is_refused_before_data_loads(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(["train", "--data", str(tmp_path / "no_such_data"), "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_resume_without_out_is_a_clear_error(capsys):
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_loggers_write_into_the_run_folder(tmp_path, small_npz, logger, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    cfg = apply_overrides(Config(), tiny_overrides(out, small_npz, epochs=2) + [
        f"train.loggers=[{logger}]", "train.sharpness_batches=0", "explain.faithfulness_images=0"])
    train(cfg, progress=False)
    # the run folder's one policy holds for what the loggers write too, after the run's end as well
    modes = {p.relative_to(out): p.stat().st_mode & 0o777 for p in (out / logger.replace("mlflow", "mlruns")).rglob("*")}
    assert modes and all(m == (0o700 if (out / p).is_dir() else 0o600) for p, m in modes.items()), modes
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tensorboard"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("val_loss")] == [1, 2]
        assert "test/accuracy" in acc.Tags()["scalars"]
    else:
        import mlflow

        mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        run = mlflow.search_runs(experiment_names=["medsight"], output_format="list")[0]
        history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == [1, 2]
        assert run.data.params["optim.name"] == "sam-adamw" and "test_accuracy" in run.data.metrics


def test_cnn_transformer_has_timms_interface_for_freezing_and_fine_tuning():
    model = create_model("cnn_transformer_resnet18", num_classes=3, img_size=64)
    groups = layer_groups(model)
    assert len(groups) == 6  # stem, four ResNet stages, then projection + Transformer + head
    assert all(n.startswith("features.") for g in groups[:-1] for n in g)
    assert "head.weight" in groups[-1] and "pos_embed" in groups[-1]
    frozen = freeze_stages(model, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert frozen > 0 and not any(n.startswith(("features.conv1", "features.layer1", "features.layer2"))
                                  for n in trainable)
    assert any(n.startswith("features.layer3") for n in trainable)
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_head(model.forward_features(x)).shape == (2, 3)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


def test_models_lists_the_recommended_backbones_with_their_purpose(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("swinv2_tiny_window8_256", "resnet50", "seresnext50_32x4d", "coatnet_0", "cnn_transformer_resnet18"):
        assert name in out
    line = next(ln for ln in out.splitlines() if ln.startswith("densenet121"))
    assert "CheXNet" in line
    assert len(out.splitlines()) == len(BACKBONES)


def test_library_logs_through_logging_not_print(tmp_path, small_npz, caplog, capsys):
    caplog.set_level(logging.INFO, logger="medsight")
    cfg = apply_overrides(Config(), tiny_overrides(tmp_path / "run", small_npz) + ["train.sharpness_batches=0"])
    train(cfg, progress=False)
    assert capsys.readouterr().out == ""  # nothing printed by the library itself
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("epoch   1/1") for m in messages) and any(m.startswith("test: accuracy") for m in messages)
