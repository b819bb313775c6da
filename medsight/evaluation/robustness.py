"""Robustness to image corruptions: the test metric under Gaussian noise, blur, contrast and brightness
shifts, JPEG compression and resolution loss, each at three severities, in the spirit of ImageNet-C
(Hendrycks & Dietterich 2019) and MedMNIST-C (Di Salvo et al. 2024).

The corruption acts on the image as read (float [3, H, W] in [0, 1], before resizing and normalization), as a
worse scanner or a re-compressed export would. The corruptions are a few lines each on torchvision's
functional ops; the MedMNIST-C package is tied to its own data loaders and ImageNet-C's to PIL and
ImageNet sizes.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from medsight.config import CorruptionName, choices
from medsight.data import ImageDataset, make_loader
from medsight.data.imageio import ImageReadError
from medsight.data.sources import SplitData
from medsight.errors import UsageError
from medsight.inference.predictor import predict_loader
from medsight.tasks import Task

__all__ = ["CORRUPTIONS", "Corruption", "CorruptedImages", "corrupt", "robustness"]


def _noise(x: torch.Tensor, s: float, g: torch.Generator) -> torch.Tensor:
    return x + torch.randn(x.shape, generator=g) * s


def _blur(x: torch.Tensor, s: float, g: torch.Generator) -> torch.Tensor:
    sigma = s * max(x.shape[-2:]) / 64  # in pixels of a 64-px image, whatever the source size
    k = 2 * int(np.ceil(3 * sigma)) + 1
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


def _contrast(x: torch.Tensor, s: float, g: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    return mean + (x - mean) * s


def _brightness(x: torch.Tensor, s: float, g: torch.Generator) -> torch.Tensor:
    return x + s


def _jpeg(x: torch.Tensor, s: float, g: torch.Generator) -> torch.Tensor:
    from PIL import Image

    arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(s))
    buf.seek(0)
    back = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(back).permute(2, 0, 1).contiguous()


def _resolution(x: torch.Tensor, s: float, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = TF.resize(x, [max(1, round(h / s)), max(1, round(w / s))], antialias=True)
    return TF.resize(small, [h, w], antialias=False)


#: name -> (function, severities 1..3). Severities: noise σ; blur σ (px at 64 px); contrast factor; brightness
#: shift; JPEG quality; down-sampling factor.
CORRUPTIONS: dict[str, tuple[Callable[[torch.Tensor, float, torch.Generator], torch.Tensor], tuple[float, ...]]] = {
    "gaussian_noise": (_noise, (0.04, 0.08, 0.16)),
    "blur": (_blur, (0.6, 1.2, 2.4)),
    "contrast": (_contrast, (0.7, 0.5, 0.3)),
    "brightness": (_brightness, (0.1, 0.2, 0.35)),
    "jpeg": (_jpeg, (40, 20, 8)),
    "resolution": (_resolution, (2, 3, 4)),
}

# every name the config and the CLI offer has an implementation, in the same order
assert tuple(CORRUPTIONS) == choices(CorruptionName), "medsight.config.CorruptionName and CORRUPTIONS disagree"


def corrupt(img: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``img`` (float [3, H, W] in [0, 1]) under corruption ``name`` at ``severity`` 1..3, clipped to [0, 1]."""
    if name not in CORRUPTIONS:
        raise UsageError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    fn, levels = CORRUPTIONS[name]
    if not 1 <= severity <= len(levels):
        raise UsageError(f"severity must be 1..{len(levels)}, got {severity}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return fn(img.float(), float(levels[severity - 1]), g).clamp(0, 1)


class Corruption(nn.Module):
    """A corruption as the first step of a transform (noise drawn from its own seeded generator)."""

    def __init__(self, name: str, severity: int, seed: int = 0) -> None:
        super().__init__()
        self.name, self.severity = name, severity
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return corrupt(img, self.name, self.severity, self.generator)


def _score(task: Task, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    m = task.epoch_metrics(labels, probs)
    return {"auc": m.get("auc"), "accuracy": m.get("accuracy")}


class CorruptedImages(torch.utils.data.Dataset):
    """``ds``'s images under one corruption, before the rest of its transform; the noise of image i is drawn
    from a generator seeded by (seed, i), so an image gets the same picture whatever the batch size, order or
    number of loader workers."""

    def __init__(self, ds: ImageDataset, name: str, severity: int, seed: int = 0) -> None:
        self.ds, self.name, self.severity, self.seed = ds, name, severity, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, Any]:
        try:
            img = self.ds.load(i)  # as read (a prepared cache's: already framed, as the data set's transform skips)
        except ImageReadError:
            return None, self.ds.data.describe(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        y = self.ds.data.labels[i]
        # ds._apply: the transform's steps after what ds.load gives (the whole transform for files and arrays)
        return self.ds._apply(corrupt(img, self.name, self.severity, g)), (y if y.ndim else int(y))


def robustness(model: nn.Module, task: Task, split: SplitData, transform: Any, device: torch.device, *,
               corruptions: list[str] | None = None, severities: tuple[int, ...] = (1, 2, 3), metric: str = "auc",
               batch_size: int = 128, seed: int = 0, num_workers: int = 0) -> dict[str, Any]:
    """The task's AUC and accuracy on ``split`` clean and under each corruption × severity, the drop of
    ``metric`` from clean for each, and the mean drop over all of them. ``num_workers`` loader processes
    corrupt the images (the result does not depend on it)."""
    clean_ds = ImageDataset(split, transform)

    def run(ds: Any) -> dict[str, float | None]:
        loader = make_loader(ds, batch_size, False, num_workers)
        probs, labels, _, _ = predict_loader(model, loader, device, task)
        return _score(task, labels, probs)

    clean = run(clean_ds)
    if clean[metric] is None:
        raise UsageError(f"the {metric} of the clean images is undefined (one class only): robustness needs both")
    out: dict[str, Any] = {"metric": metric, "clean": clean[metric], "clean_scores": clean, "corruptions": {},
                           "n": len(split)}
    drops = []
    for name in corruptions or list(CORRUPTIONS):
        rows = []
        for sev in severities:
            scores = run(CorruptedImages(clean_ds, name, sev, seed))
            drop = None if scores[metric] is None else float(clean[metric] - scores[metric])
            rows.append({"severity": sev, "level": CORRUPTIONS[name][1][sev - 1], **scores, "drop": drop})
            if drop is not None:
                drops.append(drop)
        out["corruptions"][name] = rows
    out["mean_drop"] = float(np.mean(drops)) if drops else None
    return out
