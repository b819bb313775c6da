"""Test-time augmentation: the same image seen a few ways (flip, small rotations, a small zoom), whose
predictions are averaged — and whose disagreement is an uncertainty score for selective prediction.

The views are mild on purpose: a medical image turned by 90° or mirrored top to bottom is no longer the
kind of image the model was trained on. They act on the normalized batch, so every predictor shares them.
"""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as TF

__all__ = ["TTA_VIEWS", "tta_views"]

#: (name, horizontal flip, rotation in degrees, scale): the first view is the plain image.
TTA_VIEWS: tuple[tuple[str, bool, float, float], ...] = (
    ("identity", False, 0.0, 1.0),
    ("hflip", True, 0.0, 1.0),
    ("rotate +5°", False, 5.0, 1.0),
    ("rotate -5°", False, -5.0, 1.0),
    ("zoom 1.1", False, 0.0, 1.1),
)


def tta_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The views of a normalized batch (N, C, H, W); areas uncovered by a rotation are 0, the mean colour."""
    out = []
    for _, flip, degrees, scale in TTA_VIEWS:
        v = TF.horizontal_flip(x) if flip else x
        if degrees or scale != 1.0:
            v = TF.affine(v, angle=degrees, translate=[0, 0], scale=scale, shear=[0.0, 0.0])
        out.append(v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v)
    return out
