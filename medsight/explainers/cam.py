"""What the model looked at: the Grad-CAM family behind one registry, overlays and a shortcut check.

The CAM methods come from the maintained ``grad-cam`` library (Gildenblat et al., pytorch-grad-cam);
medsight picks the target layer per architecture (``medsight.models.cam_target``), validates class
indices before the library sees them (its context manager swallows IndexError), always releases the
hooks, registers each map to where the layer's cells look on the input (``medsight.models.cell_offset``:
the library's resize assumes cell centres that strided, padded convolutions do not keep), and returns
heatmaps as tensors on the images' device.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
ICCV 2017; Chattopadhay et al., "Grad-CAM++", WACV 2018; Draelos & Carin, "HiResCAM", 2020;
Jiang et al., "LayerCAM", TIP 2021; Muhammad & Yeasin, "Eigen-CAM", IJCNN 2020; Wang et al.,
"Score-CAM", CVPR-W 2020; Fu et al., "XGrad-CAM", BMVC 2020.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from pytorch_grad_cam import (EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM,
                              XGradCAM)
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from medsight.config import CamMethod, choices
from medsight.errors import UsageError
from medsight.models.targets import cam_target, cell_offset

__all__ = ["EXPLAINERS", "explain", "overlay", "border_score", "BORDER_WARN", "resolve_classes", "shift_maps"]

#: Method name -> CAM class. The CLI's --method choices and the web UI's selector are built from this.
EXPLAINERS: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
}
assert tuple(EXPLAINERS) == choices(CamMethod), "medsight.config.CamMethod and EXPLAINERS disagree"

#: A dataset-mean border score above this suggests the model reads image borders/corners (a shortcut).
BORDER_WARN = 0.5


def resolve_classes(class_idx: int | Sequence[int] | torch.Tensor, n: int, num_classes: int) -> list[int]:
    """One class per image (an int applies to all); out-of-range indices are a clear error."""
    if isinstance(class_idx, torch.Tensor):
        idx = class_idx.reshape(-1).tolist()
    elif isinstance(class_idx, int):
        idx = [class_idx]
    else:
        idx = list(class_idx)
    if len(idx) == 1:
        idx = idx * n
    if len(idx) != n:
        raise ValueError(f"class_idx has {len(idx)} entries for {n} images")
    for c in idx:
        if not 0 <= int(c) < num_classes:
            raise UsageError(f"class index {c} is out of range: the model has {num_classes} classes "
                             f"(0..{num_classes - 1})")
    return [int(c) for c in idx]


def shift_maps(maps: torch.Tensor, dy: float, dx: float) -> torch.Tensor:
    """Maps (B, H, W) moved by (dy, dx) pixels (bilinear; the edge repeats into the uncovered band), each
    scaled back to a maximum of 1."""
    if dy == 0 and dx == 0:
        return maps
    b, h, w = maps.shape
    ys = (torch.arange(h, dtype=maps.dtype) + 0.5 - dy) / h * 2 - 1
    xs = (torch.arange(w, dtype=maps.dtype) + 0.5 - dx) / w * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).expand(b, h, w, 2)
    out = torch.nn.functional.grid_sample(maps[:, None], grid.to(maps.device), mode="bilinear",
                                          padding_mode="border", align_corners=False)[:, 0]
    peak = out.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (out / peak).clamp_(0, 1)


def _targets(model: nn.Module, images: torch.Tensor, class_idx: int | Sequence[int] | torch.Tensor | None
             ) -> list[ClassifierOutputTarget] | None:
    """The library's targets for ``class_idx``; None lets it explain each image's predicted class."""
    if class_idx is None:
        return None
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int):
        with torch.no_grad():
            num_classes = model(images[:1]).shape[1]
    return [ClassifierOutputTarget(c) for c in resolve_classes(class_idx, len(images), num_classes)]


def explain(model: nn.Module, images: torch.Tensor, method: str = "gradcam",
            target_layer: nn.Module | str | None = None,
            class_idx: int | Sequence[int] | torch.Tensor | None = None, register: bool = True) -> torch.Tensor:
    """Heatmaps for a batch of normalized images.

    Args:
        model: a classifier; put in eval mode for the call.
        images: (B, 3, H, W) normalized input.
        method: a key of :data:`EXPLAINERS`.
        target_layer: a module of ``model`` or its dotted name; None picks the architecture's deepest stage
            with at least :data:`medsight.models.MIN_CAM_SIDE` cells on a side.
        class_idx: the class to explain, one int, or one per image; default: the predicted class.
        register: move the maps to where the layer's cells look (:func:`medsight.models.cell_offset`);
            False keeps the library's placement.

    Returns:
        (B, H, W) float tensor in [0, 1] on ``images.device``.
    """
    if method not in EXPLAINERS:
        raise UsageError(f"unknown explanation method {method!r}; choose from {', '.join(EXPLAINERS)}")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    was_training = model.training
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:  # bf16/fp16 models: explain an fp32 copy
        model = copy.deepcopy(model).float()
    model.eval()
    images = images.float()
    reshape = None
    if isinstance(target_layer, nn.Module):
        layer = target_layer
    else:
        target = cam_target(model, target_layer, img_size=min(images.shape[-2:]))
        layer, reshape = target.layer, target.reshape
    # Gradients are needed with respect to activations only: freezing the weights for the call spares
    # the backward pass their gradients (about a third of its work); the input carries the graph.
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        targets = _targets(model, images, class_idx)
        for p in frozen:
            p.requires_grad_(False)
        kwargs = {"reshape_transform": reshape} if reshape is not None else {}
        with EXPLAINERS[method](model=model, target_layers=[layer], **kwargs) as cam:
            if hasattr(cam, "batch_size"):
                cam.batch_size = 32
            maps = cam(input_tensor=images.detach().requires_grad_(True), targets=targets)
        if maps is None:  # the library's context manager returned after swallowing an error
            raise RuntimeError(f"{method} failed on layer {layer.__class__.__name__}")
        out = torch.from_numpy(np.nan_to_num(np.asarray(maps, dtype=np.float32))).clamp_(0, 1)
        if register:
            out = shift_maps(out, *cell_offset(model, layer, images))
        return out.to(images.device)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """JET heatmap over an RGB image (H×W, float in [0, 1]) with heat weight ``alpha``. A heatmap of another
    size (the model's input, under a display-resolution image of the same framing) is resized to the image."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if heatmap.shape != image.shape[:2]:
        heatmap = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(heatmap, dtype=np.float32))[None, None],
                                                  size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    return show_cam_on_image(image.astype(np.float32), heatmap.astype(np.float32), use_rgb=True,
                             image_weight=1 - alpha)


def border_score(heatmaps: torch.Tensor, band: float = 0.1, fov: bool = False) -> torch.Tensor:
    """Share of each heatmap's heat in the outer band (edges and corners, ``band`` of each side).

    A model that has learned a shortcut (markers, text, collimation at the image border) puts its heat
    there; a uniform map scores 1 - (1 - 2·band)², 0.36 for the default band. An all-zero map scores NaN.
    With ``fov`` (fundus photographs cropped to their circular field of view), only heat inside the circle
    counts and the band is its outer ring beyond (1 - 2·band) of the radius: a uniform map again scores 0.36,
    and the black corners outside the retina neither hide nor fake a shortcut.
    """
    h, w = heatmaps.shape[-2:]
    if fov:
        yy, xx = torch.meshgrid(torch.arange(h, device=heatmaps.device), torch.arange(w, device=heatmaps.device),
                                indexing="ij")
        r = torch.sqrt((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (min(h, w) / 2)
        heatmaps = heatmaps * (r <= 1)
        mask = r > 1 - 2 * band
    else:
        bh, bw = max(1, round(h * band)), max(1, round(w * band))
        mask = torch.ones(h, w, dtype=torch.bool, device=heatmaps.device)
        mask[bh:h - bh, bw:w - bw] = False
    total = heatmaps.sum(dim=(-2, -1))
    score = (heatmaps * mask).sum(dim=(-2, -1)) / total.clamp_min(1e-12)
    # An empty map (no positive evidence anywhere) has no location: NaN, left out of dataset means.
    return torch.where(total > 1e-8, score, torch.full_like(score, float("nan")))
