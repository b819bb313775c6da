"""A split as a torch Dataset: unreadable files are skipped (and named), never fatal to an epoch."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from medsight.data.imageio import ImageReadError, read_image
from medsight.data.sources import DataError, SplitData
from medsight.data.transforms import array_to_tensor, to_three_channels, view_settings

__all__ = ["ImageDataset", "make_loader", "label_tensor"]

log = logging.getLogger(__name__)


def _decode_size(transform: Any) -> int | None:
    """Twice the input size of a transform built by ``make_transform`` (None for another transform)."""
    try:
        return 2 * int(view_settings(transform)["size"])
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


class ImageDataset(Dataset):
    """Samples of one split as (tensor, label); an unreadable file yields ``(None, path)`` instead.

    Files are decoded at a reduced size that keeps at least twice the transform's input size on each side
    (``reduce=False``: at full size; see ``medsight.data.imageio``). Images of a prepared cache already went
    through the transform's geometric step: the rest of it is applied, after checking that the cache's
    preprocessing is the transform's.
    """

    def __init__(self, data: SplitData, transform: v2.Compose, reduce: bool = True) -> None:
        self.data = data
        self.transform = transform
        self.reduce_to = _decode_size(transform) if reduce else None
        self._apply = transform
        if data.prepared is not None:
            view = view_settings(transform)
            diffs = [f"{k}: cache {data.prepared.get(k)!r}, transform {v!r}" for k, v in view.items()
                     if data.prepared.get(k) != v]
            if diffs:
                raise DataError(f"these images were prepared with other preprocessing than the model uses "
                                f"({'; '.join(diffs)}); prepare a cache with the model's settings")
            rest = transform.transforms[1:]
            self._apply = v2.Compose(rest) if rest else v2.Identity()

    def __len__(self) -> int:
        return len(self.data)

    def load(self, i: int) -> torch.Tensor:
        """The i-th image as float [3, H, W] in [0, 1], before resizing and normalization."""
        if self.data.images is not None:
            img = to_three_channels(array_to_tensor(self.data.images[i]))
        else:
            img = to_three_channels(read_image(self.data.paths[i], self.reduce_to))
        if not torch.isfinite(img).all():  # broken input, not a learning-rate problem: skip it, by name
            raise ImageReadError(f"{self.data.describe(i)}: NaN or infinite pixel values")
        if self.data.quarter_turns is not None:
            img = torch.rot90(img, int(self.data.quarter_turns[i]), dims=(1, 2))
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int | str]:
        try:
            img = self.load(i)
        except ImageReadError as exc:
            log.warning("skipping unreadable image %s: %s", self.data.describe(i), exc)
            return None, self.data.describe(i)
        y = self.data.labels[i]
        return self._apply(img), (y if self.data.labels.ndim == 2 else int(y))  # multi-label: a row of K


def _collate(batch: list[tuple[torch.Tensor | None, Any]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    good = [(x, y) for x, y in batch if x is not None]
    bad = [y for x, y in batch if x is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    xs, ys = zip(*good)
    return torch.stack(xs), label_tensor(ys), bad


def label_tensor(ys: Any) -> torch.Tensor:
    """Labels of a batch: class numbers (long), or multi-label rows (float, -1 = masked)."""
    if len(ys) and isinstance(ys[0], np.ndarray):
        return torch.from_numpy(np.stack(ys).astype(np.float32))
    return torch.tensor(ys, dtype=torch.long)


def make_loader(dataset: ImageDataset, batch_size: int, shuffle: bool, num_workers: int,
                seed: int = 0, sampler: Any = None, drop_last: bool = False) -> DataLoader:
    """A loader whose batches are ``(images, labels, skipped_paths)``."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=_collate, generator=g,
                      persistent_workers=num_workers > 0, drop_last=drop_last,
                      pin_memory=num_workers > 0 and torch.cuda.is_available())
