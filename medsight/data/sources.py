"""Data in: a folder per class, a CSV manifest, a MedMNIST-style .npz, or a published layout read as
downloaded (Tiny ImageNet, Kaggle/EyePACS and APTOS retinopathy), split without leaks.

Every source becomes the same thing: a list of samples (file paths or in-memory images) with integer
labels and class names, split into train / val / test. A new source format goes here, as one
``_from_*`` reader that ``_read_source`` dispatches to. Readers refuse what would give a silently wrong
result (a path outside a manifest's folder, one image with two labels, fractional labels) with a
message naming the row or key, and say what they changed (merged label spellings, dropped duplicate
rows, rescaled float images).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsight.config import DEFAULT_DATA
from medsight.data.imageio import IMAGE_EXTS
from medsight.data.multilabel import (MultiLabelDataError, apply_label_policy, describe_choice, finding_columns,
                                      is_nih_manifest, multilabel_split, patient_from_path, read_finding_columns,
                                      read_nih_manifest)
from medsight.data.splits import stratified_group_fold
from medsight.errors import MedsightError

if TYPE_CHECKING:
    from medsight.config import DataConfig

__all__ = ["DataError", "SplitData", "DataBundle", "label_policy", "label_counts",
           "DEFAULT_CLASSES",
           "ROTATION_CLASSES", "rotation_pretext", "SPLITS"]

log = logging.getLogger(__name__)

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
                "notes": list(self.notes)}


# --------------------------------------------------------------------------------------------- sources

def _labels_from_names(names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    classes = sorted(set(names), key=lambda c: (not c.lstrip("-").isdigit(), int(c) if c.lstrip("-").isdigit() else 0, c))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), classes


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _listed(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _scan_class_folders(root: Path) -> tuple[list[str], list[str]]:
    paths: list[str] = []
    names: list[str] = []
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class folders (expected one sub-folder of images per class)")
    for d in class_dirs:
        files = _image_files(d)
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


# -- CSV manifests

#: Column names taken as the label when a manifest has no ``label`` column (case-insensitive).
LABEL_COLUMNS = ("label", "class", "diagnosis", "level", "finding", "target", "y")


@dataclass
class _Csv:
    path: Path
    fields: list[str]
    rows: list[dict[str, str]]  # values as written (unstripped)
    lines: list[int]  # the file line each row ends on (the header is line 1)


def _read_csv(path: Path) -> _Csv:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's byte-order mark is not a column name
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            rows, lines = [], []
            for row in reader:
                rows.append({k.strip(): v or "" for k, v in row.items() if isinstance(k, str)})  # None: extra cells
                lines.append(reader.line_num)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text (UTF-8) CSV file") from None
    except csv.Error as exc:
        raise DataError(f"{path} is not a readable CSV file: {exc}") from None
    return _Csv(path, fields, rows, lines)


def _looks_like_paths(table: _Csv, column: str, base: Path, sample: int = 50) -> bool:
    """Values that are file names with image extensions, of which at least one exists."""
    values = [v for r in table.rows[:sample] if (v := r.get(column, "").strip())]
    if not values or not all(Path(v).suffix.lower() in IMAGE_EXTS for v in values):
        return False
    return any((base / v).is_file() for v in values)


def _choose_columns(table: _Csv, base: Path, path_column: str | None, label_column: str | None) -> tuple[str, str]:
    """The path and label columns: as named by the caller, ``path``/``label``, or found where unambiguous."""
    fields, where = table.fields, f"CSV manifest {table.path}"
    for given, key in ((path_column, "path_column"), (label_column, "label_column")):
        if given is not None and given not in fields:
            raise DataError(f"{where} has no column '{given}' (data.{key}); its columns are {', '.join(fields)}")
    pcol = path_column or ("path" if "path" in fields else None)
    if pcol is None:
        found = [f for f in fields if f != label_column and _looks_like_paths(table, f, base)]
        if len(found) != 1:
            why = (f"columns {', '.join(found)} all hold image file names" if found
                   else "no column holds names of image files that exist beside it")
            raise DataError(f"{where} lacks column(s) path: {why}. Its columns are {', '.join(fields) or 'none'}; "
                            f"name a 'path' column, or choose one with data.path_column "
                            f"(expected path,label[,patient_id][,split])")
        pcol = found[0]
        log.info("%s: image paths from column '%s'", table.path, pcol)
    lcol = label_column or ("label" if "label" in fields else None)
    if lcol is None:
        found = [f for f in fields if f not in (pcol, "patient_id", "split") and f.strip().lower() in LABEL_COLUMNS]
        if len(found) != 1:
            why = f"columns {', '.join(found)} could each be it" if found else \
                f"none is named {', '.join(LABEL_COLUMNS)}"
            raise DataError(f"{where} lacks column(s) label: {why}. Its columns are {', '.join(fields)}; "
                            f"name a 'label' column, or choose one with data.label_column")
        lcol = found[0]
        log.info("%s: labels from column '%s'", table.path, lcol)
    if pcol == lcol:
        raise DataError(f"{where}: the path and label columns are both '{pcol}'")
    return pcol, lcol


def _inside(path: str, folder: str) -> bool:
    """Whether normalized absolute ``path`` lies in normalized absolute ``folder`` (a prefix test: per row
    of a 250,000-row manifest, ``os.path.commonpath`` took seconds)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _canonical_labels(labels: list[str], source: Path) -> list[str]:
    """Labels that differ only in case or surrounding spaces are one class, spelled as most rows spell it."""
    spellings: dict[str, Counter[str]] = {}
    for raw in labels:
        spellings.setdefault(raw.strip().casefold(), Counter())[raw] += 1
    canonical = {k: c.most_common(1)[0][0].strip() for k, c in spellings.items()}
    merged = {k: c for k, c in spellings.items() if len(c) > 1}
    if merged:
        log.warning("%s: labels that differ only in case or spaces are taken as one class: %s", source,
                    "; ".join(f"{', '.join(repr(s) for s in c)} -> '{canonical[k]}'" for k, c in merged.items()))
    return [canonical[raw.strip().casefold()] for raw in labels]


def _from_csv(table: _Csv, notes: list[str], *, allow_outside_paths: bool = False, path_column: str | None = None,
              label_column: str | None = None) -> tuple[dict[str, SplitData], list[str]]:
    """A manifest ``path,label[,patient_id][,split]`` (other column names found or given).

    Paths are relative to the manifest's folder and must stay inside it unless ``allow_outside_paths``.
    Duplicate rows are dropped; one image with two labels, splits or patients is refused.
    """
    path = table.path
    if not table.rows:
        raise DataError(f"CSV manifest {path} has no rows")
    base = os.path.normpath(path.parent.absolute())
    pcol, lcol = _choose_columns(table, Path(base), path_column, label_column)
    has_split, has_group = "split" in table.fields, "patient_id" in table.fields
    paths, raw_labels = [], []
    for r, line in zip(table.rows, table.lines):
        raw = r.get(pcol, "").strip()
        if not raw:
            raise DataError(f"CSV manifest {path}, row {line}: empty {pcol}")
        if not r.get(lcol, "").strip():
            raise DataError(f"CSV manifest {path}, row {line}: empty label")
        full = os.path.normpath(os.path.join(base, os.path.expanduser(raw)))
        if not allow_outside_paths and not _inside(full, base):
            raise DataError(f"CSV manifest {path}, row {line}: {raw} lies outside the manifest's folder {base}; paths "
                            f"must stay inside it (data.allow_outside_paths=true allows others)")
        paths.append(full)
        raw_labels.append(r[lcol])
    labels = _canonical_labels(raw_labels, path)
    splits_col = [r.get("split", "").strip().lower() for r in table.rows] if has_split else None
    groups = [r.get("patient_id", "").strip() for r in table.rows] if has_group else None
    if groups is not None and "" in groups:
        raise DataError(f"CSV manifest {path}, row {table.lines[groups.index('')]}: patient_id is empty "
                        f"(give every row its patient, or drop the column)")
    if splits_col is not None and any(splits_col) and "" in splits_col:
        raise DataError(f"CSV manifest {path}, row {table.lines[splits_col.index('')]}: split is blank, while other "
                        f"rows name one; give every row train, val or test, or leave the column empty everywhere")
    keep, first, dropped = [], {}, []
    for i, p in enumerate(paths):
        j = first.setdefault(p, i)
        if j == i:
            keep.append(i)
            continue
        for noun, values in (("label", labels), ("split", splits_col), ("patient_id", groups)):
            if values is not None and values[i] != values[j]:
                raise DataError(f"CSV manifest {path}: {table.rows[i][pcol].strip()} has {noun} '{values[j]}' on row "
                                f"{table.lines[j]} and '{values[i]}' on row {table.lines[i]}; one image has one {noun}")
        dropped.append(table.lines[i])
    if dropped:
        msg = (f"dropped {len(dropped)} duplicate row(s) of {path.name} naming an image an earlier row names "
               f"(rows {_listed([str(d) for d in dropped])})")
        log.warning("%s: %s", path, msg)
        notes.append(msg)
    missing = [i for i in keep if not os.path.isfile(paths[i])]
    if missing:
        gone = set(missing)
        keep = [i for i in keep if i not in gone]
        if not keep:
            raise DataError(f"CSV manifest {path}: none of its {len(paths)} image files exists (e.g. {paths[missing[0]]})")
        msg = (f"{len(missing)} image file(s) named in {path.name} do not exist and were left out: "
               f"{_listed([f'{table.rows[i][pcol].strip()} (row {table.lines[i]})' for i in missing])}")
        log.warning("%s: %s", path, msg)
        notes.append(msg)
    codes, classes = _labels_from_names([labels[i] for i in keep])
    extra = [f for f in table.fields if f not in (pcol, lcol, "split", "patient_id") and f]
    meta = {f: [table.rows[i].get(f, "").strip() for i in keep] for f in extra}  # subgroup analysis reads these
    data = SplitData(labels=codes, paths=[paths[i] for i in keep],
                     groups=[groups[i] for i in keep] if groups is not None else None, meta=meta or None)
    return _split_by_column(data, [splits_col[i] for i in keep] if splits_col is not None else None, path), classes


def _split_by_column(data: SplitData, names: list[str] | None, path: Path) -> dict[str, SplitData]:
    """The manifest's own ``split`` column (train/val/test), checked for patients in two splits; or one
    ``all`` split when the column is absent or empty."""
    if names is None or not any(names):
        return {"all": data}
    if "" in names:
        raise DataError(f"CSV manifest {path}: split is blank on some rows while others name one; give every "
                        f"row train, val or test, or leave the column empty everywhere")
    bad = sorted(set(names) - set(SPLITS))
    if bad:
        raise DataError(f"CSV manifest {path}: split must be train, val or test; found {', '.join(bad)}")
    splits = {s: data.subset(np.array([i for i, n in enumerate(names) if n == s], dtype=np.int64))
              for s in SPLITS if s in names}
    if data.groups is not None:
        _check_no_group_leak(splits, path)
    return splits


def _is_multilabel_csv(table: _Csv, path_column: str | None, label_column: str | None,
                       label_columns: Sequence[str] | None) -> bool:
    """NIH's ``Finding Labels``, findings named by ``data.label_columns``, or (without a single label column)
    two or more numeric finding columns."""
    if is_nih_manifest(table.fields) or label_columns:
        return True
    if label_column or "label" in table.fields:
        return False
    if any(f.strip().lower() in LABEL_COLUMNS for f in table.fields):
        return False
    return len(finding_columns(table.fields, table.rows, [path_column or "path"])) >= 2


def _finding_path_column(table: _Csv, base: Path, path_column: str | None) -> str:
    if path_column is not None:
        if path_column not in table.fields:
            raise DataError(f"CSV manifest {table.path} has no column '{path_column}' (data.path_column); its "
                            f"columns are {', '.join(table.fields)}")
        return path_column
    named = [f for f in table.fields if f.lower() == "path"]
    if named:
        return named[0]
    found = [f for f in table.fields if _looks_like_paths(table, f, base)]
    if len(found) != 1:
        raise DataError(f"CSV manifest {table.path}: no 'Path' column, and {'several columns' if found else 'no column'} "
                        f"hold{'' if found else 's'} image file names; choose one with data.path_column")
    return found[0]


def _from_multilabel_csv(table: _Csv, notes: list[str], *, allow_outside_paths: bool, path_column: str | None,
                         label_columns: Sequence[str] | None) -> tuple[dict[str, SplitData], list[str]]:
    """An NIH-style manifest, or one column per finding (CheXpert's ``train.csv``): raw labels (1, 0, -1
    uncertain, NaN blank), patients, and the manifest's own split when it has one."""
    path = table.path
    if not table.rows:
        raise DataError(f"CSV manifest {path} has no rows")
    try:
        if is_nih_manifest(table.fields) and not label_columns:
            raw, classes, paths, groups, split_names, more, meta = read_nih_manifest(path, table.rows, table.lines)
            notes += more
            data = SplitData(labels=raw, paths=paths, groups=groups, meta=meta)
            return _split_by_column(data, split_names, path), classes
        base = Path(os.path.normpath(path.parent.absolute()))
        pcol = _finding_path_column(table, base, path_column)
        patient_col = next((f for f in table.fields if f.lower() in ("patient_id", "patient id")), None)
        if label_columns:
            absent = [c for c in label_columns if c not in table.fields]
            if absent:
                raise DataError(f"CSV manifest {path} has no column(s) {', '.join(absent)} (data.label_columns); "
                                f"its columns are {', '.join(table.fields)}")
            columns = list(label_columns)
        else:
            columns = finding_columns(table.fields, table.rows, [pcol] + ([patient_col] if patient_col else []))
        msg = describe_choice(columns, bool(label_columns))
        log.info("%s: %s", path, msg)
        notes.append(msg)
        raw = read_finding_columns(path, table.rows, table.lines, columns)
    except MultiLabelDataError as exc:
        raise DataError(str(exc)) from None
    paths = []
    for r, line in zip(table.rows, table.lines):
        rel = (r.get(pcol) or "").strip()
        if not rel:
            raise DataError(f"CSV manifest {path}, row {line}: empty {pcol}")
        full = os.path.normpath(os.path.join(base, rel))
        first = Path(rel).parts[0] if Path(rel).parts else ""
        if first == base.name and not os.path.exists(full):  # CheXpert: paths start with the data set's folder
            full = os.path.normpath(os.path.join(base.parent, rel))
        if not allow_outside_paths and not _inside(full, str(base)) and not _inside(full, str(base.parent)):
            raise DataError(f"CSV manifest {path}, row {line}: {rel} lies outside the manifest's folder {base}; paths "
                            f"must stay inside it (data.allow_outside_paths=true allows others)")
        paths.append(full)
    if patient_col:
        groups = [(r.get(patient_col) or "").strip() for r in table.rows]
        if "" in groups:
            raise DataError(f"CSV manifest {path}, row {table.lines[groups.index('')]}: {patient_col} is empty")
    else:
        found = [patient_from_path(p) for p in paths]
        groups = found if all(found) else None
        if groups:
            notes.append("patients read from the image paths (patientNNNNN): split by patient")
    split_col = next((f for f in table.fields if f.lower() == "split"), None)
    names = [(r.get(split_col) or "").strip().lower() for r in table.rows] if split_col else None
    used = {pcol, patient_col, split_col, *columns}
    meta = {f: [(r.get(f) or "").strip() for r in table.rows] for f in table.fields if f and f not in used}
    data = SplitData(labels=raw, paths=paths, groups=groups, meta=meta or None)  # meta: Sex, Age, ... for subgroups
    return _split_by_column(data, names, path), list(columns)


def _check_no_group_leak(splits: dict[str, SplitData], source: Path) -> None:
    seen: dict[str, str] = {}
    for name, s in splits.items():
        for g in set(s.groups or []):
            if g in seen and seen[g] != name:
                raise DataError(f"{source}: patient '{g}' appears in both '{seen[g]}' and '{name}' splits")
            seen[g] = name


# -- published layouts, read as downloaded

@dataclass(frozen=True)
class _GradedLayout:
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
    _GradedLayout("Kaggle diabetic retinopathy (EyePACS)", "trainLabels.csv", "image", "level", "train", ("test",),
                  patient=True),
    # APTOS 2019 Blindness Detection: train.csv id_code,diagnosis; train_images/<id_code>.png
    _GradedLayout("APTOS 2019", "train.csv", "id_code", "diagnosis", "train_images", ("test_images",)),
)


def _graded_layout(csv_path: Path) -> _GradedLayout | None:
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


def _from_graded_csv(csv_path: Path, layout: _GradedLayout, notes: list[str]) -> tuple[dict[str, SplitData], list[str]]:
    table = _read_csv(csv_path)
    folder = csv_path.parent / layout.folder
    files = {p.stem: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS}
    paths, labels, missing = [], [], []
    for r, line in zip(table.rows, table.lines):
        ident, grade = r.get(layout.id_column, "").strip(), r.get(layout.grade_column, "").strip()
        if grade not in DR_GRADES:
            raise DataError(f"{csv_path}, row {line}: {layout.grade_column} must be a grade 0-4, got '{grade}'")
        if ident not in files:
            missing.append(ident)
            continue
        paths.append(str(files[ident]))
        labels.append(int(grade))
    if not paths:
        raise DataError(f"{csv_path}: none of its {len(table.rows)} images is in {folder} "
                        f"(looked for e.g. {_listed(missing, 3)} with an image extension)")
    if missing:
        msg = f"{len(missing)} of {len(table.rows)} images named in {csv_path.name} are not in {folder}: skipped ({_listed(missing)})"
        log.warning("%s", msg)
        notes.append(msg)
    groups = [Path(p).stem.rsplit("_", 1)[0] for p in paths] if layout.patient else None
    notes.append(f"read as {layout.name}: {csv_path.name} and {layout.folder}/, classes are the grades 0-4"
                 + (", split by patient (both eyes of a patient stay in one split)" if groups else ""))
    for extra in layout.unlabelled:
        if (csv_path.parent / extra).is_dir():
            notes.append(f"{extra}/ has no labels: not used")
    return {"all": SplitData(labels=np.array(labels, dtype=np.int64), paths=paths, groups=groups)}, list(DR_GRADES)


def _is_tiny_imagenet(root: Path) -> bool:
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


def _from_tiny_imagenet(root: Path, notes: list[str]) -> tuple[dict[str, SplitData], list[str]]:
    """Tiny ImageNet as published: ``train/<wnid>/images/*.JPEG``; ``val/images`` with labels in
    ``val/val_annotations.txt`` (file, wnid, box); class names from ``words.txt``; ``test/`` is unlabelled."""
    wnids = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = [], []
    for w in wnids:
        files = _image_files(root / "train" / w)
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
            continue
        val_paths.append(str(p))
        val_labels.append(index[w])
    if missing:
        msg = f"{len(missing)} images listed in {annotations.name} are not in {root / 'val' / 'images'}: skipped ({_listed(missing)})"
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


# -- npz

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


def _from_npz(path: Path, notes: list[str]) -> tuple[dict[str, SplitData], list[str]]:
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


# ---------------------------------------------------------------------------------------------- splits

def _stratified_split(data: SplitData, fraction: float, seed: int) -> tuple[SplitData, SplitData]:
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


def _read_source(path_str: str, *, allow_outside_paths: bool = False, path_column: str | None = None,
                 label_column: str | None = None, label_columns: Sequence[str] | None = None,
                 uncertain: str = "ignore", blank: str = "ignore", uncertain_per_finding: dict[str, str] | None = None
                 ) -> tuple[dict[str, SplitData], list[str], str, list[str]]:
    """``(splits, classes, source, notes)`` of the data at ``path_str`` (the embedded default when empty).

    A folder is read as a published layout it matches (Tiny ImageNet, Kaggle/EyePACS or APTOS retinopathy),
    else as class folders; a .csv as a published grading CSV, else as a manifest; an .npz as arrays.
    """
    path = Path(path_str).expanduser() if path_str else DEFAULT_DATA
    notes: list[str] = []
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    csv_path = path if path.suffix.lower() == ".csv" and path.is_file() else None
    if path.is_dir():
        csv_path = next((path / g.csv for g in GRADED_LAYOUTS if _graded_layout(path / g.csv) is not None), None)
    layout = _graded_layout(csv_path) if csv_path is not None else None
    if layout is not None:
        splits, classes = _from_graded_csv(csv_path, layout, notes)
    elif path.is_dir() and _is_tiny_imagenet(path):
        splits, classes = _from_tiny_imagenet(path, notes)
    elif path.is_dir():
        splits, classes = _from_folder(path)
    elif path.suffix.lower() == ".csv":
        table = _read_csv(path)  # once: a manifest can hold hundreds of thousands of rows
        if _is_multilabel_csv(table, path_column, label_column, label_columns):
            splits, classes = _from_multilabel_csv(table, notes, allow_outside_paths=allow_outside_paths,
                                                   path_column=path_column, label_columns=label_columns)
        else:
            splits, classes = _from_csv(table, notes, allow_outside_paths=allow_outside_paths,
                                        path_column=path_column, label_column=label_column)
    elif path.suffix.lower() == ".npz":
        splits, classes = _from_npz(path, notes)
    else:
        raise DataError(f"cannot tell the format of {path}: give a folder of class folders, a .csv manifest "
                        f"or an .npz file")
    if path.resolve() == DEFAULT_DATA.resolve() and classes == ["0", "1"]:  # the embedded set, by any path
        classes = list(DEFAULT_CLASSES)
    if next(iter(splits.values())).labels.ndim == 2:  # multi-label: uncertain and blank labels by the policy
        try:
            for name, split in splits.items():
                split.labels, done = apply_label_policy(split.labels, classes, uncertain, blank, uncertain_per_finding)
                notes += [f"{name}: {d}" for d in done]
        except MultiLabelDataError as exc:
            raise DataError(str(exc)) from None
    return splits, classes, str(path), notes


def _reader_options(cfg: DataConfig) -> dict[str, Any]:
    """The readers' options from the data config (keys a config without them reads as their defaults)."""
    return {"allow_outside_paths": bool(getattr(cfg, "allow_outside_paths", False)),
            "path_column": getattr(cfg, "path_column", None) or None,
            "label_column": getattr(cfg, "label_column", None) or None,
            "label_columns": getattr(cfg, "label_columns", None) or None, **label_policy(cfg)}


def label_policy(cfg: DataConfig) -> dict[str, Any]:
    """The multi-label policies for uncertain and blank labels of a data config (see ``apply_label_policy``)."""
    return {"uncertain": getattr(cfg, "uncertain", "ignore"), "blank": getattr(cfg, "blank", "ignore"),
            "uncertain_per_finding": getattr(cfg, "uncertain_per_finding", None)}

