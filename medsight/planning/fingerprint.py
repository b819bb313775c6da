"""A data set's fingerprint: what the plan is derived from (nnU-Net's idea, Isensee et al. 2021).

Counts per split and class, the task kind the labels imply, the source images' size, shape and
channels (read from file headers or array shapes, never by decoding every image), and the class
imbalance. Deterministic: the same data gives the same fingerprint on any machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medsight.data.sources import DataBundle, SplitData

__all__ = ["Fingerprint", "fingerprint"]

#: Files whose headers are read for sizes (a fixed, evenly spaced sample of the training split).
SAMPLE = 64


@dataclass(frozen=True)
class Fingerprint:
    source: str
    task: str
    classes: list[str]
    counts: dict[str, list[int]]  # split -> images per class
    n_train: int
    image_side: int  # median shorter side of the source images, in pixels
    aspect: float  # median width / height
    channels: int  # 1 (grayscale) or 3 (colour), the most common
    mixed: bool  # sizes or channel counts differ between images
    imbalance: float  # largest / smallest training class
    sampled: int  # images whose size was read
    prepared: dict[str, Any] | None = None  # a prepared cache's preprocessing (size, resize, ...), which a plan keeps

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _header_size(path: str) -> tuple[int, int, int] | None:
    """(height, width, channels) from a file's header, without decoding its pixels."""
    try:
        if path.lower().endswith((".dcm", ".dicom")):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns), int(getattr(ds, "SamplesPerPixel", 1) or 1)
        from PIL import Image

        with Image.open(path) as img:
            return img.height, img.width, 1 if img.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F", "1", "LA") else 3
    except Exception:  # noqa: BLE001 - an unreadable file is skipped here as it is in training
        return None


def _sizes(split: SplitData) -> list[tuple[int, int, int]]:
    """Image sizes of (a sample of) ``split``: a prepared cache's from its source files where they are at hand
    (the cache holds them resized already)."""
    found: list[tuple[int, int, int]] = []
    if split.paths is not None and (split.images is None or split.prepared is not None):
        idx = np.linspace(0, len(split) - 1, min(len(split), SAMPLE)).round().astype(int)
        found = [s for i in sorted(set(idx.tolist())) if (s := _header_size(split.paths[i])) is not None]
    if not found and split.images is not None:
        shape = split.images.shape
        return [(shape[1], shape[2], shape[3] if len(shape) == 4 else 1)] * min(len(split), SAMPLE)
    return found


def fingerprint(bundle: DataBundle, task_kind: str) -> Fingerprint:
    """The fingerprint of a loaded data set (``task_kind`` as the task resolved it)."""
    train = bundle.splits["train"]
    sizes = _sizes(train)
    if sizes:
        hs, ws, cs = (np.array(v) for v in zip(*sizes))
        side, aspect = int(np.median(np.minimum(hs, ws))), float(np.median(ws / hs))
        channels = 3 if (cs == 3).sum() * 2 > len(cs) else 1
        mixed = len(set(zip(hs.tolist(), ws.tolist()))) > 1 or len(set(cs.tolist())) > 1
    else:
        side, aspect, channels, mixed = 0, 1.0, 3, False
    counts = bundle.counts()
    present = [c for c in counts["train"] if c > 0]
    return Fingerprint(source=bundle.source, task=task_kind, classes=list(bundle.classes), counts=counts,
                       n_train=len(train), image_side=side, aspect=round(aspect, 3), channels=channels, mixed=mixed,
                       imbalance=round(max(present) / min(present), 3) if present else 1.0, sampled=len(sizes),
                       prepared=dict(train.prepared) if train.prepared else None)
