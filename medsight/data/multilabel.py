"""Multi-label data: several findings per image (chest X-rays: effusion *and* cardiomegaly, "No Finding" = none).

Labels of a multi-label split are an (N, K) float32 array: 1 positive, 0 negative, and -1 where the label
is masked (left out of the loss and of that finding's metrics). Readers first return *raw* labels — 1, 0,
-1 for "uncertain" (CheXpert) and NaN for a blank cell — and :func:`apply_label_policy` turns them into
the final array by the run's policy (ignore = masked, ones = U-Ones, zeros = U-Zeros; Irvin et al.,
CheXpert, AAAI 2019), per finding where asked.

Sources, each read as published (TorchXRayVision's idea of one reader per public layout):

* NIH ChestX-ray14's ``Data_Entry_2017.csv`` style: ``Image Index`` (file name, found anywhere under the
  CSV's folder, e.g. ``images_001/images/``), ``Finding Labels`` (findings joined by ``|``, ``No Finding``
  = none), ``Patient ID`` (patient-level split) and an optional ``split`` column;
* CheXpert's ``train.csv`` style: a path column and one column per finding (1, 0, -1 uncertain, blank),
  the finding columns named by ``data.label_columns`` or found as the numeric columns besides path,
  patient, split and known metadata (Sex, Age, Frontal/Lateral, AP/PA);
* an .npz whose labels are N×K 0/1 (ChestMNIST), read in :mod:`medsight.data.sources`.

Splits keep patients whole and rare findings in every split where possible (:func:`multilabel_split`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medsight.data.imageio import IMAGE_EXTS
from medsight.errors import MedsightError

__all__ = ["NIH_FINDINGS", "NO_FINDING", "METADATA_COLUMNS", "apply_label_policy", "multilabel_split",
           "is_nih_manifest", "read_nih_manifest", "finding_columns", "read_finding_columns", "MultiLabelDataError"]

log = logging.getLogger(__name__)

#: ChestX-ray14's findings in ChestMNIST's label order (new findings in a manifest are appended after these).
NIH_FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]
NO_FINDING = "No Finding"
#: Columns of a per-finding CSV that are never findings (compared case-insensitively).
METADATA_COLUMNS = ("path", "patient_id", "patient id", "patient", "split", "sex", "age", "frontal/lateral",
                    "ap/pa", "view", "view position", "image index", "study", "study_id", "image_id")
_UNCERTAIN, _MASKED = -1.0, -1.0
_POLICY_VALUE = {"ones": 1.0, "zeros": 0.0, "ignore": _MASKED}


class MultiLabelDataError(MedsightError, ValueError):
    """Multi-label data that cannot be used (raised as :class:`medsight.data.DataError` by the readers)."""


# ------------------------------------------------------------------------------------------- policies

def apply_label_policy(raw: np.ndarray, classes: Sequence[str], uncertain: str = "ignore", blank: str = "ignore",
                       per_finding: Mapping[str, str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Raw labels (1, 0, -1 uncertain, NaN blank) -> final labels (1, 0, -1 masked), and what was done.

    Args:
        uncertain: the run's policy for uncertain labels: ignore (masked), ones, zeros.
        blank: the policy for blank cells (the finding was not mentioned).
        per_finding: finding name -> policy for that finding's uncertain labels (over ``uncertain``).
    """
    raw = np.asarray(raw, dtype=np.float32)
    per_finding = dict(per_finding or {})
    unknown = sorted(set(per_finding) - set(classes))
    if unknown:
        raise MultiLabelDataError(f"data.uncertain_per_finding names {', '.join(unknown)}, which the data does not "
                                  f"have; its findings are {', '.join(classes)}")
    out = raw.copy()
    notes = []
    blanks = np.isnan(raw)
    if blanks.any():
        out[blanks] = _POLICY_VALUE[blank]
        notes.append(f"{int(blanks.sum())} blank label(s) (finding not mentioned): {blank}"
                     + (" (masked out of loss and metrics)" if blank == "ignore" else ""))
    for k, name in enumerate(classes):
        col = raw[:, k] == _UNCERTAIN
        if col.any():
            policy = per_finding.get(name, uncertain)
            out[col, k] = _POLICY_VALUE[policy]
            notes.append(f"{name}: {int(col.sum())} uncertain label(s) -> {policy}"
                         + (" (masked)" if policy == "ignore" else ""))
    return out, notes


# ------------------------------------------------------------------------------------------- splits

def multilabel_split(labels: np.ndarray, fraction: float, seed: int,
                     groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held) holding out about ``fraction`` of the images, patients whole, every finding's
    positives shared out as evenly as the patients allow.

    Iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML PKDD 2011) over *patients*: each
    patient is a unit carrying the positives of all its images; the rarest finding's patients are placed
    first, each into the side whose demand for that finding is largest. Written here because the
    libraries that implement it (iterative-stratification, scikit-multilearn) split images, not patients.
    """
    labels = np.asarray(labels)
    n = len(labels)
    rng = np.random.default_rng(seed)
    keys = list(groups) if groups is not None else [str(i) for i in range(n)]
    unit_ids: dict[str, int] = {}
    unit_of = np.array([unit_ids.setdefault(g, len(unit_ids)) for g in keys])
    n_units = len(unit_ids)
    pos = (labels == 1).astype(np.float64)
    unit_pos = np.zeros((n_units, labels.shape[1]))
    np.add.at(unit_pos, unit_of, pos)
    unit_size = np.bincount(unit_of, minlength=n_units).astype(np.float64)
    share = np.array([1 - fraction, fraction])
    demand_images = share * n
    demand = share[:, None] * unit_pos.sum(0)[None, :]  # (2 sides, K) positives each side still wants
    side_of = np.full(n_units, -1)
    order = rng.permutation(n_units)  # ties broken at random, with the seed
    while (side_of == -1).any():
        left = order[side_of[order] == -1]
        carrying = left[unit_pos[left].sum(1) > 0]
        if len(carrying):
            counts = unit_pos[left].sum(0)
            k = int(np.argmin(np.where(counts > 0, counts, np.inf)))  # the rarest finding still unplaced
            batch = left[unit_pos[left, k] > 0]
        else:
            k, batch = None, left
        for u in batch:
            if k is not None:
                want = demand[:, k]
                best = np.flatnonzero(want == want.max())
            else:
                best = np.array([0, 1])
            if len(best) > 1:  # then by images still wanted
                best = best[demand_images[best] == demand_images[best].max()]
            side = int(rng.choice(best))
            side_of[u] = side
            demand[side] -= unit_pos[u]
            demand_images[side] -= unit_size[u]
    held_units = side_of == 1
    if not held_units.any() or held_units.all():  # too few patients to split: hold out one at random
        held_units[:] = False
        held_units[rng.integers(n_units)] = True
    held = held_units[unit_of]
    return np.flatnonzero(~held), np.flatnonzero(held)


# ------------------------------------------------------------------------------------------- NIH style

def is_nih_manifest(fields: Sequence[str]) -> bool:
    return "Finding Labels" in fields and "Image Index" in fields


def _image_index(folder: Path) -> dict[str, str]:
    """File name -> path of every image under ``folder`` (NIH ships images_001/images/... folders)."""
    found: dict[str, str] = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if os.path.splitext(f)[1].lower() in IMAGE_EXTS:
                found.setdefault(f, os.path.join(root, f))
    return found


def read_nih_manifest(path: Path, rows: list[dict[str, str]], lines: list[int]
                      ) -> tuple[np.ndarray, list[str], list[str], list[str] | None, list[str] | None, list[str],
                                 dict[str, list[str]] | None]:
    """``(raw labels, classes, paths, patients, splits, notes, meta)`` of an NIH-style manifest; ``meta`` holds
    the manifest's other columns per kept row (NIH's own has Patient Age, Patient Gender, View Position).

    Findings are NIH's 14 in ChestMNIST order, then any other finding the manifest names (kept as a new
    finding and said). Rows whose image file is missing are skipped and named; none found is an error.
    """
    notes: list[str] = []
    files = _image_index(path.parent)
    per_row: list[list[str]] = []
    paths, patients, splits, missing, kept = [], [], [], [], []
    has_patient, has_split = "Patient ID" in rows[0], "split" in rows[0]
    seen: dict[str, int] = {}
    for r, line in zip(rows, lines):
        name = (r.get("Image Index") or "").strip()
        text = (r.get("Finding Labels") or "").strip()
        if not name:
            raise MultiLabelDataError(f"{path}, row {line}: 'Image Index' is empty")
        if not text:
            raise MultiLabelDataError(f"{path}, row {line} ({name}): 'Finding Labels' is empty; write "
                                      f"'{NO_FINDING}' for an image without findings")
        findings = [f.strip() for f in text.split("|") if f.strip()]
        if NO_FINDING in findings and len(findings) > 1:
            raise MultiLabelDataError(f"{path}, row {line} ({name}): 'Finding Labels' is '{text}': '{NO_FINDING}' "
                                      f"together with findings")
        if name in seen:
            raise MultiLabelDataError(f"{path}: {name} is listed twice (rows {seen[name]} and {line})")
        seen[name] = line
        if name not in files:
            missing.append(f"{name} (row {line})")
            continue
        per_row.append([f for f in findings if f != NO_FINDING])
        paths.append(files[name])
        kept.append(r)
        if has_patient:
            pid = (r.get("Patient ID") or "").strip()
            if not pid:
                raise MultiLabelDataError(f"{path}, row {line} ({name}): 'Patient ID' is empty")
            patients.append(pid)
        if has_split:
            splits.append((r.get("split") or "").strip().lower())
    if not paths:
        raise MultiLabelDataError(f"{path}: none of the {len(rows)} images in 'Image Index' is under {path.parent} "
                                  f"(looked for e.g. {', '.join(m.split(' ')[0] for m in missing[:3])})")
    if missing:
        msg = (f"{len(missing)} of {len(rows)} images named in {path.name} are not under {path.parent}: skipped "
               f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
        log.warning("%s", msg)
        notes.append(msg)
    counts: dict[str, int] = {}
    for fs in per_row:
        for f in fs:
            counts[f] = counts.get(f, 0) + 1
    known_folded = {c.casefold().replace(" ", "_"): c for c in NIH_FINDINGS}
    rename = {f: known_folded[f.casefold().replace(" ", "_")] for f in counts
              if f not in NIH_FINDINGS and f.casefold().replace(" ", "_") in known_folded}
    if rename:
        notes.append("findings spelled differently taken as NIH's: " + ", ".join(f"'{a}' -> '{b}'" for a, b in rename.items()))
        per_row = [[rename.get(f, f) for f in fs] for fs in per_row]
    new = [f for f in dict.fromkeys(f for fs in per_row for f in fs) if f not in NIH_FINDINGS]
    classes = list(NIH_FINDINGS) + new
    for f in new:
        n = sum(f in fs for fs in per_row)
        msg = (f"finding '{f}' is not one of NIH's 14; kept as a new finding ({n} image{'s' if n != 1 else ''}"
               + (", too few to learn or score well" if n < 5 else "") + ")")
        log.warning("%s: %s", path, msg)
        notes.append(msg)
    index = {c: i for i, c in enumerate(classes)}
    raw = np.zeros((len(per_row), len(classes)), dtype=np.float32)
    for i, fs in enumerate(per_row):
        raw[i, [index[f] for f in fs]] = 1
    notes.append(f"read as an NIH ChestX-ray14 manifest: {len(classes)} findings from 'Finding Labels' "
                 f"('{NO_FINDING}' = none){', patients from Patient ID' if has_patient else ''}")
    other = [f for f in rows[0] if f and f not in ("Image Index", "Finding Labels", "Patient ID", "split")]
    meta = {f: [(r.get(f) or "").strip() for r in kept] for f in other}  # subgroup analysis reads these
    return raw, classes, paths, patients if has_patient else None, splits if has_split else None, notes, meta or None


# ------------------------------------------------------------------------------------- CheXpert style

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
                raise MultiLabelDataError(f"{path}, row {line}, column '{c}': '{v}' is {what}; a finding column "
                                          f"holds 1 (positive), 0 (negative), -1 (uncertain) or nothing (blank). "
                                          f"Fix the value, or leave the column out with data.label_columns")
            raw[i, k] = x
    return raw


def patient_from_path(p: str) -> str | None:
    """CheXpert's and MIMIC's paths carry the patient: ``.../patient00001/study1/...``, ``.../p10000032/...``."""
    m = re.search(r"(?:^|[/\\])(patient\d+|p\d{6,})(?:[/\\])", p)
    return m.group(1) if m else None


def describe_choice(columns: Sequence[str], given: bool) -> str:
    how = "named by data.label_columns" if given else "found as the numeric columns besides path, patient, split " \
                                                       "and metadata (name them with data.label_columns)"
    return f"multi-label CSV: {len(columns)} finding columns {how}: {', '.join(columns)}"

