"""Tests that guard the numbers: each is named after the single-line bug it catches, and each was seen to
fail with that bug planted. Fast (seconds) on purpose: they belong in every run of the suite."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from medsight.config import DataConfig
from medsight.data import load_data
from medsight.engine.step import train_step
from medsight.explainers import explain
from medsight.inference import Predictor
from medsight.metrics import choose_threshold, expected_calibration_error
from medsight.optim import SAM
from medsight.tasks import SingleLabelTask

from conftest import blob_image, write_class_folders


# --------------------------------------------------------------- the decision threshold comes from validation

def _binary(p1):
    p1 = np.asarray(p1, dtype=np.float64)
    return np.stack([1 - p1, p1], 1)


def test_decision_threshold_is_fitted_on_validation_not_test():
    val_labels, val_probs = np.array([0, 0, 0, 1, 1, 1]), _binary([0.1, 0.2, 0.3, 0.35, 0.8, 0.9])
    test_labels, test_probs = np.array([0, 0, 0, 1, 1, 1]), _binary([0.1, 0.2, 0.6, 0.7, 0.8, 0.9])
    assert choose_threshold(val_labels == 1, val_probs[:, 1]) == pytest.approx(0.35)
    assert choose_threshold(test_labels == 1, test_probs[:, 1]) == pytest.approx(0.7)
    task = SingleLabelTask(["normal", "pneumonia"])
    task.fit_decision(val_labels, val_probs)
    m = task.metrics(test_labels, test_probs, n_boot=0)
    assert m["threshold"] == pytest.approx(0.35)
    assert m["accuracy_at_threshold"] == pytest.approx(5 / 6)  # at test's own threshold it would be 1.0


def test_the_engine_fits_the_threshold_on_validation_predictions_not_test(tiny_run):
    """finish_run must call fit_decision with the validation predictions (the run's own files say which)."""
    with np.load(tiny_run / "predictions.npz") as z:
        on_val = choose_threshold(z["val_labels"] == 1, z["val_probs"][:, 1])
        on_test = choose_threshold(z["test_labels"] == 1, z["test_probs"][:, 1])
    assert on_val != on_test, "the fixture run no longer tells the two apart; give it other data"
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["test"]["threshold"] == pytest.approx(on_val)


# --------------------------------------------------------- validation carved from train leaves train for good

def _disjoint_and_complete(bundle, total):
    keys = {s: [str(p) for p in d.paths] if d.paths is not None else [bytes(img) for img in d.images]
            for s, d in bundle.splits.items()}
    assert set(keys) == {"train", "val", "test"}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(keys[a]) & set(keys[b]), f"{a} and {b} share images"
    assert sum(len(k) for k in keys.values()) == total


def test_validation_carved_from_train_is_removed_from_train(tmp_path):
    # an unsplit folder: val and test both carved out
    _disjoint_and_complete(load_data(DataConfig(path=str(write_class_folders(tmp_path / "d", n_per_class=15)))), 30)
    # a folder with train/ and test/ only: val carved from train
    for split, n in (("train", 12), ("test", 4)):
        write_class_folders(tmp_path / "pre" / split, n_per_class=n, seed=n)
    bundle = load_data(DataConfig(path=str(tmp_path / "pre"), val_fraction=0.25))
    _disjoint_and_complete(bundle, 32)
    assert len(bundle.splits["train"]) == 24 - len(bundle.splits["val"])
    # an .npz with train and test arrays only; every image is unique (its index is written into it)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n, offset in (("train", 40, 0), ("test", 10, 40)):
        labels = np.arange(n) % 2
        images = np.stack([blob_image(int(y), rng) for y in labels])
        images[:, 0, 0], images[:, 0, 1] = (np.arange(n) + offset) % 256, (np.arange(n) + offset) // 256
        arrays |= {f"{split}_images": images, f"{split}_labels": labels}
    np.savez(tmp_path / "d.npz", **arrays)
    bundle = load_data(DataConfig(path=str(tmp_path / "d.npz"), val_fraction=0.2))
    _disjoint_and_complete(bundle, 50)
    assert len(bundle.splits["train"]) + len(bundle.splits["val"]) == 40


# ------------------------------------------------------------------------- ECE weights each bin by its size

def test_ece_weights_each_bin_by_its_share_of_the_images():
    probs = _binary([0.1, 0.1, 0.1, 0.4])  # class 0 predicted with 0.9, 0.9, 0.9 (one bin) and 0.6 (another)
    labels = np.array([0, 0, 1, 0])
    # bin 0.9: accuracy 2/3, gap 0.9 - 2/3, weight 3/4; bin 0.6: accuracy 1, gap 0.4, weight 1/4
    expected = 0.75 * (0.9 - 2 / 3) + 0.25 * 0.4
    assert expected_calibration_error(labels, probs) == pytest.approx(expected)
    assert expected != pytest.approx(((0.9 - 2 / 3) + 0.4) / 2)  # the unweighted mean over bins


# ----------------------------------------------------- SAM steps with the gradient at the perturbed point only

def _sam_problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    return model, x, y, nn.MSELoss()


def _expected_sam_sgd(model, x, y, loss_fn, lr, rho):
    w = model.weight.detach().clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(loss_fn(x @ w.T, y), w)
    w_adv = (w + rho * g0 / g0.norm()).detach().requires_grad_(True)
    (g1,) = torch.autograd.grad(loss_fn(x @ w_adv.T, y), w_adv)
    return (w - lr * g1).detach(), (w - lr * (g0 + g1)).detach()


def test_sam_update_uses_only_the_gradient_at_the_perturbed_point():
    lr, rho = 0.5, 0.3
    for path in ("train_step", "closure"):
        model, x, y, loss_fn = _sam_problem()
        expected, leaked = _expected_sam_sgd(model, x, y, loss_fn, lr, rho)
        assert not torch.allclose(expected, leaked, atol=1e-4)  # the problem tells the two apart
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
        if path == "train_step":  # the engine's one step function
            train_step(model, x, y, opt, loss_fn)
        else:  # the optimizer's drop-in step(closure), used as in the SAM reference (the closure does not zero)
            def closure():
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss
            closure()
            opt.step(closure)
        assert torch.allclose(model.weight.detach(), expected, atol=1e-6), path


# ---------------------------------------------------------- the default explanation target is the predicted class

class _TwoWayCnn(nn.Module):
    """Class 1's head is the negative of class 0's: the two classes' Grad-CAM maps differ everywhere."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight[1] = -self.fc.weight[0]
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_explain_defaults_to_each_images_predicted_class():
    model = _TwoWayCnn().eval()
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    pred = model(x).argmax(1)
    assert 0 < int(pred.sum()) < len(pred)  # both classes are predicted in the batch
    default = explain(model, x, "gradcam", target_layer=model.conv)
    assert torch.allclose(default, explain(model, x, "gradcam", target_layer=model.conv, class_idx=pred))
    other = explain(model, x, "gradcam", target_layer=model.conv, class_idx=1 - pred)
    assert (default - other).abs().amax((1, 2)).min() > 0.1  # the other class's map is another map


def test_predictor_heatmap_defaults_to_the_predicted_class(tiny_run, tmp_path):
    """The tiny run's checkpoint with its head's bias set so that both classes are predicted on a few images."""
    ckpt = torch.load(tiny_run / "best.pt", map_location="cpu", weights_only=True)
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(blob_image(i % 2, rng)).float()[None] / 255 for i in range(8)]
    pred = Predictor(tiny_run / "best.pt", "cpu")
    margin = np.array([np.log(p[1] / p[0]) for p in (pred.probabilities(img) for img in images)])
    bias = next(k for k, v in reversed(ckpt["model"].items()) if k.endswith("bias") and v.shape == (2,))
    t = pred.task.rules.temperature or 1.0  # the margins are of calibrated probabilities: logits / T
    ckpt["model"][bias] = ckpt["model"][bias] + torch.tensor([0.0, -float(np.median(margin)) * t])
    torch.save(ckpt, tmp_path / "balanced.pt")
    pred = Predictor(tmp_path / "balanced.pt", "cpu")
    decided = [int(np.argmax(pred.probabilities(img))) for img in images]
    assert set(decided) == {0, 1}
    for img, c in zip(images, decided):
        default = pred.heatmap(img)
        assert np.allclose(default, pred.heatmap(img, class_idx=c), atol=1e-6)
        assert not np.allclose(default, pred.heatmap(img, class_idx=1 - c), atol=1e-3)


# ------------------------------------------------------------- evaluation never sees the training augmentation

def test_validation_and_test_images_get_the_evaluation_transform_not_training_augmentation(small_npz, tmp_path):
    from medsight.config import Config, apply_overrides
    from medsight.engine.build import build_run
    from medsight.engine.distributed import DistInfo

    cfg = apply_overrides(Config(), [f"data.path={small_npz}", f"out={tmp_path / 'run'}", "data.image_size=32",
                                     "data.hflip=true", "data.rotate_degrees=30", "data.random_erasing=1.0"])
    run = build_run(cfg, tmp_path / "run", DistInfo(), torch.device("cpu"))
    torch.manual_seed(0)
    assert not torch.equal(run.datasets["train"][0][0], run.datasets["train"][0][0])  # augmentation is on
    for split in ("val", "test", "train_eval"):
        ds = run.datasets[split]
        assert torch.equal(ds[0][0], ds[0][0]), split
