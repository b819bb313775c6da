"""Published layouts read as downloaded: Kaggle/EyePACS and APTOS retinopathy grading sets (a CSV of image
id and grade beside a folder of ``<id>.<ext>`` files) and Tiny ImageNet. The grading CSVs go through the
shared row rules (duplicates, missing files, patients)."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsight.data.imageio import IMAGE_EXTS
from medsight.data.readers.folder import image_files
from medsight.data.readers.rows import ManifestRows, PathRules, listed, read_csv, select_rows
from medsight.data.sources import DataError, SplitData

__all__ = ["GradedLayout", "GRADED_LAYOUTS", "DR_GRADES", "graded_layout", "read_graded", "is_tiny_imagenet",
           "read_tiny_imagenet"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradedLayout:
    """A Kaggle-style grading set: a CSV of (image id, grade) beside a folder of ``<id>.<ext>`` files."""

    name: str
    csv: str
    id_column: str
    grade_column: str
    folder: str
    unlabelled: tuple[str, ...]
    patient: bool = False  # ids are ``<patient>_<left|right>``: split by patient


#: Diabetic-retinopathy grades 0 (none) .. 4 (proliferative), the class names of both sets.
DR_GRADES = ["0", "1", "2", "3", "4"]

GRADED_LAYOUTS = (
    # Kaggle/EyePACS Diabetic Retinopathy Detection (2015): trainLabels.csv image,level; train/<image>.jpeg
    GradedLayout("Kaggle diabetic retinopathy (EyePACS)", "trainLabels.csv", "image", "level", "train", ("test",),
                 patient=True),
    # APTOS 2019 Blindness Detection: train.csv id_code,diagnosis; train_images/<id_code>.png
    GradedLayout("APTOS 2019", "train.csv", "id_code", "diagnosis", "train_images", ("test_images",)),
)


def graded_layout(csv_path: Path) -> GradedLayout | None:
    """The published layout ``csv_path`` belongs to: its name, its two columns, its image folder beside it."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            header = [h.strip().lower() for h in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    for layout in GRADED_LAYOUTS:
        if header[:2] == [layout.id_column, layout.grade_column] and (csv_path.parent / layout.folder).is_dir():
            return layout
    return None


def read_graded(csv_path: Path, layout: GradedLayout, notes: list[str], skipped: list[str], *,
                allow_outside_paths: bool = False) -> tuple[dict[str, SplitData], list[str]]:
    table = read_csv(csv_path)
    rules = PathRules(csv_path, csv_path.parent, allow_outside_paths)
    folder = csv_path.parent / layout.folder
    files = {p.stem: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS}
    refs, paths, grades = [], [], []
    for r, line in zip(table.rows, table.lines):
        ident, grade = r.get(layout.id_column, "").strip(), r.get(layout.grade_column, "").strip()
        if grade not in DR_GRADES:
            raise DataError(f"{csv_path}, row {line}: {layout.grade_column} must be a grade 0-4, got '{grade}'")
        refs.append(ident)
        paths.append(str(files.get(ident, folder / ident)))
        if ident in files and not rules.inside(paths[-1]):
            raise DataError(f"{csv_path}, row {line}: {paths[-1]} links outside {rules.base}; images must stay "
                            f"inside it (data.allow_outside_paths=true allows others)")
        grades.append(int(grade))
    if not any(ident in files for ident in refs):
        raise DataError(f"{csv_path}: none of its {len(table.rows)} images is in {folder} "
                        f"(looked for e.g. {listed(refs, 3)} with an image extension)")
    groups = [Path(p).stem.rsplit("_", 1)[0] for p in paths] if layout.patient else None
    m = ManifestRows(csv_path, table.lines, refs, paths, grades, groups=groups)
    keep = select_rows(m, notes)
    skipped += m.skipped
    notes.append(f"read as {layout.name}: {csv_path.name} and {layout.folder}/, classes are the grades 0-4"
                 + (", split by patient (both eyes of a patient stay in one split)" if groups else ""))
    for extra in layout.unlabelled:
        if (csv_path.parent / extra).is_dir():
            notes.append(f"{extra}/ has no labels: not used")
    data = SplitData(labels=np.array([grades[i] for i in keep], dtype=np.int64), paths=[paths[i] for i in keep],
                     groups=[groups[i] for i in keep] if groups is not None else None)
    return {"all": data}, list(DR_GRADES)


def is_tiny_imagenet(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "val" / "val_annotations.txt").is_file()


def _wordnet_names(root: Path, wnids: list[str]) -> list[str]:
    """Class names from ``words.txt`` (``wnid<TAB>name, synonym, ...``): the first name, or all of them where
    first names repeat; the wnid where the file is missing or lacks it."""
    words: dict[str, str] = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if text.strip():
                words[wnid.strip()] = text.strip()
    full = [words.get(w, w) for w in wnids]
    first = [n.split(",")[0].strip() for n in full]
    names = [f if first.count(f) == 1 else n for f, n in zip(first, full)]
    return [n if names.count(n) == 1 else f"{n} ({w})" for n, w in zip(names, wnids)]


def read_tiny_imagenet(root: Path, notes: list[str], skipped: list[str]) -> tuple[dict[str, SplitData], list[str]]:
    """Tiny ImageNet as published: ``train/<wnid>/images/*.JPEG``; ``val/images`` with labels in
    ``val/val_annotations.txt`` (file, wnid, box); class names from ``words.txt``; ``test/`` is unlabelled."""
    wnids = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for w in wnids:
        files = image_files(root / "train" / w)
        if not files:
            raise DataError(f"class '{w}' in {root / 'train'} has no images")
        train_paths += [str(p) for p in files]
        train_labels += [index[w]] * len(files)
    val_paths, val_labels, missing = [], [], []
    annotations = root / "val" / "val_annotations.txt"
    for n, line in enumerate(annotations.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise DataError(f"{annotations}, line {n}: expected 'file<TAB>wnid<TAB>box', got {line[:80]!r}")
        name, w = parts[0].strip(), parts[1].strip()
        if w not in index:
            raise DataError(f"{annotations}, line {n}: class {w} has no train/{w} folder")
        p = root / "val" / "images" / name
        if not p.is_file():
            missing.append(name)
            skipped.append(f"{p} (line {n}): file not found")
            continue
        val_paths.append(str(p))
        val_labels.append(index[w])
    if missing:
        msg = (f"{len(missing)} images listed in {annotations.name} are not in {root / 'val' / 'images'}: skipped "
               f"({listed(missing)})")
        log.warning("%s", msg)
        notes.append(msg)
    classes = _wordnet_names(root, wnids)
    notes.append(f"read as Tiny ImageNet: {len(wnids)} classes (train/<wnid>/images, val/val_annotations.txt)"
                 + (", names from words.txt" if (root / "words.txt").is_file() else ""))
    if (root / "test").is_dir():
        notes.append("test/ has no labels in Tiny ImageNet: not used")
    splits = {"train": SplitData(labels=np.array(train_labels, dtype=np.int64), paths=train_paths)}
    if val_paths:
        splits["val"] = SplitData(labels=np.array(val_labels, dtype=np.int64), paths=val_paths)
    return splits, classes
