"""Image tensors: 3 channels, resize, optional CLAHE, augmentation, and the model's normalization."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchvision.transforms import v2

from medsight.config import AutoAugment, choices

if TYPE_CHECKING:
    from medsight.config import DataConfig

__all__ = ["make_transform", "Clahe", "to_three_channels", "array_to_tensor", "AUTO_AUGMENT_POLICIES"]

#: data.auto_augment name -> torchvision policy (the names are config.AutoAugment's)
AUTO_AUGMENT_POLICIES: dict[str, type[torch.nn.Module]] = {
    "randaugment": v2.RandAugment, "autoaugment": v2.AutoAugment, "trivialaugment": v2.TrivialAugmentWide}
assert ("none", *AUTO_AUGMENT_POLICIES) == choices(AutoAugment), "config.AutoAugment and the policies disagree"


def make_transform(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                   cfg: DataConfig | None = None) -> v2.Compose:
    """Float [C,H,W] in [0,1] -> 3-channel, resized, (augmented), normalized tensor."""
    steps: list[Any] = [v2.Resize((image_size, image_size), antialias=True)]
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
