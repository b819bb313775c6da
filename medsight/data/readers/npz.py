"""A MedMNIST-style .npz: ``{split}_images`` / ``{split}_labels`` (or ``images`` / ``labels``) and optional
``class_names``; N×K 0/1 labels are multi-label (ChestMNIST). Arrays are checked before use: pixel types,
shapes, integer labels; float images of 0-255 are rescaled to [0, 1] and said."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from medsight.data.sources import SPLITS, DataError, SplitData

__all__ = ["read_npz"]

log = logging.getLogger(__name__)


def _npz_array(arrays: Any, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(arrays[key])
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{path}: '{key}' holds Python objects, not numbers or text; medsight reads plain "
                            f"arrays only") from None
        raise DataError(f"{path}: cannot read '{key}': {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged archive member
        raise DataError(f"{path}: cannot read '{key}' ({type(exc).__name__}); the archive is damaged") from None


def _npz_multilabels(a: np.ndarray, key: str, path: Path) -> np.ndarray:
    """N×K labels, one column per finding (ChestMNIST): 1, 0, and -1 or NaN (uncertain, blank) as raw labels."""
    if a.dtype.kind not in "uifb":
        raise DataError(f"{path}: {key} has shape {a.shape} (one column per finding) but holds {a.dtype} values; "
                        f"a finding label is 1, 0 or -1 (uncertain)")
    f = a.astype(np.float32)
    bad = np.argwhere(~np.isnan(f) & ~np.isin(f, (0.0, 1.0, -1.0)))
    if len(bad):
        i, k = bad[0]
        raise DataError(f"{path}: {key}[{i}, {k}] is {a[i, k]!s}; multi-label labels (N×K, one column per finding) "
                        f"are 1, 0 or -1 (uncertain)")
    return f


def _npz_labels(a: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Integer class numbers from a labels array: integer-valued floats are fine; anything else is refused.
    An N×K array (K > 1) is multi-label: one 0/1 column per finding."""
    if a.ndim == 2 and a.shape[1] > 1:
        return _npz_multilabels(a, key, path)
    a = a.reshape(-1)
    if a.dtype.kind not in "uifb":
        raise DataError(f"{path}: {key} must hold class numbers 0..K-1, got {a.dtype} values "
                        f"(e.g. {a[:3].tolist()}); put names in a 'class_names' array")
    if a.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(a) | (a != np.round(a)))
        if len(bad):
            raise DataError(f"{path}: {key} holds non-integer values (e.g. {a[bad[0]]!s} at index {bad[0]}); "
                            f"labels are class numbers 0..K-1")
    if len(a) and a.min() < 0:
        i = int(np.argmin(a))
        raise DataError(f"{path}: {key} holds negative labels (e.g. {a[i]!s} at index {i}); labels are class "
                        f"numbers 0..K-1")
    return a.astype(np.int64)


def _npz_images(a: np.ndarray, key: str, path: Path, notes: list[str]) -> np.ndarray:
    if a.dtype.kind not in "uif":
        what = {"U": "text", "S": "bytes", "O": "Python objects", "b": "booleans"}.get(a.dtype.kind, str(a.dtype))
        raise DataError(f"{path}: {key} holds {what} ({a.dtype}), not pixel values")
    if a.ndim not in (3, 4):
        raise DataError(f"{path}: {key} must be (N, H, W) or (N, H, W, C), got shape {a.shape}")
    if a.ndim == 4 and a.shape[-1] not in (1, 3, 4):
        raise DataError(f"{path}: {key} has {a.shape[-1]} channels (last axis of {a.shape}); expected 1, 3 or 4")
    if a.dtype.kind in "ui" and a.dtype not in (np.uint8, np.uint16) and a.size:
        lo, hi = int(a.min()), int(a.max())
        for depth in (np.uint8, np.uint16):
            if lo >= 0 and hi <= np.iinfo(depth).max:
                notes.append(f"{key}: {a.dtype} pixels within 0..{np.iinfo(depth).max}, read as {np.dtype(depth).name}")
                return a.astype(depth)
        raise DataError(f"{path}: {key} holds {a.dtype} pixels from {lo} to {hi}; store uint8 or uint16 pixels, "
                        f"or floats in [0, 1]")
    return a


def _rescale_float_images(splits: dict[str, SplitData], path: Path, notes: list[str]) -> None:
    """Float images belong in [0, 1]; floats of 0-255 (8-bit values saved as float) are divided by 255."""
    floats = [s for s in splits.values() if s.images is not None and s.images.dtype.kind == "f" and s.images.size]
    if not floats:
        return
    with np.errstate(invalid="ignore"):
        hi = max(float(np.nanmax(s.images)) if np.isfinite(s.images).any() else 0.0 for s in floats)
    if 1.0 < hi <= 255.0:
        for s in floats:
            s.images = (s.images / np.float32(255)).astype(np.float32)
        msg = f"float images range up to {hi:g}: read as 8-bit values and divided by 255"
        log.warning("%s: %s", path, msg)
        notes.append(msg)
    elif hi > 255.0:
        log.warning("%s: float images range up to %g; medsight expects floats in [0, 1] (or integer pixels), so "
                    "normalize them before training", path, hi)


def read_npz(path: Path, notes: list[str]) -> tuple[dict[str, SplitData], list[str]]:
    """MedMNIST-style arrays: ``{split}_images`` / ``{split}_labels`` (or ``images`` / ``labels``), with class
    names from ``class_names`` (or ``classes``) when present."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not an .npz archive (not a zip of arrays); expected train_images, "
                        f"train_labels, ... as written by numpy.savez")
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is unusable
        raise DataError(f"cannot read {path} as an .npz archive ({type(exc).__name__})") from None
    with arrays:
        splits: dict[str, SplitData] = {}
        prefixes = [f"{s}_" for s in SPLITS if f"{s}_images" in arrays.files]
        if not prefixes and "images" in arrays.files:
            prefixes = [""]
        if not prefixes:
            raise DataError(f"{path} has none of the keys train_images/val_images/test_images or images; "
                            f"found {', '.join(arrays.files) or 'nothing'}")
        for prefix in prefixes:
            s = prefix.rstrip("_") or "all"
            if f"{prefix}labels" not in arrays.files:
                raise DataError(f"{path} has {prefix}images but no {prefix}labels")
            images = _npz_images(_npz_array(arrays, f"{prefix}images", path), f"{prefix}images", path, notes)
            labels = _npz_labels(_npz_array(arrays, f"{prefix}labels", path), f"{prefix}labels", path)
            if len(images) != len(labels):
                raise DataError(f"{path}: {prefix}images has {len(images)} images but {prefix}labels has {len(labels)}")
            if not len(labels):
                if s in ("train", "all"):
                    raise DataError(f"{path}: the {'training' if s == 'train' else ''} split is empty "
                                    f"({prefix}images holds no images)".replace("  ", " "))
                notes.append(f"{prefix}images is empty: ignored, {s} is carved from train instead")
                continue
            splits[s] = SplitData(labels=labels, images=images)
        key = next((k for k in ("class_names", "classes") if k in arrays.files), None)
        names = _npz_array(arrays, key, path).reshape(-1) if key else None
    _rescale_float_images(splits, path, notes)
    shapes = {s: d.labels.shape[1] if d.labels.ndim == 2 else 1 for s, d in splits.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{s}_labels {len(splits[s])}×{k}" for s, k in shapes.items())
        raise DataError(f"{path}: the splits disagree on the labels' shape ({listed}); multi-label data has one "
                        f"column per finding in every split, single-label data one class number per image")
    multi = next(iter(splits.values())).labels.ndim == 2
    k = next(iter(shapes.values())) if multi else int(max(s.labels.max() for s in splits.values())) + 1
    if names is None:
        return splits, [str(i) for i in range(k)]
    classes = [str(c).strip() for c in names.tolist()]
    if multi and len(classes) != k:
        raise DataError(f"{path}: {key} has {len(classes)} names but the labels have {k} finding columns")
    if len(classes) < k:
        raise DataError(f"{path}: {key} has {len(classes)} names but the labels go up to {k - 1}")
    if "" in classes or len(set(classes)) != len(classes):
        raise DataError(f"{path}: {key} must be distinct, non-empty names; got {', '.join(classes)}")
    return splits, classes
