"""Loaders that keep a GPU fed: settings chosen from the machine, and a prepared cache read a batch at a time
with its augmentation done on the device.

A prepared cache (``medsight.data.cache``) already holds every image at the input size, as uint8. Reading it
one image at a time costs Python work per image (index, Pillow, torchvision) in the loader workers; here a
batch of indices becomes one sorted read from the memory-mapped array (``__getitems__``, which DataLoader
calls with the whole batch), and the batch goes to the device as uint8 — a quarter of float's bytes — where
it becomes float, is flipped and rotated, normalized and laid out channels-last in a few batched kernels.
The random draws (which images flip, by how much each turns) are made in the loader with torch's random
number generator, so a run's augmentation follows its seed and its loader's state as before.

torchvision's v2 transforms apply one draw to a whole batch; per-image draws on a batch are what this
module adds (flip masks and an affine grid per image), in a few lines of ``torch.nn.functional``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from medsight.data.cache import Rows
from medsight.data.dataset import ImageDataset, make_loader

__all__ = ["LoaderSettings", "loader_settings", "BatchAugment", "batch_augment_of", "CacheBatches", "DeviceLoader",
           "build_loader", "read_rows"]


@dataclass(frozen=True)
class LoaderSettings:
    """How a loader feeds its device (see :func:`loader_settings`)."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None
    non_blocking: bool
    channels_last: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def loader_settings(device: torch.device, num_workers: int | None = None, world_size: int = 1,
                    cores: int | None = None) -> LoaderSettings:
    """The loader settings for ``device``: on a GPU, one worker per core left over after the training process
    (at most 8, the cores divided among ``world_size`` processes), pinned memory and non-blocking copies (the
    copy of batch i+1 overlaps the step on batch i), persistent workers and 4 batches prefetched per worker;
    on a CPU no workers (the CPU's cores are the compute). ``num_workers`` overrides the worker count."""
    cuda = device.type == "cuda"
    if num_workers is None:
        cores = cores or os.cpu_count() or 1
        num_workers = min(8, max(0, cores // max(1, world_size) - 1)) if cuda else 0
    workers = num_workers > 0
    return LoaderSettings(num_workers=num_workers, pin_memory=cuda, persistent_workers=workers,
                          prefetch_factor=4 if workers else None, non_blocking=cuda, channels_last=True)


def read_rows(images: Any, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of an array, a memory map or :class:`~medsight.data.cache.Rows`, read in one pass in file
    order (a sorted fancy index: one sequential sweep over the file) and returned in ``idx``'s order."""
    base, pos = (images.base, images.index[idx]) if isinstance(images, Rows) else (images, np.asarray(idx))
    order = np.argsort(pos, kind="stable")
    out = np.empty((len(pos), *base.shape[1:]), dtype=base.dtype)
    out[order] = base[pos[order]]
    return out


class BatchAugment(torch.nn.Module):
    """The per-image random flips and rotation of a training transform, then its normalization, on a batch:
    uint8 (B, H, W[, C]) on any device -> float (B, 3, H, W), channels-last.

    ``params`` (from :meth:`draw`) hold each image's draws: horizontal and vertical flip (bool) and angle
    (degrees). The rotation samples the nearest pixel and fills with black, as torchvision's RandomAffine
    does by default on the per-image path.
    """

    def __init__(self, mean: list[float], std: list[float], hflip: float = 0.0, vflip: float = 0.0,
                 degrees: float = 0.0) -> None:
        super().__init__()
        self.mean, self.std = list(mean), list(std)
        self.hflip, self.vflip, self.degrees = hflip, vflip, degrees
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False)

    @property
    def random(self) -> bool:
        return bool(self.hflip or self.vflip or self.degrees)

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        """Each of ``n`` images' random draws, from torch's generator (the loader worker's, seeded per run)."""
        return {"hflip": torch.rand(n) < self.hflip, "vflip": torch.rand(n) < self.vflip,
                "angle": (torch.rand(n) * 2 - 1) * self.degrees}

    def forward(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(-1)
        x = x.permute(0, 3, 1, 2).float().div_(255)  # (B, C, H, W): a view of the channels-last bytes
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 4:
            x = x[:, :3]
        if params is not None:
            x = self._augment(x, {k: v.to(x.device, non_blocking=True) for k, v in params.items()})
        mean, std = self._mean.to(x.device), self._std.to(x.device)  # on the device already after .to(device)
        return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

    def _augment(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.hflip:
            x = torch.where(p["hflip"].view(-1, 1, 1, 1), x.flip(-1), x)
        if self.vflip:
            x = torch.where(p["vflip"].view(-1, 1, 1, 1), x.flip(-2), x)
        if self.degrees:
            # torchvision's RandomAffine turns the image by +angle (counter-clockwise): the grid samples the
            # source at the output's coordinates turned by -angle (square images: no aspect correction)
            a = p["angle"].float() * (math.pi / 180)
            cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return x


def batch_augment_of(dataset: ImageDataset) -> BatchAugment | None:
    """The :class:`BatchAugment` that does what ``dataset``'s transform does after its geometric step, or
    None where it cannot (images not from a prepared uint8 cache, quarter turns, or a step other than flips,
    a rotation without translation/scale/shear, and the final normalization)."""
    data = dataset.data
    if data.prepared is None or data.images is None or data.images.dtype != np.uint8 or data.quarter_turns is not None:
        return None
    steps = list(dataset.transform.transforms[1:])
    if not steps or not isinstance(steps[-1], v2.Normalize):
        return None
    kw: dict[str, float] = {}
    for s in steps[:-1]:
        if type(s) is v2.RandomHorizontalFlip and "hflip" not in kw:
            kw["hflip"] = float(s.p)
        elif type(s) is v2.RandomVerticalFlip and "vflip" not in kw:
            kw["vflip"] = float(s.p)
        elif (type(s) is v2.RandomAffine and "degrees" not in kw and s.translate in (None, (0.0, 0.0))
              and s.scale is None and s.shear is None and not s.center and s.fill in (0, {}, None)
              and abs(s.degrees[0]) == abs(s.degrees[1])):
            kw["degrees"] = float(s.degrees[1])
        else:
            return None
    return BatchAugment(steps[-1].mean, steps[-1].std, **kw)


class CacheBatches(Dataset):
    """A prepared cache's split served a batch at a time: ``__getitems__`` (DataLoader's batched fetch) reads
    the batch's rows in one pass and draws its augmentation; a batch is ``(uint8 images, labels, draws)``."""

    def __init__(self, dataset: ImageDataset, augment: BatchAugment) -> None:
        self.data, self.augment = dataset.data, augment

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
        idx = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(read_rows(self.data.images, idx))
        labels = self.data.labels[idx]
        y = torch.from_numpy(labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int64))
        return images, y, self.augment.draw(len(idx)) if self.augment.random else None

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])


def _whole(batch: Any) -> Any:
    return batch  # __getitems__ returned the batch whole


class DeviceLoader:
    """A DataLoader over :class:`CacheBatches` whose batches arrive on ``device`` as the model's input:
    ``(float images, labels, [])`` like every medsight loader's. Everything else (``len``, ``generator``,
    ``sampler``, ``dataset``) is the DataLoader's."""

    def __init__(self, loader: DataLoader, augment: BatchAugment, device: torch.device, non_blocking: bool) -> None:
        self.loader, self.augment, self.device, self.non_blocking = loader, augment, device, non_blocking

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        for images, y, params in self.loader:
            x = images.to(self.device, non_blocking=self.non_blocking)
            yield self.augment(x, params), y.to(self.device, non_blocking=self.non_blocking), []


def build_loader(dataset: ImageDataset, batch_size: int, shuffle: bool, settings: LoaderSettings,
                 device: torch.device, *, seed: int = 0, sampler: Any = None, drop_last: bool = False,
                 batched: bool = True) -> DataLoader | DeviceLoader:
    """The loader of ``dataset`` with ``settings``: a :class:`DeviceLoader` (batched cache reads, augmentation
    on ``device``) where the data is a prepared cache whose training augmentation it can do, else medsight's
    per-image loader (``make_loader``)."""
    augment = batch_augment_of(dataset) if batched else None
    if augment is None:
        return make_loader(dataset, batch_size, shuffle, settings.num_workers, seed=seed, sampler=sampler,
                           drop_last=drop_last, pin_memory=settings.pin_memory,
                           prefetch_factor=settings.prefetch_factor)
    g = torch.Generator()
    g.manual_seed(seed)
    loader = DataLoader(CacheBatches(dataset, augment), batch_size=batch_size, shuffle=shuffle and sampler is None,
                        sampler=sampler, num_workers=settings.num_workers, collate_fn=_whole, generator=g,
                        persistent_workers=settings.persistent_workers, drop_last=drop_last,
                        pin_memory=settings.pin_memory, prefetch_factor=settings.prefetch_factor)
    return DeviceLoader(loader, augment.to(device), device, settings.non_blocking)
