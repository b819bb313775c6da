"""Image tensors: 3 channels, fitting to the square input (``data.resize``), the fundus preset, optional
CLAHE, augmentation, and the model's normalization.

Every image goes through the same geometric step in training, evaluation, predict, explain and serve: the
first step of :func:`make_transform` — a plain resize ("squash", the default), a letterbox ("pad") or a
centre crop ("crop") that keep the aspect, or, with ``data.preset=fundus``, :class:`FundusView` (the circular
field of view cropped out and the outside masked). :func:`display_view` repeats that step at display
resolution, so that heatmaps (made at the model's input size) are drawn on the image itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from medsight.config import AutoAugment, choices

if TYPE_CHECKING:
    from medsight.config import DataConfig

__all__ = ["make_transform", "Clahe", "to_three_channels", "array_to_tensor", "AUTO_AUGMENT_POLICIES", "AspectResize",
           "FundusView", "find_field_of_view", "graham_normalize", "display_view", "view_settings", "FovNotFoundWarning",
           "geometric_step"]

#: data.auto_augment name -> torchvision policy (the names are config.AutoAugment's)
AUTO_AUGMENT_POLICIES: dict[str, type[torch.nn.Module]] = {
    "randaugment": v2.RandAugment, "autoaugment": v2.AutoAugment, "trivialaugment": v2.TrivialAugmentWide}
assert ("none", *AUTO_AUGMENT_POLICIES) == choices(AutoAugment), "config.AutoAugment and the policies disagree"


class FovNotFoundWarning(UserWarning):
    """The fundus preset found no circular field of view; the whole image was used."""


class AspectResize(torch.nn.Module):
    """An image into a ``size``×``size`` square: ``squash`` (stretch), ``pad`` (scale the longer side to
    ``size`` and letterbox with black) or ``crop`` (scale the shorter side to ``size``, cut the centre)."""

    def __init__(self, size: int, policy: str = "squash") -> None:
        super().__init__()
        if policy not in ("squash", "pad", "crop"):
            raise ValueError(f"unknown resize policy {policy!r}; choose squash, pad or crop")
        self.size, self.policy = int(size), policy

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        s = self.size
        h, w = img.shape[-2:]
        if self.policy == "squash" or h == w:
            return TF.resize(img, [s, s], antialias=True)
        scale = s / (max(h, w) if self.policy == "pad" else min(h, w))
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        img = TF.resize(img, [nh, nw], antialias=True)
        if self.policy == "crop":
            return TF.center_crop(img, [s, s])
        top, left = (s - nh) // 2, (s - nw) // 2
        return TF.pad(img, [left, top, s - nw - left, s - nh - top], fill=0.0)

    def extra_repr(self) -> str:
        return f"size={self.size}, policy={self.policy}"


def find_field_of_view(img: torch.Tensor, threshold: float | None = None) -> tuple[float, float, float] | None:
    """(centre row, centre column, radius) in pixels of a fundus photograph's circular field of view, or
    None when the image shows no bright disc on a dark background.

    The brightest channel above ``threshold`` (default: 15% of the image's 99th percentile, at least 0.04, which
    ignores compression noise in the black border) marks the retina (on a copy of at most ~512 px); rows and
    columns holding at least 10% of the widest row (column) bound the disc, whose diameter is the longer side of that box (cameras often
    cut the top and bottom of the circle off). It is a disc only if it fills at least half its box, covers 5%
    of the image and leaves the box's four corners dark.
    """
    h, w = img.shape[-2:]
    step = max(1, max(h, w) // 512)
    bright = img[:, ::step, ::step].amax(0)
    if threshold is None:
        threshold = max(0.04, 0.15 * float(torch.quantile(bright.flatten().float(), 0.99)))
    mask = (bright > threshold).float()
    if mask.mean() < 0.05:
        return None
    per_row, per_col = mask.sum(1), mask.sum(0)
    rows = torch.nonzero(per_row > 0.1 * per_row.max()).flatten()  # a chord of 10% of the diameter lies at
    cols = torch.nonzero(per_col > 0.1 * per_col.max()).flatten()  # 0.995 of the radius; stray specks drop out
    if not len(rows) or not len(cols):
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = mask[y0:y1, x0:x1]
    bh, bw = box.shape
    if box.mean() < 0.5 or min(bh, bw) < 4:
        return None
    c = max(1, round(0.1 * min(bh, bw)))
    corners = torch.stack([box[:c, :c].mean(), box[:c, -c:].mean(), box[-c:, :c].mean(), box[-c:, -c:].mean()])
    if float(corners.max()) >= 0.5:
        return None
    return (y0 + y1) / 2 * step, (x0 + x1) / 2 * step, max(bh, bw) / 2 * step


def graham_normalize(img: torch.Tensor, radius: float) -> torch.Tensor:
    """Ben Graham's preprocessing (Kaggle Diabetic Retinopathy Detection, 2015): subtract the local average
    colour, 4·(I − G_σ * I) + 0.5 with σ = radius / 30, which evens out lighting and camera colour."""
    sigma = max(radius / 30, 0.3)
    k = 2 * math.ceil(3 * sigma) + 1
    blurred = TF.gaussian_blur(img, [k, k], [sigma, sigma])
    return (4 * (img - blurred) + 0.5).clamp(0, 1)


def _disc(size: int, radius_scale: float, device: torch.device) -> torch.Tensor:
    c = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size, device=device), torch.arange(size, device=device), indexing="ij")
    return ((yy - c) ** 2 + (xx - c) ** 2) <= (radius_scale * size / 2) ** 2


class FundusView(torch.nn.Module):
    """The fundus preset: crop the square around the circular field of view (padding with black where the
    camera cut the circle off), scale it to ``size``, optionally apply :func:`graham_normalize`, and mask
    the outside of the circle (black; Graham's grey 0.5, inside 90% of the radius, with ``graham``).

    When no field of view is found (:func:`find_field_of_view`), the whole image is used through
    ``fallback`` resizing, with a :class:`FovNotFoundWarning`.
    """

    def __init__(self, size: int, fallback: str = "pad", graham: bool = False) -> None:
        super().__init__()
        self.size, self.graham = int(size), graham
        self.fallback = AspectResize(size, fallback)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        fov = find_field_of_view(img)
        if fov is None:
            h, w = img.shape[-2:]
            warnings.warn(f"fundus preset: no circular field of view found in a {w}×{h} image; using the whole "
                          f"image ({self.fallback.policy})", FovNotFoundWarning, stacklevel=2)
            out = self.fallback(img)
            return graham_normalize(out, self.size / 2) if self.graham else out
        cy, cx, r = fov
        top, left, side = round(cy - r), round(cx - r), max(1, round(2 * r))
        h, w = img.shape[-2:]
        square = img.new_zeros((img.shape[0], side, side))
        ys, xs = max(0, top), max(0, left)
        ye, xe = min(h, top + side), min(w, left + side)
        if ye > ys and xe > xs:
            square[:, ys - top:ye - top, xs - left:xe - left] = img[:, ys:ye, xs:xe]
        out = TF.resize(square, [self.size, self.size], antialias=True)
        if self.graham:
            out = graham_normalize(out, self.size / 2)
            return torch.where(_disc(self.size, 0.9, out.device), out, torch.full_like(out, 0.5))
        return out * _disc(self.size, 1.0, out.device)

    def extra_repr(self) -> str:
        return f"size={self.size}, fallback={self.fallback.policy}, graham={self.graham}"


def geometric_step(image_size: int, cfg: DataConfig | None) -> Any:
    """The first, deterministic step of :func:`make_transform` (what a prepared cache stores): the old plain
    resize for ``squash`` (so measured runs are unchanged), an :class:`AspectResize` or a :class:`FundusView`."""
    preset = getattr(cfg, "preset", "none") if cfg is not None else "none"
    policy = getattr(cfg, "resize", "squash") if cfg is not None else "squash"
    if preset == "fundus":
        return FundusView(image_size, fallback=policy, graham=bool(getattr(cfg, "graham", False)))
    if policy == "squash":
        return v2.Resize((image_size, image_size), antialias=True)
    return AspectResize(image_size, policy)


def view_settings(transform: v2.Compose) -> dict[str, Any]:
    """The geometry of a transform built by :func:`make_transform`: ``size``, ``resize``, ``preset`` and
    ``graham``."""
    first = transform.transforms[0]
    if isinstance(first, FundusView):
        return {"size": first.size, "resize": first.fallback.policy, "preset": "fundus", "graham": first.graham}
    if isinstance(first, AspectResize):
        return {"size": first.size, "resize": first.policy, "preset": "none", "graham": False}
    size = first.size
    return {"size": int(size[0] if isinstance(size, (list, tuple)) else size), "resize": "squash", "preset": "none",
            "graham": False}


def display_view(img: torch.Tensor, image_size: int, resize: str = "squash", preset: str = "none",
                 max_side: int = 512) -> torch.Tensor:
    """The image as the model frames it, at display resolution: the longer side is the source's (for fundus
    photographs, the field of view's diameter), at most ``max_side`` and at least ``image_size``. A heatmap
    made at the model's input size covers it exactly once resized to it; with ``squash`` the image keeps
    its own aspect (the heatmap is stretched back)."""
    h, w = img.shape[-2:]
    d = max(image_size, min(max_side, max(h, w)))
    if preset == "fundus":
        fov = find_field_of_view(img)
        if fov is not None:
            d = max(image_size, min(max_side, round(2 * fov[2])))
        with warnings.catch_warnings():  # the model's own preprocessing has said so already
            warnings.simplefilter("ignore", FovNotFoundWarning)
            return FundusView(d, fallback=resize)(img)
    if resize == "squash":
        scale = d / max(h, w)
        return TF.resize(img, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
    return AspectResize(d, resize)(img)


def make_transform(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                   cfg: DataConfig | None = None) -> v2.Compose:
    """Float [C,H,W] in [0,1] -> 3-channel, fitted to the square input, (augmented), normalized tensor."""
    steps: list[Any] = [geometric_step(image_size, cfg)]
    if cfg is not None and cfg.clahe:  # preprocessing, not augmentation: applied at inference too
        steps.append(Clahe(cfg.clahe_clip))
    if train and cfg is not None:
        if cfg.rrc_scale < 1:
            steps.append(v2.RandomResizedCrop((image_size, image_size), scale=(cfg.rrc_scale, 1.0), antialias=True))
        if cfg.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if cfg.rotate_degrees or cfg.translate:
            steps.append(v2.RandomAffine(degrees=cfg.rotate_degrees, translate=(cfg.translate, cfg.translate)))
        if cfg.brightness or cfg.contrast:
            steps.append(v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast))
        if cfg.auto_augment != "none":
            aug = AUTO_AUGMENT_POLICIES[cfg.auto_augment]
            # the policies work on uint8 images: quantize, augment, and return to float
            steps += [v2.ToDtype(torch.uint8, scale=True), aug(), v2.ToDtype(torch.float32, scale=True)]
    steps.append(v2.Normalize(mean=list(mean), std=list(std)))
    if train and cfg is not None and cfg.random_erasing:
        steps.append(v2.RandomErasing(p=cfg.random_erasing))
    return v2.Compose(steps)


class Clahe(torch.nn.Module):
    """OpenCV's CLAHE per channel on a float [C, H, W] image in [0, 1] (8-bit working depth)."""

    def __init__(self, clip: float = 2.0, grid: int = 8) -> None:
        super().__init__()
        self.clip, self.grid = clip, grid

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        import cv2

        clahe = cv2.createCLAHE(clipLimit=self.clip, tileGridSize=(self.grid, self.grid))
        a = (img.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        out = np.stack([clahe.apply(np.ascontiguousarray(c)) for c in a])
        return torch.from_numpy(out).float().div(255)


def to_three_channels(img: torch.Tensor) -> torch.Tensor:
    if img.shape[0] == 1:
        return img.expand(3, -1, -1)
    if img.shape[0] == 3:
        return img
    raise ValueError(f"expected 1 or 3 channels, got {img.shape[0]}")


def array_to_tensor(a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] == 4:
        t = t[:3]
    scale = float(np.iinfo(a.dtype).max) if np.issubdtype(a.dtype, np.integer) else 1.0
    return t.float() / scale
