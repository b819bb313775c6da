"""Shortcut detection (border score + warning) and faithfulness (deletion/insertion against a random map)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from medsight.config import Config, apply_overrides
from medsight.explainers.faithfulness import deletion_insertion, faithfulness
from medsight.engine import train


def marker_image(label: int, rng: np.random.Generator, where: str, size: int = 64) -> np.ndarray:
    """Noise; class 1 carries a bright 10×10 marker at the top-left corner or in the centre."""
    img = rng.integers(0, 80, (size, size)).astype(np.uint8)
    if label == 1:
        if where == "corner":
            img[:10, :10] = 240
        else:
            c = size // 2 - 5
            img[c:c + 10, c:c + 10] = 240
    return img


def write_marker_set(root: Path, where: str, n: int = 80) -> Path:
    rng = np.random.default_rng(0)
    for label, name in enumerate(["clean", "marked"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(marker_image(label, rng, where)).save(root / name / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("where,warned", [("corner", True), ("center", False)])
def test_corner_marker_is_flagged_as_a_shortcut(tmp_path, caplog, where, warned):
    data = write_marker_set(tmp_path / "data", where)
    cfg = apply_overrides(Config(), [f"data.path={tmp_path / 'data'}", f"out={tmp_path / 'run'}", "train.epochs=6",
                                     "data.image_size=64", "train.batch_size=16", "data.hflip=false",
                                     "schedule.warmup_epochs=0", "train.sharpness_batches=0",
                                     "explain.gallery_per_class=2", "explain.faithfulness_images=0",
                                     "optim.name=adamw", "optim.lr=1e-3", "train.monitor=loss", "plan=false"])
    metrics = train(cfg, progress=False).metrics
    assert metrics["test"]["auc"] >= 0.95  # the marker is learnt ...
    score = metrics["explain"]["border_score_mean"]
    out = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    per_class = metrics["explain"]["border_score_per_class"]
    assert metrics["explain"]["border_warning"] is warned, per_class  # ... and where it sits is reported
    assert ("shortcut" in out) is warned
    if warned:
        assert per_class["marked"] > 0.5  # the marked class's heat sits in the corner
        assert "(highest class mean)" in (tmp_path / "run" / "report.html").read_text()
    else:
        assert max(per_class.values()) < 0.36  # below a uniform map: the heat is central
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["explain"]["border_score_mean"] == score


class BrightSquareDetector(nn.Module):
    """A model whose evidence is known exactly: class 1's logit grows with the bright pixels it sees."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.features.weight.fill_(1.0 / 27)
            self.features.bias.fill_(-0.5)  # only bright regions (normalized value > 0.5) pass the ReLU
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-200.0] * 4, [200.0] * 4]))
            self.head.bias.copy_(torch.tensor([1.0, -1.0]))

    def forward(self, x):
        return self.head(self.pool(self.act(self.features(x))).flatten(1))


def test_gradcam_is_more_faithful_than_a_random_map():
    from test_explain import _blob_batch

    model = BrightSquareDetector().eval()
    x, y = _blob_batch(16, seed=3)
    images = x[y == 1]
    assert (model(images).argmax(1) == 1).all()
    result = faithfulness(model, images, methods=("gradcam", "gradcam++", "layercam"), target_layer="act", steps=10)
    m = result["methods"]
    for method in ("gradcam", "gradcam++", "layercam"):
        assert m[method]["insertion_auc"] > m["random"]["insertion_auc"] + 0.2, m
        assert m[method]["deletion_auc"] < m["random"]["deletion_auc"] - 0.1, m
    assert len(m["gradcam"]["deletion_curve"]) == 11 and result["images"] == len(images)


def test_deletion_insertion_endpoints():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    x = torch.randn(2, 3, 8, 8)
    r = deletion_insertion(model, x, torch.rand(2, 8, 8), torch.tensor([0, 1]), steps=4)
    p = torch.softmax(model(x), 1)[[0, 1], [0, 1]]
    torch.testing.assert_close(r["deletion"][:, 0], p)  # nothing deleted yet: the model's own probability
    torch.testing.assert_close(r["insertion"][:, -1], p)  # everything inserted: the same
    torch.testing.assert_close(r["deletion"][:, -1], r["insertion"][:, 0])  # both: the flat mean image
