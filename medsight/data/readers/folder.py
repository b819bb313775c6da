"""A folder of class folders (``root/<class>/*.png``), or of split folders holding class folders
(``root/train/<class>/...``, ``root/val/...``, ``root/test/...``). A file that links outside ``root`` is
left out and said, unless ``data.allow_outside_paths``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from medsight.data.imageio import IMAGE_EXTS
from medsight.data.readers.rows import PathRules, labels_from_names, listed
from medsight.data.sources import SPLITS, DataError, SplitData

__all__ = ["image_files", "read_folder"]

log = logging.getLogger(__name__)


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder``, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _scan_class_folders(root: Path, rules: PathRules, outside: list[str]) -> tuple[list[str], list[str]]:
    paths: list[str] = []
    names: list[str] = []
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class folders (expected one sub-folder of images per class)")
    for d in class_dirs:
        files = []
        for p in image_files(d):
            full = os.path.normpath(p.absolute())
            (files if rules.inside(full) else outside).append(full)
        if not files:
            raise DataError(f"class '{d.name}' in {root} has no images "
                            f"(looked for {', '.join(sorted(IMAGE_EXTS))})")
        paths += files
        names += [d.name] * len(files)
    return paths, names


def read_folder(root: Path, notes: list[str], *, allow_outside_paths: bool = False
                ) -> tuple[dict[str, SplitData], list[str]]:
    """Splits (``all`` when the folder has no split folders) and class names, sorted."""
    rules = PathRules(root, root, allow_outside_paths)
    outside: list[str] = []
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" in split_dirs:
        scanned = {s: _scan_class_folders(d, rules, outside) for s, d in split_dirs.items()}
        classes = sorted(set(scanned["train"][1]))
        for s, (_, names) in scanned.items():
            extra = sorted(set(names) - set(classes))
            if extra:
                raise DataError(f"split '{s}' of {root} has classes not in train: {', '.join(extra)}")
        index = {c: i for i, c in enumerate(classes)}
        splits = {s: SplitData(labels=np.array([index[n] for n in names], dtype=np.int64), paths=paths)
                  for s, (paths, names) in scanned.items()}
    else:
        paths, names = _scan_class_folders(root, rules, outside)
        labels, classes = labels_from_names(names)
        splits = {"all": SplitData(labels=labels, paths=paths)}
    if outside:
        msg = (f"{len(outside)} file(s) link outside {root} and were left out (data.allow_outside_paths=true "
               f"reads them): {listed(outside)}")
        log.warning("%s", msg)
        notes.append(msg)
    return splits, classes
