"""The row pipeline every manifest reader goes through: one set of rules for every format.

A reader (single-label CSV, CheXpert-style finding columns, NIH's ``Finding Labels``, a published grading
CSV) parses its own label columns; everything else about a row is decided here, the same way for all:

* **paths**: relative to the manifest's folder, resolved (symbolic links followed) before the check that
  they stay inside it, unless ``data.allow_outside_paths``; a refused path names its row;
* **duplicates**: rows naming the same file (after resolution) with the same label, split and patient are
  merged into one and said; rows that disagree are refused, naming both rows;
* **missing files**: left out, listed in the notes and in ``skipped`` (the run's skipped_files);
* **patients**: a patient column with a blank cell is refused naming the row; patients read from paths
  (CheXpert's ``patientNNNNN``) give a row without one its own patient, and the notes say how many;
* **splits**: the manifest's own ``split`` column, checked for a patient in two splits.
"""

from __future__ import annotations

import csv
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsight.data.sources import SPLITS, DataError, SplitData

__all__ = ["Table", "read_csv", "PathRules", "ManifestRows", "select_rows", "split_by_column", "check_no_group_leak",
           "listed", "labels_from_names"]

log = logging.getLogger(__name__)


def listed(items: Sequence[str], n: int = 5) -> str:
    """The first ``n`` items joined, with the count when there are more."""
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


@dataclass
class Table:
    """A CSV manifest as written: field names, rows (values unstripped) and the file line each row ends on."""

    path: Path
    fields: list[str]
    rows: list[dict[str, str]]
    lines: list[int]  # the header is line 1


def read_csv(path: Path) -> Table:
    """Read a manifest once (it can hold hundreds of thousands of rows); unreadable text is refused."""
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
    if not rows:
        raise DataError(f"CSV manifest {path} has no rows")
    return Table(path, fields, rows, lines)


def _inside(path: str, folder: str) -> bool:
    """Whether normalized absolute ``path`` lies in normalized absolute ``folder`` (a prefix test: per row
    of a 250,000-row manifest, ``os.path.commonpath`` took seconds)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class PathRules:
    """Resolve a manifest's paths: relative to ``base``, symbolic links followed, kept inside ``base``'s real
    folder unless ``allow_outside``. ``real`` of a resolved path is its file's identity (for duplicates)."""

    def __init__(self, source: Path, base: Path, allow_outside: bool) -> None:
        self.source, self.allow_outside = source, allow_outside
        self.base = os.path.normpath(base.absolute())
        self.real_base = os.path.realpath(self.base)
        self._dirs: dict[str, str] = {}  # folder -> its real path, resolved once per folder

    def _real_dir(self, folder: str) -> str:
        if folder not in self._dirs:
            self._dirs[folder] = os.path.realpath(folder)
        return self._dirs[folder]

    def real(self, full: str) -> str:
        """The real path of ``full``: its folder's real path, and the link's target when it is a link."""
        try:
            if stat.S_ISLNK(os.lstat(full).st_mode):
                return os.path.realpath(full)
        except OSError:
            pass  # missing: its folder tells where it would be
        folder, name = os.path.split(full)
        return os.path.join(self._real_dir(folder), name)

    def inside(self, full: str) -> bool:
        return self.allow_outside or _inside(self.real(full), self.real_base)

    def resolve(self, raw: str, line: int, column: str) -> str:
        """The normalized absolute path of ``raw`` (as written in ``column`` on ``line``), refused when it or the
        file it links to lies outside the manifest's folder."""
        if not raw:
            raise DataError(f"CSV manifest {self.source}, row {line}: empty {column}")
        full = os.path.normpath(os.path.join(self.base, os.path.expanduser(raw)))
        if not self.inside(full):
            raise DataError(f"CSV manifest {self.source}, row {line}: {raw} lies outside the manifest's folder "
                            f"{self.base} (symbolic links followed); paths must stay inside it "
                            f"(data.allow_outside_paths=true allows others)")
        return full


@dataclass
class ManifestRows:
    """Rows of one manifest, parsed by a reader: per row its line, the path as written, the resolved path,
    a label key (compared between duplicate rows), and optionally patient and split."""

    source: Path
    lines: list[int]
    refs: list[str]
    paths: list[str]
    label_keys: list[Any]
    groups: list[str | None] | None = None
    splits: list[str] | None = None
    real: list[str] | None = None  # file identities (real paths); the paths themselves when not given
    skipped: list[str] = field(default_factory=list)  # "file (row n): reason" of the rows left out

    def where(self, i: int) -> str:
        return f"{self.refs[i]} (row {self.lines[i]})"


def _merge_duplicates(m: ManifestRows, notes: list[str]) -> list[int]:
    """Rows in order with later rows naming an earlier row's file dropped; a disagreement is refused."""
    keys = m.real if m.real is not None else m.paths
    first: dict[str, int] = {}
    keep, dropped = [], []
    for i, k in enumerate(keys):
        j = first.setdefault(k, i)
        if j == i:
            keep.append(i)
            continue
        for noun, values in (("label", m.label_keys), ("split", m.splits), ("patient", m.groups)):
            if values is not None and values[i] != values[j]:
                raise DataError(f"CSV manifest {m.source}: {m.refs[i]} has {noun} '{_shown(values[j])}' on row "
                                f"{m.lines[j]} and '{_shown(values[i])}' on row {m.lines[i]}; one image has one {noun}")
        dropped.append(str(m.lines[i]))
    if dropped:
        msg = (f"dropped {len(dropped)} duplicate row(s) of {m.source.name} naming an image an earlier row names "
               f"with the same label (rows {listed(dropped)})")
        log.warning("%s: %s", m.source, msg)
        notes.append(msg)
    return keep


def _shown(v: Any) -> str:
    return ", ".join(map(str, v)) if isinstance(v, tuple) else str(v)


def _drop_missing(m: ManifestRows, keep: list[int], notes: list[str]) -> list[int]:
    """Rows whose file is not a regular file are left out, listed in the notes and in ``m.skipped``."""
    missing = [i for i in keep if not os.path.isfile(m.paths[i])]
    if not missing:
        return keep
    gone = set(missing)
    keep = [i for i in keep if i not in gone]
    if not keep:
        raise DataError(f"CSV manifest {m.source}: none of its {len(m.paths)} image files exists "
                        f"(e.g. {m.paths[missing[0]]})")
    m.skipped += [f"{m.paths[i]} (row {m.lines[i]}): file not found" for i in missing]
    msg = (f"{len(missing)} image file(s) named in {m.source.name} do not exist and were left out: "
           f"{listed([m.where(i) for i in missing])}")
    log.warning("%s: %s", m.source, msg)
    notes.append(msg)
    return keep


def select_rows(m: ManifestRows, notes: list[str]) -> list[int]:
    """The rows to keep, by the shared rules: duplicates merged or refused, missing files left out, every
    kept row with a patient (its own where the manifest gives none), and a split that is all or nothing."""
    if m.splits is not None and any(m.splits) and "" in m.splits:
        raise DataError(f"CSV manifest {m.source}, row {m.lines[m.splits.index('')]}: split is blank, while other "
                        f"rows name one; give every row train, val or test, or leave the column empty everywhere")
    keep = _drop_missing(m, _merge_duplicates(m, notes), notes)
    if m.groups is not None:
        own = [i for i in keep if not m.groups[i]]
        if own:
            for i in own:
                m.groups[i] = f"row {m.lines[i]}"
            msg = (f"{len(own)} of {len(keep)} rows carry no patient: each is taken as its own patient "
                   f"(row{'s' if len(own) > 1 else ''} {listed([str(m.lines[i]) for i in own])}); give every row its patient to keep a "
                   f"patient's images in one split")
            log.warning("%s: %s", m.source, msg)
            notes.append(msg)
    return keep


def split_by_column(data: SplitData, names: list[str] | None, source: Path) -> dict[str, SplitData]:
    """The manifest's own ``split`` column (train/val/test), checked for patients in two splits; or one
    ``all`` split when the column is absent or empty."""
    if names is None or not any(names):
        return {"all": data}
    if "" in names:
        raise DataError(f"CSV manifest {source}: split is blank on some rows while others name one; give every "
                        f"row train, val or test, or leave the column empty everywhere")
    bad = sorted(set(names) - set(SPLITS))
    if bad:
        raise DataError(f"CSV manifest {source}: split must be train, val or test; found {', '.join(bad)}")
    splits = {s: data.subset(np.array([i for i, n in enumerate(names) if n == s], dtype=np.int64))
              for s in SPLITS if s in names}
    if data.groups is not None:
        check_no_group_leak(splits, source)
    return splits


def check_no_group_leak(splits: dict[str, SplitData], source: Path | str) -> None:
    """Refuse a patient whose images lie in two splits."""
    seen: dict[str, str] = {}
    for name, s in splits.items():
        for g in set(s.groups or []):
            if g in seen and seen[g] != name:
                raise DataError(f"{source}: patient '{g}' appears in both '{seen[g]}' and '{name}' splits")
            seen[g] = name


def labels_from_names(names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Integer labels and the class names they index: numbers in numeric order, then other names sorted."""
    def order(c: str) -> tuple[bool, int, str]:
        number = c.lstrip("-").isdigit()
        return (not number, int(c) if number else 0, c)

    classes = sorted(set(names), key=order)
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64), classes
