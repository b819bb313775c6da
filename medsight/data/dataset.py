"""A split as a torch Dataset: unreadable files are skipped (and named), never fatal to an epoch."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from medsight.data.imageio import ImageReadError, read_image
from medsight.data.sources import DataError, SplitData
from medsight.data.transforms import array_to_tensor, to_three_channels, view_settings

__all__ = ["ImageDataset", "make_loader", "label_tensor"]

log = logging.getLogger(__name__)


#: augmentation steps that give the same kind of result on an 8-bit Pillow image as on a float tensor, and
#: run several times faster there (Pillow's affine warp is C on uint8; torchvision's tensor affine builds a
#: float sampling grid): a prepared cache's images are uint8 already, so these run before any float conversion.
#: ToDtype passes a Pillow image through (the auto-augment policies are wrapped in it for tensors).
_UINT8_SAFE = (v2.RandomHorizontalFlip, v2.RandomVerticalFlip, v2.RandomAffine, v2.RandomRotation,
               v2.RandomResizedCrop, v2.ColorJitter, v2.ToDtype, v2.RandAugment, v2.AutoAugment, v2.TrivialAugmentWide)


def _uint8_prefix(steps: list[Any]) -> int:
    """How many of ``steps``, from the first, can run on an 8-bit image (see ``_UINT8_SAFE``)."""
    k = 0
    while k < len(steps) and type(steps[k]) in _UINT8_SAFE:
        k += 1
    return k


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
    preprocessing is the transform's; its leading augmentation steps (flips, rotation, affine, crops, colour
    jitter, auto-augment) run on the 8-bit image before it becomes float, several times faster.
    """

    def __init__(self, data: SplitData, transform: v2.Compose, reduce: bool = True) -> None:
        self.data = data
        self.transform = transform
        self.reduce_to = _decode_size(transform) if reduce else None
        self._apply = transform
        self._uint8_steps: v2.Compose | None = None
        if data.prepared is not None:
            view = view_settings(transform)
            diffs = [f"{k}: cache {data.prepared.get(k)!r}, transform {v!r}" for k, v in view.items()
                     if data.prepared.get(k) != v]
            if diffs:
                raise DataError(f"these images were prepared with other preprocessing than the model uses "
                                f"({'; '.join(diffs)}); prepare a cache with the model's settings")
            rest = transform.transforms[1:]
            k = _uint8_prefix(rest) if data.images is not None and data.images.dtype == np.uint8 else 0
            self._uint8_steps = v2.Compose(rest[:k]) if k else None
            rest = rest[k:]
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

    def _load_augmented_uint8(self, i: int) -> torch.Tensor:
        """A cached uint8 image through the leading augmentation steps as a Pillow image, then as float."""
        a = np.asarray(self.data.images[i])
        if self.data.quarter_turns is not None:
            a = np.rot90(a, int(self.data.quarter_turns[i]), axes=(0, 1))  # as load()'s torch.rot90 on [C, H, W]
        a = np.ascontiguousarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a)
        out = self._uint8_steps(Image.fromarray(a))
        return to_three_channels(array_to_tensor(np.array(out)))  # a writable copy for torch

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int | str]:
        try:
            img = self._load_augmented_uint8(i) if self._uint8_steps is not None else self.load(i)
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
                seed: int = 0, sampler: Any = None, drop_last: bool = False, pin_memory: bool | None = None,
                prefetch_factor: int | None = None) -> DataLoader:
    """A loader whose batches are ``(images, labels, skipped_paths)``; ``pin_memory`` None: pinned when workers
    load for a CUDA machine (``medsight.data.loader.loader_settings`` chooses both for a run)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, collate_fn=_collate, generator=g,
                      persistent_workers=num_workers > 0, drop_last=drop_last,
                      pin_memory=num_workers > 0 and torch.cuda.is_available() if pin_memory is None else pin_memory,
                      prefetch_factor=prefetch_factor if num_workers > 0 else None)
