"""One reader per source format, over one row pipeline (:mod:`.rows`): a new format is a new module here.

* :mod:`.folder` — class folders (optionally inside train/val/test folders);
* :mod:`.manifest` — a single-label CSV manifest (``path,label[,patient_id][,split]``);
* :mod:`.chexpert` — a CSV with one column per finding (CheXpert's ``train.csv``);
* :mod:`.nih` — NIH ChestX-ray14's ``Data_Entry_2017.csv``;
* :mod:`.npz` — MedMNIST-style arrays;
* :mod:`.published` — Kaggle/EyePACS and APTOS retinopathy, Tiny ImageNet, as downloaded.

:func:`read_source` picks the reader and applies the multi-label label policy; every manifest reader
shares the rules for paths, duplicates, missing files and patients.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsight.config import DEFAULT_DATA
from medsight.data.multilabel import MultiLabelDataError, apply_label_policy
from medsight.data.readers.chexpert import finding_columns, read_chexpert
from medsight.data.readers.folder import read_folder
from medsight.data.readers.manifest import LABEL_COLUMNS, read_manifest
from medsight.data.readers.nih import is_nih_manifest, read_nih
from medsight.data.readers.npz import read_npz
from medsight.data.readers.published import (GRADED_LAYOUTS, graded_layout, is_tiny_imagenet, read_graded,
                                             read_tiny_imagenet)
from medsight.data.readers.rows import Table, read_csv
from medsight.data.sources import DEFAULT_CLASSES, DataError, SplitData, label_policy

if TYPE_CHECKING:
    from medsight.config import DataConfig

__all__ = ["Source", "read_source", "reader_options", "check_output_outside"]


@dataclass
class Source:
    """What a reader gives: splits as the source has them (``all`` when unsplit), class names, the source's
    path, notes (what was found and changed) and the files left out, with the reason."""

    splits: dict[str, SplitData]
    classes: list[str]
    path: str
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _is_multilabel_csv(table: Table, path_column: str | None, label_column: str | None,
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


def _read_csv_source(path: Path, notes: list[str], skipped: list[str], *, allow_outside_paths: bool,
                     path_column: str | None, label_column: str | None, label_columns: Sequence[str] | None
                     ) -> tuple[dict[str, SplitData], list[str]]:
    table = read_csv(path)  # once: a manifest can hold hundreds of thousands of rows
    if not _is_multilabel_csv(table, path_column, label_column, label_columns):
        return read_manifest(table, notes, skipped, allow_outside_paths=allow_outside_paths,
                             path_column=path_column, label_column=label_column)
    if is_nih_manifest(table.fields) and not label_columns:
        return read_nih(table, notes, skipped, allow_outside_paths=allow_outside_paths)
    return read_chexpert(table, notes, skipped, allow_outside_paths=allow_outside_paths, path_column=path_column,
                         label_columns=label_columns)


def read_source(path_str: str, *, allow_outside_paths: bool = False, path_column: str | None = None,
                label_column: str | None = None, label_columns: Sequence[str] | None = None,
                uncertain: str = "ignore", blank: str = "ignore", uncertain_per_finding: dict[str, str] | None = None
                ) -> Source:
    """The data at ``path_str`` (the embedded default when empty).

    A folder is read as a published layout it matches (Tiny ImageNet, Kaggle/EyePACS or APTOS retinopathy),
    else as class folders; a .csv as a published grading CSV, else as a manifest; an .npz as arrays.
    """
    path = Path(path_str).expanduser() if path_str else DEFAULT_DATA
    notes: list[str] = []
    skipped: list[str] = []
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    csv_path = path if path.suffix.lower() == ".csv" and path.is_file() else None
    if path.is_dir():
        csv_path = next((path / g.csv for g in GRADED_LAYOUTS if graded_layout(path / g.csv) is not None), None)
    layout = graded_layout(csv_path) if csv_path is not None else None
    if layout is not None:
        splits, classes = read_graded(csv_path, layout, notes, skipped, allow_outside_paths=allow_outside_paths)
    elif path.is_dir() and is_tiny_imagenet(path):
        splits, classes = read_tiny_imagenet(path, notes, skipped)
    elif path.is_dir():
        splits, classes = read_folder(path, notes, allow_outside_paths=allow_outside_paths)
    elif path.suffix.lower() == ".csv":
        splits, classes = _read_csv_source(path, notes, skipped, allow_outside_paths=allow_outside_paths,
                                           path_column=path_column, label_column=label_column,
                                           label_columns=label_columns)
    elif path.suffix.lower() == ".npz":
        splits, classes = read_npz(path, notes)
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
    return Source(splits, classes, str(path), notes, skipped)


def reader_options(cfg: DataConfig) -> dict[str, Any]:
    """The readers' options from the data config (keys a config without them reads as their defaults)."""
    return {"allow_outside_paths": bool(getattr(cfg, "allow_outside_paths", False)),
            "path_column": getattr(cfg, "path_column", None) or None,
            "label_column": getattr(cfg, "label_column", None) or None,
            "label_columns": getattr(cfg, "label_columns", None) or None, **label_policy(cfg)}


def check_output_outside(out: str | Path, data_path: str | None, option: str) -> None:
    """Refuse an output folder inside a source folder: the readers scan that folder, so what medsight writes
    there (a cache, a run's figures) would become part of the data ("class 'cache' has no images")."""
    src = Path(data_path).expanduser() if data_path else DEFAULT_DATA
    if not src.is_dir():
        return  # a manifest or an .npz: its folder is not scanned for classes
    o, s = os.path.realpath(Path(out).expanduser()), os.path.realpath(src)
    if o == s or o.startswith(s.rstrip(os.sep) + os.sep):
        raise DataError(f"{option} {out} lies inside the data folder {src}, which medsight reads as the data set; "
                        f"choose a folder outside it")
