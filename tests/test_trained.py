"""A checkpoint is read once into a Trained bundle that every command shares."""

import torch

from medsight.checkpoint import Trained, load_checkpoint, load_trained
from medsight.config import config_from_dict
from medsight.inference.predictor import Predictor, eval_transform
from medsight.tasks import task_from_checkpoint


def test_trained_holds_what_the_checkpoint_says(tiny_run):
    path = tiny_run / "best.pt"
    trained = load_trained(path, "cpu")
    ckpt = load_checkpoint(path)
    assert isinstance(trained, Trained) and not trained.model.training
    assert trained.task.state() == task_from_checkpoint(ckpt).state()
    assert trained.config == config_from_dict(ckpt["config"])
    assert trained.image_size == ckpt["image_size"] and trained.name == ckpt["config"]["model"]["name"]
    img = torch.rand(1, 40, 50)
    torch.testing.assert_close(trained.transform()(img.expand(3, -1, -1)), eval_transform(ckpt)(img.expand(3, -1, -1)))
    assert trained.transform()(img.expand(3, -1, -1)).shape[-1] == ckpt["image_size"]
    with torch.no_grad():
        x = torch.rand(2, 3, trained.image_size, trained.image_size)
        torch.testing.assert_close(trained.model(x), Predictor(path, "cpu").model(x))


def test_the_predictor_reads_the_bundle(tiny_run):
    pred = Predictor(tiny_run / "best.pt", "cpu")
    trained = load_trained(tiny_run / "best.pt", "cpu")
    assert pred.task.state() == trained.task.state() and pred.classes == trained.task.classes
    assert pred.image_size == trained.image_size and pred.data_cfg == trained.config.data


def test_a_checkpoint_with_unreadable_rules_names_the_file_and_the_field(tiny_run, tmp_path):
    import pytest

    from medsight.checkpoint import CheckpointError

    ckpt = load_checkpoint(tiny_run / "best.pt")
    ckpt["task"] = {**ckpt["task"], "rules": {**ckpt["task"].get("rules", {}), "temperature": "warm"}}
    bad = tmp_path / "bad_rules.pt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"bad_rules\.pt.*temperature"):
        load_trained(bad, "cpu")
