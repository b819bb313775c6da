"""Data in: a folder per class, a CSV manifest or a MedMNIST-style .npz, split without leaks.

Every source becomes the same thing: a list of samples (file paths or in-memory images) with integer
labels and class names, split into train / val / test. A new source format goes here, as one
``_from_*`` reader that ``_read_source`` dispatches to.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medsight.config import DEFAULT_DATA
from medsight.data.imageio import IMAGE_EXTS

if TYPE_CHECKING:
    from medsight.config import DataConfig

__all__ = ["DataError", "SplitData", "DataBundle", "load_data", "load_eval_data", "DEFAULT_CLASSES",
           "ROTATION_CLASSES", "rotation_pretext", "SPLITS"]

log = logging.getLogger(__name__)

#: Class names of the embedded PneumoniaMNIST default, in label order.
DEFAULT_CLASSES = ["normal", "pneumonia"]
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Data that cannot be used: missing path, unknown format, empty class, bad manifest."""


@dataclass
class SplitData:
    """One split: either file paths or an in-memory uint8 array (N, H, W[, C]), plus integer labels."""

    labels: np.ndarray
    paths: list[str] | None = None
    images: np.ndarray | None = None
    groups: list[str] | None = None
    quarter_turns: np.ndarray | None = None  # rotation pretext: turn image i by 90° x this before its transform

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> SplitData:
        return SplitData(
            labels=self.labels[idx],
            paths=[self.paths[i] for i in idx] if self.paths is not None else None,
            images=self.images[idx] if self.images is not None else None,
            groups=[self.groups[i] for i in idx] if self.groups is not None else None,
            quarter_turns=self.quarter_turns[idx] if self.quarter_turns is not None else None,
        )

    def describe(self, i: int) -> str:
        return self.paths[i] if self.paths is not None else f"#{i}"


@dataclass
class DataBundle:
    classes: list[str]
    splits: dict[str, SplitData]
    source: str
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, list[int]]:
        k = len(self.classes)
        return {name: np.bincount(s.labels, minlength=k).tolist() for name, s in self.splits.items()}


# --------------------------------------------------------------------------------------------- sources

def _labels_from_names(names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    classes = sorted(set(names), key=lambda c: (not c.lstrip("-").isdigit(), int(c) if c.lstrip("-").isdigit() else 0, c))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), classes


def _scan_class_folders(root: Path) -> tuple[list[str], list[str]]:
    paths: list[str] = []
    names: list[str] = []
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class folders (expected one sub-folder of images per class)")
    for d in class_dirs:
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DataError(f"class '{d.name}' in {root} has no images "
                            f"(looked for {', '.join(sorted(IMAGE_EXTS))})")
        paths += [str(p) for p in files]
        names += [d.name] * len(files)
    return paths, names


def _from_folder(root: Path) -> tuple[dict[str, SplitData], list[str]]:
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" in split_dirs:
        scanned = {s: _scan_class_folders(d) for s, d in split_dirs.items()}
        classes = sorted(set(scanned["train"][1]))
        for s, (_, names) in scanned.items():
            extra = sorted(set(names) - set(classes))
            if extra:
                raise DataError(f"split '{s}' of {root} has classes not in train: {', '.join(extra)}")
        index = {c: i for i, c in enumerate(classes)}
        splits = {s: SplitData(labels=np.array([index[n] for n in names], dtype=np.int64), paths=paths)
                  for s, (paths, names) in scanned.items()}
        return splits, classes
    paths, names = _scan_class_folders(root)
    labels, classes = _labels_from_names(names)
    return {"all": SplitData(labels=labels, paths=paths)}, classes


def _from_csv(path: Path) -> tuple[dict[str, SplitData], list[str]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        missing = {"path", "label"} - set(fields)
        if missing:
            raise DataError(f"CSV manifest {path} lacks column(s) {', '.join(sorted(missing))}; "
                            f"expected path,label[,patient_id][,split], found {', '.join(fields) or 'nothing'}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise DataError(f"CSV manifest {path} has no rows")
    base = path.parent
    paths = [str(p if (p := Path(r["path"])).is_absolute() else base / p) for r in rows]
    for i, r in enumerate(rows):
        if not r["label"]:
            raise DataError(f"CSV manifest {path}, row {i + 2}: empty label")
    labels, classes = _labels_from_names([r["label"] for r in rows])
    groups = [r["patient_id"] for r in rows] if "patient_id" in fields else None
    if groups is not None and any(g == "" for g in groups):
        raise DataError(f"CSV manifest {path}: patient_id is empty on some rows")
    data = SplitData(labels=labels, paths=paths, groups=groups)
    if "split" in fields and any(r["split"] for r in rows):
        names = [r["split"].lower() for r in rows]
        bad = sorted(set(names) - set(SPLITS))
        if bad:
            raise DataError(f"CSV manifest {path}: split must be train, val or test; found {', '.join(bad)}")
        splits = {s: data.subset(np.array([i for i, n in enumerate(names) if n == s], dtype=np.int64))
                  for s in SPLITS if s in names}
        if groups is not None:
            _check_no_group_leak(splits, path)
        return splits, classes
    return {"all": data}, classes


def _check_no_group_leak(splits: dict[str, SplitData], source: Path) -> None:
    seen: dict[str, str] = {}
    for name, s in splits.items():
        for g in set(s.groups or []):
            if g in seen and seen[g] != name:
                raise DataError(f"{source}: patient '{g}' appears in both '{seen[g]}' and '{name}' splits")
            seen[g] = name


def _from_npz(path: Path) -> tuple[dict[str, SplitData], list[str]]:
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is unusable
        raise DataError(f"cannot read {path} as an .npz archive: {exc}") from exc
    splits = {}
    for s in SPLITS:
        if f"{s}_images" in arrays:
            if f"{s}_labels" not in arrays:
                raise DataError(f"{path} has {s}_images but no {s}_labels")
            images = np.asarray(arrays[f"{s}_images"])
            labels = np.asarray(arrays[f"{s}_labels"]).reshape(-1).astype(np.int64)
            if len(images) != len(labels):
                raise DataError(f"{path}: {s}_images has {len(images)} images but {s}_labels has {len(labels)}")
            if images.ndim not in (3, 4):
                raise DataError(f"{path}: {s}_images must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
            splits[s] = SplitData(labels=labels, images=images)
    if not splits:
        if "images" in arrays and "labels" in arrays:
            splits["all"] = SplitData(labels=np.asarray(arrays["labels"]).reshape(-1).astype(np.int64),
                                      images=np.asarray(arrays["images"]))
        else:
            raise DataError(f"{path} has none of the keys train_images/val_images/test_images or images; "
                            f"found {', '.join(arrays.files)}")
    k = int(max(s.labels.max() for s in splits.values())) + 1
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else [str(i) for i in range(k)]
    return splits, classes


# ---------------------------------------------------------------------------------------------- splits

def _stratified_split(data: SplitData, fraction: float, seed: int) -> tuple[SplitData, SplitData]:
    """Hold out ``fraction`` of ``data``, stratified by label; grouped by patient when groups are known."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    idx = np.arange(len(data))
    counts = np.bincount(data.labels)
    if data.groups is not None:
        n_splits = max(2, round(1 / fraction))
        n_groups = len(set(data.groups))
        if n_groups < n_splits:
            raise DataError(f"only {n_groups} patients: too few for a patient-level split of {fraction:.0%}")
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        keep, held = next(sgkf.split(idx, data.labels, groups=data.groups))
        return data.subset(keep), data.subset(held)
    if counts[counts > 0].min() < 2:
        raise DataError("a class has fewer than 2 images: too few to split into train/val/test")
    n_held = max(len(counts), math.ceil(fraction * len(idx)))
    keep, held = train_test_split(idx, test_size=n_held, stratify=data.labels, random_state=seed)
    return data.subset(np.sort(keep)), data.subset(np.sort(held))


def _complete_splits(splits: dict[str, SplitData], cfg: DataConfig, notes: list[str]) -> dict[str, SplitData]:
    if "all" in splits:
        rest, test = _stratified_split(splits["all"], cfg.test_fraction, cfg.split_seed)
        train, val = _stratified_split(rest, cfg.val_fraction / (1 - cfg.test_fraction), cfg.split_seed)
        notes.append(f"split {len(splits['all'])} images into train/val/test "
                     f"({1 - cfg.val_fraction - cfg.test_fraction:.0%}/{cfg.val_fraction:.0%}/{cfg.test_fraction:.0%}, "
                     f"stratified{', by patient' if splits['all'].groups else ''}, seed {cfg.split_seed})")
        return {"train": train, "val": val, "test": test}
    if "train" not in splits:
        raise DataError("the data has val/test splits but no train split")
    out = dict(splits)
    if "test" not in out:
        out["train"], out["test"] = _stratified_split(out["train"], cfg.test_fraction, cfg.split_seed)
        notes.append(f"held out {cfg.test_fraction:.0%} of train as test (stratified, seed {cfg.split_seed})")
    if "val" not in out:
        out["train"], out["val"] = _stratified_split(out["train"], cfg.val_fraction, cfg.split_seed)
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


def _read_source(path_str: str) -> tuple[dict[str, SplitData], list[str], str]:
    path = Path(path_str).expanduser() if path_str else DEFAULT_DATA
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_dir():
        splits, classes = _from_folder(path)
    elif path.suffix.lower() == ".csv":
        splits, classes = _from_csv(path)
    elif path.suffix.lower() == ".npz":
        splits, classes = _from_npz(path)
    else:
        raise DataError(f"cannot tell the format of {path}: give a folder of class folders, a .csv manifest "
                        f"or an .npz file")
    if not path_str:
        classes = list(DEFAULT_CLASSES)
    return splits, classes, str(path)


def load_data(cfg: DataConfig) -> DataBundle:
    """Read the data named by ``cfg.path`` (the embedded default when empty) into train/val/test."""
    splits, classes, source = _read_source(cfg.path)
    notes: list[str] = []
    splits = _complete_splits(splits, cfg, notes)
    if cfg.train_fraction < 1:
        n_before = len(splits["train"])
        _, splits["train"] = _stratified_split(splits["train"], cfg.train_fraction, cfg.split_seed)
        notes.append(f"kept {len(splits['train'])} of {n_before} training images (data.train_fraction "
                     f"{cfg.train_fraction:g}, stratified, seed {cfg.split_seed})")
    if cfg.pretext == "rotation":
        notes.append("rotation pretext: labels ignored; the model predicts each image's quarter turns "
                     "(training split in all four turns)")
        return DataBundle(classes=list(ROTATION_CLASSES), splits=rotation_pretext(splits, cfg.split_seed),
                          source=source, notes=notes)
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise DataError(f"data.num_classes is {cfg.num_classes} but {cfg.path or 'the data'} has {len(classes)} "
                        f"classes ({', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''})")
    if cfg.class_names:
        if len(cfg.class_names) != len(classes):
            raise DataError(f"data.class_names has {len(cfg.class_names)} names but the data has "
                            f"{len(classes)} classes ({', '.join(classes)})")
        classes = list(cfg.class_names)
    if len(classes) < 2:
        raise DataError(f"{source}: need at least 2 classes, found {len(classes)}")
    bundle = DataBundle(classes=classes, splits=splits, source=source, notes=notes)
    for name, c in bundle.counts().items():
        empty = [classes[i] for i, n in enumerate(c) if n == 0]
        if name == "train" and empty:
            raise DataError(f"{source}: class(es) {', '.join(empty)} have no training images")
    return bundle


def load_eval_data(path: str, classes: list[str], prefer: Sequence[str] = ("test", "all")) -> tuple[SplitData, str]:
    """Images of ``path`` for a trained model: the first split of ``prefer`` that the data has (by default
    the test split, else every image), with labels matched to the model's ``classes`` by name.

    Names that match in another order are re-mapped; data without names of its own (``0``, ``1``, ...)
    is matched by position, with a warning; names that differ are refused.
    """
    splits, data_classes, source = _read_source(path)
    data = next((splits[s] for s in prefer if splits.get(s)), None)
    if data is None:
        wanted = " or ".join("unsplit" if s == "all" else s for s in prefer)
        raise DataError(f"{source} has no {wanted} images to use")
    if len(data_classes) != len(classes):
        raise DataError(f"{source} has {len(data_classes)} classes ({', '.join(data_classes)}) but the model "
                        f"was trained on {len(classes)} ({', '.join(classes)})")
    if list(data_classes) == list(classes):
        return data, source
    model_index = {c.strip().lower(): i for i, c in enumerate(classes)}
    if sorted(model_index) == sorted(c.strip().lower() for c in data_classes):
        remap = np.array([model_index[c.strip().lower()] for c in data_classes], dtype=np.int64)
        log.info("%s: classes matched to the model's by name (%s)", source,
                 ", ".join(f"{c}->{classes[remap[i]]}" for i, c in enumerate(data_classes)))
        return SplitData(labels=remap[data.labels], paths=data.paths, images=data.images, groups=data.groups), source
    if all(c == str(i) for i, c in enumerate(data_classes)):
        log.warning("%s carries no class names; matching its labels 0..%d to the model's classes by position (%s)",
                    source, len(classes) - 1, ", ".join(classes))
        return data, source
    raise DataError(f"{source} has classes {', '.join(data_classes)} but the model knows {', '.join(classes)}; "
                    f"rename the folders or labels to the model's class names")
