"""NIH ChestX-ray14's ``Data_Entry_2017.csv`` style: ``Image Index`` (a file name, found anywhere under the
CSV's folder, e.g. ``images_001/images/``), ``Finding Labels`` (findings joined by ``|``, ``No Finding`` =
none), ``Patient ID`` (patient-level split) and an optional ``split`` column.

Findings are NIH's 14 in ChestMNIST order, then any other finding the manifest names (kept as a new
finding and said). A file name found in two sub-folders is refused (which one the row means cannot be
told); files whose real path leaves the folder (symbolic links) are not used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from medsight.data.imageio import IMAGE_EXTS
from medsight.data.multilabel import NIH_FINDINGS, NO_FINDING
from medsight.data.readers.rows import ManifestRows, PathRules, Table, listed, select_rows, split_by_column
from medsight.data.sources import DataError, SplitData

__all__ = ["is_nih_manifest", "read_nih"]

log = logging.getLogger(__name__)


def is_nih_manifest(fields: list[str]) -> bool:
    return "Finding Labels" in fields and "Image Index" in fields


def _image_index(rules: PathRules) -> tuple[dict[str, str], dict[str, list[str]]]:
    """File name -> path of every image under the manifest's folder, and the names found more than once."""
    found: dict[str, str] = {}
    twice: dict[str, list[str]] = {}
    for root, _, files in os.walk(rules.base):
        for f in files:
            if os.path.splitext(f)[1].lower() not in IMAGE_EXTS:
                continue
            p = os.path.join(root, f)
            if f in found:
                twice.setdefault(f, [found[f]]).append(p)
            else:
                found[f] = p
    return found, twice


def _findings(path: Path, r: dict[str, str], line: int, name: str) -> list[str]:
    text = (r.get("Finding Labels") or "").strip()
    if not text:
        raise DataError(f"{path}, row {line} ({name}): 'Finding Labels' is empty; write '{NO_FINDING}' for an "
                        f"image without findings")
    findings = [f.strip() for f in text.split("|") if f.strip()]
    if NO_FINDING in findings and len(findings) > 1:
        raise DataError(f"{path}, row {line} ({name}): 'Finding Labels' is '{text}': '{NO_FINDING}' together with "
                        f"findings")
    return [f for f in findings if f != NO_FINDING]


def _classes(path: Path, per_row: list[list[str]], notes: list[str]) -> tuple[list[list[str]], list[str]]:
    """NIH's 14 findings (other spellings of them folded in), then the manifest's new findings."""
    known = {c.casefold().replace(" ", "_"): c for c in NIH_FINDINGS}
    seen = dict.fromkeys(f for fs in per_row for f in fs)
    rename = {f: known[f.casefold().replace(" ", "_")] for f in seen
              if f not in NIH_FINDINGS and f.casefold().replace(" ", "_") in known}
    if rename:
        notes.append("findings spelled differently taken as NIH's: " + ", ".join(f"'{a}' -> '{b}'" for a, b in rename.items()))
        per_row = [[rename.get(f, f) for f in fs] for fs in per_row]
    new = [f for f in dict.fromkeys(f for fs in per_row for f in fs) if f not in NIH_FINDINGS]
    for f in new:
        n = sum(f in fs for fs in per_row)
        msg = (f"finding '{f}' is not one of NIH's 14; kept as a new finding ({n} image{'s' if n != 1 else ''}"
               + (", too few to learn or score well" if n < 5 else "") + ")")
        log.warning("%s: %s", path, msg)
        notes.append(msg)
    return per_row, list(NIH_FINDINGS) + new


def read_nih(table: Table, notes: list[str], skipped: list[str], *, allow_outside_paths: bool = False
             ) -> tuple[dict[str, SplitData], list[str]]:
    """Raw labels (0/1 per finding), patients from ``Patient ID``, the manifest's split when it has one, and
    the other columns as metadata (NIH's own: Patient Age, Patient Gender, View Position)."""
    path, rows, lines = table.path, table.rows, table.lines
    rules = PathRules(path, path.parent, allow_outside_paths)
    files, twice = _image_index(rules)
    has_patient, has_split = "Patient ID" in table.fields, "split" in table.fields
    refs, paths, per_row = [], [], []
    for r, line in zip(rows, lines):
        name = (r.get("Image Index") or "").strip()
        if not name:
            raise DataError(f"{path}, row {line}: 'Image Index' is empty")
        per_row.append(_findings(path, r, line, name))
        if name in twice:
            raise DataError(f"{path}, row {line}: {name} is found in {len(twice[name])} folders "
                            f"({listed(twice[name], 3)}); which one the row means cannot be told: keep one copy")
        refs.append(name)
        where = files.get(name, os.path.join(rules.base, name))  # a name not found: missing, left out below
        if name in files and not rules.inside(where):
            raise DataError(f"{path}, row {line}: {where} links outside the manifest's folder {rules.base}; "
                            f"images must stay inside it (data.allow_outside_paths=true allows others)")
        paths.append(where)
    groups = [(r.get("Patient ID") or "").strip() for r in rows] if has_patient else None
    if groups is not None and "" in groups:
        i = groups.index("")
        raise DataError(f"{path}, row {lines[i]} ({refs[i]}): 'Patient ID' is empty")
    m = ManifestRows(path, lines, refs, paths, [tuple(sorted(fs)) for fs in per_row], groups=groups,
                     splits=[(r.get("split") or "").strip().lower() for r in rows] if has_split else None,
                     real=refs)
    keep = select_rows(m, notes)
    skipped += m.skipped
    kept_findings, classes = _classes(path, [per_row[i] for i in keep], notes)
    index = {c: i for i, c in enumerate(classes)}
    raw = np.zeros((len(keep), len(classes)), dtype=np.float32)
    for i, fs in enumerate(kept_findings):
        raw[i, [index[f] for f in fs]] = 1
    notes.append(f"read as an NIH ChestX-ray14 manifest: {len(classes)} findings from 'Finding Labels' "
                 f"('{NO_FINDING}' = none){', patients from Patient ID' if has_patient else ''}")
    other = [f for f in table.fields if f and f not in ("Image Index", "Finding Labels", "Patient ID", "split")]
    meta = {f: [(rows[i].get(f) or "").strip() for i in keep] for f in other}  # subgroup analysis reads these
    data = SplitData(labels=raw, paths=[paths[i] for i in keep],
                     groups=[groups[i] for i in keep] if groups is not None else None, meta=meta or None)
    return split_by_column(data, [m.splits[i] for i in keep] if m.splits is not None else None, path), classes
