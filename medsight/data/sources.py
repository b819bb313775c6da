"""The data model every reader produces, and the splitting that completes it into train / val / test.

Every source (read by :mod:`medsight.data.readers`, one reader per format) becomes the same thing: file
paths or in-memory images with integer labels (N×K for multi-label data) and class names, in splits.
A source without its own split is split here: stratified by label, patients whole where they are known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from medsight.data.multilabel import multilabel_split
from medsight.data.splits import stratified_group_fold
from medsight.errors import MedsightError

if TYPE_CHECKING:
    from medsight.config import DataConfig

__all__ = ["DataError", "SplitData", "DataBundle", "label_policy", "label_counts", "DEFAULT_CLASSES",
           "ROTATION_CLASSES", "rotation_pretext", "SPLITS", "stratified_split", "complete_splits"]

#: Class names of the embedded PneumoniaMNIST default, in label order.
DEFAULT_CLASSES = ["normal", "pneumonia"]
SPLITS = ("train", "val", "test")


class DataError(MedsightError, ValueError):
    """Data that cannot be used: missing path, unknown format, empty class, bad manifest."""


@dataclass
class SplitData:
    """One split: either file paths or an in-memory uint8 array (N, H, W[, C]), plus integer labels."""

    labels: np.ndarray
    paths: list[str] | None = None
    images: np.ndarray | None = None
    groups: list[str] | None = None
    quarter_turns: np.ndarray | None = None  # rotation pretext: turn image i by 90° x this before its transform
    meta: dict[str, list[str]] | None = None  # CSV manifests: the other columns (sex, age, site, ...) per image
    prepared: dict[str, Any] | None = None  # images from a prepared cache: the preprocessing they went through

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> SplitData:
        return SplitData(
            labels=self.labels[idx],
            paths=[self.paths[i] for i in idx] if self.paths is not None else None,
            images=self.images[idx] if self.images is not None else None,
            groups=[self.groups[i] for i in idx] if self.groups is not None else None,
            quarter_turns=self.quarter_turns[idx] if self.quarter_turns is not None else None,
            meta={k: [v[i] for i in idx] for k, v in self.meta.items()} if self.meta else None,
            prepared=self.prepared,
        )

    def describe(self, i: int) -> str:
        return self.paths[i] if self.paths is not None else f"#{i}"


def label_counts(labels: np.ndarray, k: int) -> list[int]:
    """Images per class of (N,) labels, or positive images per finding of (N, K) multi-label labels."""
    y = np.asarray(labels)
    if y.ndim == 2:
        return (y == 1).sum(0).astype(int).tolist()
    return np.bincount(y.astype(np.int64), minlength=k).tolist()


@dataclass
class DataBundle:
    classes: list[str]
    splits: dict[str, SplitData]
    source: str
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files the source names that were left out, with the reason

    @property
    def multilabel(self) -> bool:
        """Several findings per image: labels are (N, K) with 1, 0 and -1 (masked)."""
        return self.splits["train"].labels.ndim == 2

    def counts(self) -> dict[str, list[int]]:
        """Images per class, or for multi-label data positive images per finding."""
        return {name: label_counts(s.labels, len(self.classes)) for name, s in self.splits.items()}

    def summary(self) -> dict[str, Any]:
        """Provenance for a model card: source, classes, images per split and class (positives per finding for
        multi-label data), patients where known."""
        return {"source": self.source, "classes": list(self.classes), "counts": self.counts(),
                "images": {name: len(s) for name, s in self.splits.items()},
                "patients": {name: len(set(s.groups)) if s.groups else None for name, s in self.splits.items()},
                "notes": list(self.notes), "skipped_files": list(self.skipped)}


# ---------------------------------------------------------------------------------------------- splits

def stratified_split(data: SplitData, fraction: float, seed: int) -> tuple[SplitData, SplitData]:
    """Hold out ``fraction`` of ``data``, stratified by label; grouped by patient when groups are known."""
    from sklearn.model_selection import train_test_split

    if data.labels.ndim == 2:  # several findings per image: iterative stratification, patients whole
        if data.groups is not None and len(set(data.groups)) < 2:
            raise DataError(f"only {len(set(data.groups))} patient: too few for a patient-level split")
        keep, held = multilabel_split(data.labels, fraction, seed, data.groups)
        return data.subset(keep), data.subset(held)
    idx = np.arange(len(data))
    counts = np.bincount(data.labels)
    if data.groups is not None:
        n_splits = max(2, round(1 / fraction))
        n_groups = len(set(data.groups))
        if n_groups < n_splits:
            raise DataError(f"only {n_groups} patients: too few for a patient-level split of {fraction:.0%}")
        held = stratified_group_fold(data.labels, data.groups, n_splits, seed) == 0  # StratifiedGroupKFold's
        return data.subset(idx[~held]), data.subset(idx[held])
    if counts[counts > 0].min() < 2:
        raise DataError("a class has fewer than 2 images: too few to split into train/val/test")
    n_held = max(len(counts), math.ceil(fraction * len(idx) - 1e-9))  # 0.1 / 0.85 * 170 is 20.000000000000004
    keep, held = train_test_split(idx, test_size=n_held, stratify=data.labels, random_state=seed)
    return data.subset(np.sort(keep)), data.subset(np.sort(held))


def complete_splits(splits: dict[str, SplitData], cfg: DataConfig, notes: list[str]) -> dict[str, SplitData]:
    if "all" in splits:
        rest, test = stratified_split(splits["all"], cfg.test_fraction, cfg.split_seed)
        train, val = stratified_split(rest, cfg.val_fraction / (1 - cfg.test_fraction), cfg.split_seed)
        notes.append(f"split {len(splits['all'])} images into train/val/test "
                     f"({1 - cfg.val_fraction - cfg.test_fraction:.0%}/{cfg.val_fraction:.0%}/{cfg.test_fraction:.0%}, "
                     f"stratified{', by patient' if splits['all'].groups else ''}, seed {cfg.split_seed})")
        return {"train": train, "val": val, "test": test}
    if "train" not in splits:
        raise DataError("the data has val/test splits but no train split")
    out = dict(splits)
    if "test" not in out:
        out["train"], out["test"] = stratified_split(out["train"], cfg.test_fraction, cfg.split_seed)
        notes.append(f"held out {cfg.test_fraction:.0%} of train as test (stratified, seed {cfg.split_seed})")
    if "val" not in out:
        out["train"], out["val"] = stratified_split(out["train"], cfg.val_fraction, cfg.split_seed)
        notes.append(f"held out {cfg.val_fraction:.0%} of train as val (stratified, seed {cfg.split_seed})")
    return out


#: Class names of the rotation pretext, in label order.
ROTATION_CLASSES = ["0deg", "90deg", "180deg", "270deg"]


def rotation_pretext(splits: dict[str, SplitData], seed: int) -> dict[str, SplitData]:
    """Self-supervised rotation prediction (Gidaris, Singh, Komodakis, ICLR 2018): the label of an image is
    how many quarter turns it was given. The training split holds every image in all four turns (an epoch
    is four passes over the images); val and test give each image one turn drawn with ``seed``. The class
    labels of the data are ignored, so unlabelled images pretrain a backbone for ``--weights``.

    Written here because the pretext is four lines of data plumbing; self-supervised libraries bring
    their own trainers, which would bypass medsight's loop (SAM, DDP, checkpoints).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, split in splits.items():
        n = len(split)
        if name == "train":
            rotated = split.subset(np.tile(np.arange(n), 4))
            turns = np.repeat(np.arange(4), n)
        else:
            rotated, turns = split.subset(np.arange(n)), rng.integers(0, 4, n)
        rotated.quarter_turns, rotated.labels = turns, turns.copy()
        out[name] = rotated
    return out


def label_policy(cfg: DataConfig) -> dict[str, Any]:
    """The multi-label policies for uncertain and blank labels of a data config (see ``apply_label_policy``)."""
    return {"uncertain": getattr(cfg, "uncertain", "ignore"), "blank": getattr(cfg, "blank", "ignore"),
            "uncertain_per_finding": getattr(cfg, "uncertain_per_finding", None)}
