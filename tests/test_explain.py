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


def _map_side(model, layer_name, size):
    """The shorter side of ``layer_name``'s output for a ``size``-pixel input, measured with a hook."""
    seen = []
    layer = dict(model.named_modules())[layer_name]
    h = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape) and None)
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    h.remove()
    return min(seen[0][-2:])


@pytest.mark.parametrize("name,size,expected", [("coatnet_tiny", 64, "stages.1"), ("coatnet_tiny", 128, "stages.2"),
                                                ("resnet18", 224, "layer4"), ("resnet18", 64, "layer2")])
def test_default_layer_is_the_deepest_with_a_fine_enough_grid(name, size, expected):
    """The default layer's map has at least MIN_CAM_SIDE cells on a side, and the next deeper stage's would not
    (at 224 px a ResNet keeps its last stage, 7 × 7); an explicit layer wins over the rule."""
    from medsight.models import MIN_CAM_SIDE, cam_target

    model = create_model(name, num_classes=2, img_size=size).eval()
    chosen = cam_target(model, img_size=size).name
    assert chosen == expected
    assert _map_side(model, chosen, size) >= MIN_CAM_SIDE
    modules = [e["module"] for e in model.feature_info]
    deeper = modules[modules.index(chosen) + 1:]
    assert all(_map_side(model, d, size) < MIN_CAM_SIDE for d in deeper)
    last = modules[-1]
    assert cam_target(model, last, img_size=size).name == last


def _ones_conv(k, stride, padding, same=False):
    from timm.layers import Conv2dSame

    conv = (Conv2dSame(1, 1, k, stride) if same else nn.Conv2d(1, 1, k, stride, padding, bias=False))
    nn.init.ones_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


@pytest.mark.parametrize("same", [False, True])
def test_cell_offset_is_the_receptive_field_centre(same):
    """Independent check: in a linear chain of all-ones convolutions and average pools, the gradient of one
    interior output cell w.r.t. the input is its receptive field; its centroid, less the centre a resize
    assumes ((i + 1/2) x stride), is the offset cell_offset computes from the layers' geometry."""
    from medsight.models import cell_offset

    chain = nn.Sequential(_ones_conv(3, 2, 1, same), _ones_conv(5, 2, 2, same), nn.AvgPool2d(2),
                          _ones_conv(3, 2, 1, same))
    model = nn.Sequential(chain, nn.Flatten(), nn.LazyLinear(2))
    x = torch.zeros(1, 1, 96, 96, requires_grad=True)
    out = chain(x)
    stride = 96 // out.shape[-1]
    i, j = 2, 3
    g, = torch.autograd.grad(out[0, 0, i, j], x)
    w = g[0, 0].numpy()
    yy, xx = np.mgrid[:96, :96] + 0.5
    cy, cx = (w * yy).sum() / w.sum(), (w * xx).sum() / w.sum()
    dy, dx = cell_offset(model, chain, x.detach())
    assert dy == pytest.approx(cy - (i + 0.5) * stride, abs=1e-6)
    assert dx == pytest.approx(cx - (j + 0.5) * stride, abs=1e-6)
    assert (dy < 0) if not same else (dy > 0)  # symmetric padding looks earlier, TensorFlow's later


def test_registered_heatmap_peaks_on_the_evidence():
    """Three 3 x 3, stride-2, padding-1 convolutions that pass their centre tap put input pixel 8i in cell i,
    which a resize draws at 8i + 4: the registered map peaks on the bright pixel, the library's 3.5 px away."""
    convs = []
    for _ in range(3):
        c = nn.Conv2d(3 if not convs else 1, 1, 3, 2, 1, bias=False)
        nn.init.zeros_(c.weight)
        with torch.no_grad():
            c.weight[:, :, 1, 1] = 1.0
        convs.append(c)
    features = nn.Sequential(*convs)
    model = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[-1].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    x = torch.zeros(1, 3, 64, 64)
    x[0, :, 24, 40] = 1.0  # row 24 = 8 x 3, column 40 = 8 x 5
    for register, expected in ((True, (24, 40)), (False, (27, 43))):
        m = explain(model, x, "gradcam", target_layer=features, class_idx=0, register=register)[0]
        r, c = divmod(int(m.argmax()), 64)
        assert (r, c) == expected, (register, r, c)
        assert float(m.max()) == pytest.approx(1.0) and float(m.min()) >= 0


def test_cell_offset_follows_the_learned_path_beside_a_pooled_shortcut():
    """A residual block that halves the resolution with a 3 x 3 stride-2 convolution beside a 2 x 2 average-pool
    shortcut (ResNet-D): the convolution's geometry (half a pixel early) counts, not the pool's (centred)."""
    from medsight.models import cell_offset

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AvgPool2d(2)
            self.conv = _ones_conv(3, 2, 1, False)

        def forward(self, x):
            return self.pool(x) + self.conv(x)

    blocks = nn.Sequential(Block(), Block())
    model = nn.Sequential(blocks, nn.Flatten(), nn.LazyLinear(2))
    dy, dx = cell_offset(model, blocks, torch.zeros(1, 1, 32, 32))
    assert dy == pytest.approx(-0.5 - 1.0) and dx == pytest.approx(-1.5)  # -1/2 at stride 1, -1 at stride 2
