import numpy as np
import pytest
import torch
from torch import nn

from medsight.config import OptimConfig
from medsight.explainers import EXPLAINERS, border_score, explain
from medsight.models import ModelError, create_model
from medsight.optim import create_optimizer
from medsight.engine import train_step

from conftest import blob_image


@pytest.mark.parametrize("method", list(EXPLAINERS))
@pytest.mark.parametrize("name", ["coatnet_tiny", "resnet18"])
def test_every_method_shape_and_range(name, method):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    maps = explain(model, x, method=method)
    assert maps.shape == (2, 64, 64)
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())  # hooks released


def test_class_index_out_of_range_is_clear():
    model = create_model("resnet18", num_classes=2, img_size=32)
    with pytest.raises(ValueError, match="class index 5.*2 classes"):
        explain(model, torch.randn(1, 3, 32, 32), class_idx=5)


def test_unknown_target_layer_lists_close_names():
    model = create_model("resnet18", num_classes=2, img_size=32)
    with pytest.raises(ModelError, match="target layer 'layer5'.*Close names: .*layer"):
        explain(model, torch.randn(1, 3, 32, 32), target_layer="layer5")


def test_bf16_model_is_explained_in_fp32():
    model = create_model("resnet18", num_classes=2, img_size=32).to(torch.bfloat16)
    maps = explain(model, torch.randn(2, 3, 32, 32), method="gradcam")
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert next(model.parameters()).dtype == torch.bfloat16  # the caller's model is untouched


def _blob_batch(n, seed, size=64):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    imgs = np.stack([blob_image(int(y), rng, size=size) for y in labels]).astype(np.float32) / 255
    x = (torch.from_numpy(imgs)[:, None].expand(-1, 3, -1, -1) - 0.5) / 0.5
    return x.contiguous(), torch.from_numpy(labels)


def test_planted_evidence_heatmap_peaks_in_its_quadrant():
    """Class 1's evidence is a square somewhere in the top-left quadrant, class 0 has none: Grad-CAM for a
    trained CoAtNet must put its peak in that quadrant."""
    torch.manual_seed(0)
    model = create_model("coatnet_tiny", num_classes=2, img_size=64)
    opt = create_optimizer(model, OptimConfig(name="adamw", lr=2e-3, weight_decay=0.0))
    x, y = _blob_batch(256, seed=0)
    model.train()
    for _ in range(4):
        for i in range(0, len(x), 32):
            train_step(model, x[i:i + 32], y[i:i + 32], opt, nn.CrossEntropyLoss())
    xt, yt = _blob_batch(40, seed=1)
    model.eval()
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() > 0.9
    pos = xt[yt == 1]
    maps = explain(model, pos, method="gradcam", class_idx=1)
    peak = maps.flatten(1).argmax(1)
    rows, cols = peak // 64, peak % 64
    in_quadrant = ((rows < 32) & (cols < 32)).float().mean()
    assert in_quadrant >= 0.8, f"only {in_quadrant:.0%} of heatmap peaks in the evidence quadrant"


def test_border_score_separates_border_from_center():
    border = torch.zeros(1, 20, 20)
    border[:, :2, :2] = 1.0  # all heat in a corner
    center = torch.zeros(1, 20, 20)
    center[:, 8:12, 8:12] = 1.0
    uniform = torch.ones(1, 20, 20)
    assert float(border_score(border)) == pytest.approx(1.0)
    assert float(border_score(center)) == pytest.approx(0.0)
    assert float(border_score(uniform)) == pytest.approx(1 - 0.8 ** 2)
    assert torch.isnan(border_score(torch.zeros(1, 20, 20))).all()  # no heat, no location


@pytest.mark.parametrize("name", ["maxvit_nano_rw_256", "convnext_atto", "seresnext26d_32x4d", "densenet121",
                                  "efficientnet_b0", "swinv2_cr_tiny_ns_224", "vit_tiny_patch16_224"])
def test_every_family_gets_a_target_layer(name):
    """One random model per backbone family: the automatic layer gives finite maps in [0, 1]."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, img_size=64)
    x = torch.randn(2, 3, 64, 64)
    for method in ("gradcam", "gradcam++", "layercam", "eigencam"):
        maps = explain(model, x, method=method)
        assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all(), (name, method)
        assert float(maps.min()) >= 0 and float(maps.max()) <= 1, (name, method)


def test_explain_restores_trainability_and_mode():
    model = create_model("resnet18", num_classes=2, img_size=32).train()
    model.fc.weight.requires_grad_(False)  # a user's frozen layer stays frozen
    explain(model, torch.randn(2, 3, 32, 32), class_idx=[0, 1])
    assert model.training
    assert not model.fc.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "fc.weight")
    with pytest.raises(ValueError, match="out of range"):
        explain(model, torch.randn(2, 3, 32, 32), class_idx=5)
