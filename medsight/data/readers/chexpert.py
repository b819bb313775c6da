"""CheXpert's ``train.csv`` style: a path column and one column per finding (1, 0, -1 uncertain, blank).

The finding columns are named by ``data.label_columns`` or found as the numeric columns besides path,
patient, split and known metadata (Sex, Age, Frontal/Lateral, AP/PA). Patients come from a patient
column, else from the paths (``.../patient00001/study1/...``); a path without one is its own patient.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medsight.data.multilabel import METADATA_COLUMNS
from medsight.data.readers.manifest import looks_like_paths
from medsight.data.readers.rows import ManifestRows, PathRules, Table, select_rows, split_by_column
from medsight.data.sources import DataError, SplitData

__all__ = ["finding_columns", "read_finding_columns", "patient_from_path", "read_chexpert"]

log = logging.getLogger(__name__)


def _number(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def finding_columns(fields: Sequence[str], rows: list[dict[str, str]], exclude: Sequence[str]) -> list[str]:
    """Columns that look like findings: not metadata, path, patient or split, and holding numbers."""
    skip = {e.casefold() for e in exclude} | set(METADATA_COLUMNS)
    found = []
    for f in fields:
        if f.casefold() in skip:
            continue
        values = [v.strip() for r in rows[:200] if (v := (r.get(f) or "").strip())]
        if values and sum(_number(v) is not None for v in values) * 2 >= len(values):
            found.append(f)
    return found


def read_finding_columns(path: Path, rows: list[dict[str, str]], lines: list[int], columns: Sequence[str]
                         ) -> np.ndarray:
    """Raw labels from one column per finding: 1, 0, -1 (uncertain), blank (NaN). Anything else (text, 2,
    0.5) is refused, naming the row and column."""
    raw = np.full((len(rows), len(columns)), np.nan, dtype=np.float32)
    for i, (r, line) in enumerate(zip(rows, lines)):
        for k, c in enumerate(columns):
            v = (r.get(c) or "").strip()
            if not v:
                continue
            x = _number(v)
            if x is None or x not in (1.0, 0.0, -1.0):
                what = "text" if x is None else "a number other than 1, 0 or -1"
                raise DataError(f"{path}, row {line}, column '{c}': '{v}' is {what}; a finding column "
                                f"holds 1 (positive), 0 (negative), -1 (uncertain) or nothing (blank). "
                                f"Fix the value, or leave the column out with data.label_columns")
            raw[i, k] = x
    return raw


def patient_from_path(p: str) -> str | None:
    """CheXpert's and MIMIC's paths carry the patient: ``.../patient00001/study1/...``, ``.../p10000032/...``."""
    m = re.search(r"(?:^|[/\\])(patient\d+|p\d{6,})(?:[/\\])", p)
    return m.group(1) if m else None


def _path_column(table: Table, base: Path, path_column: str | None) -> str:
    if path_column is not None:
        if path_column not in table.fields:
            raise DataError(f"CSV manifest {table.path} has no column '{path_column}' (data.path_column); its "
                            f"columns are {', '.join(table.fields)}")
        return path_column
    named = [f for f in table.fields if f.lower() == "path"]
    if named:
        return named[0]
    found = [f for f in table.fields if looks_like_paths(table, f, base)]
    if len(found) != 1:
        raise DataError(f"CSV manifest {table.path}: no 'Path' column, and {'several columns' if found else 'no column'} "
                        f"hold{'' if found else 's'} image file names; choose one with data.path_column")
    return found[0]


def _columns(table: Table, label_columns: Sequence[str] | None, exclude: list[str], notes: list[str]) -> list[str]:
    if label_columns:
        absent = [c for c in label_columns if c not in table.fields]
        if absent:
            raise DataError(f"CSV manifest {table.path} has no column(s) {', '.join(absent)} (data.label_columns); "
                            f"its columns are {', '.join(table.fields)}")
        columns = list(label_columns)
    else:
        columns = finding_columns(table.fields, table.rows, exclude)
    how = "named by data.label_columns" if label_columns else \
        "found as the numeric columns besides path, patient, split and metadata (name them with data.label_columns)"
    msg = f"multi-label CSV: {len(columns)} finding columns {how}: {', '.join(columns)}"
    log.info("%s: %s", table.path, msg)
    notes.append(msg)
    return columns


def _resolver(table: Table, rules: PathRules, pcol: str) -> list[str]:
    """Paths of every row. CheXpert writes them from the data set's parent (``CheXpert-v1.0-small/train/...``):
    such a path is read from the parent folder when the manifest's folder has no such file; it must still
    lie inside the manifest's folder."""
    base = Path(rules.base)
    paths = []
    for r, line in zip(table.rows, table.lines):
        rel = (r.get(pcol) or "").strip()
        parts = Path(rel).parts
        if rel and parts and parts[0] == base.name and not os.path.exists(os.path.join(base, rel)):
            rel = os.path.join(*parts[1:]) if len(parts) > 1 else rel
        paths.append(rules.resolve(rel, line, pcol))
    return paths


def read_chexpert(table: Table, notes: list[str], skipped: list[str], *, allow_outside_paths: bool = False,
                  path_column: str | None = None, label_columns: Sequence[str] | None = None
                  ) -> tuple[dict[str, SplitData], list[str]]:
    """Raw labels (1, 0, -1 uncertain, NaN blank), patients, and the manifest's own split when it has one."""
    path = table.path
    rules = PathRules(path, path.parent, allow_outside_paths)
    pcol = _path_column(table, Path(rules.base), path_column)
    patient_col = next((f for f in table.fields if f.lower() in ("patient_id", "patient id")), None)
    columns = _columns(table, label_columns, [pcol] + ([patient_col] if patient_col else []), notes)
    raw = read_finding_columns(path, table.rows, table.lines, columns)
    if label_columns:
        blank = [c for k, c in enumerate(columns) if np.isnan(raw[:, k]).all()]
        if blank:
            raise DataError(f"CSV manifest {path}: column(s) {', '.join(blank)} named in data.label_columns are "
                            f"blank in every row: no labels to learn from. Fill them, or leave them out of "
                            f"data.label_columns")
    paths = _resolver(table, rules, pcol)
    if patient_col:
        groups: list[str | None] | None = [(r.get(patient_col) or "").strip() for r in table.rows]
        if "" in groups:
            raise DataError(f"CSV manifest {path}, row {table.lines[groups.index('')]}: {patient_col} is empty "
                            f"(give every row its patient, or drop the column)")
    else:
        found = [patient_from_path(p) for p in paths]
        groups = [g or "" for g in found] if any(found) else None
        if groups:
            notes.append("patients read from the image paths (patientNNNNN): split by patient")
    split_col = next((f for f in table.fields if f.lower() == "split"), None)
    names = [(r.get(split_col) or "").strip().lower() for r in table.rows] if split_col else None
    keys = [tuple(np.nan_to_num(row, nan=9.0).tolist()) for row in raw]  # blank compared as blank
    m = ManifestRows(path, table.lines, [(r.get(pcol) or "").strip() for r in table.rows], paths, keys,
                     groups=groups, splits=names, real=[rules.real(p) for p in paths])
    keep = select_rows(m, notes)
    skipped += m.skipped
    used = {pcol, patient_col, split_col, *columns}
    meta = {f: [(table.rows[i].get(f) or "").strip() for i in keep] for f in table.fields if f and f not in used}
    data = SplitData(labels=raw[keep], paths=[paths[i] for i in keep],
                     groups=[m.groups[i] for i in keep] if m.groups is not None else None, meta=meta or None)
    return split_by_column(data, [names[i] for i in keep] if names is not None else None, path), list(columns)
