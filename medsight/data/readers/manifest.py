"""A single-label CSV manifest: ``path,label[,patient_id][,split]`` (other column names found or given)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from medsight.data.imageio import IMAGE_EXTS
from medsight.data.readers.rows import (ManifestRows, PathRules, Table, labels_from_names, select_rows,
                                        split_by_column)
from medsight.data.sources import DataError, SplitData

__all__ = ["LABEL_COLUMNS", "read_manifest", "looks_like_paths"]

log = logging.getLogger(__name__)

#: Column names taken as the label when a manifest has no ``label`` column (case-insensitive).
LABEL_COLUMNS = ("label", "class", "diagnosis", "level", "finding", "target", "y")


def looks_like_paths(table: Table, column: str, base: Path, sample: int = 50) -> bool:
    """Values that are file names with image extensions, of which at least one exists."""
    values = [v for r in table.rows[:sample] if (v := r.get(column, "").strip())]
    if not values or not all(Path(v).suffix.lower() in IMAGE_EXTS for v in values):
        return False
    return any((base / v).is_file() for v in values)


def _choose_columns(table: Table, base: Path, path_column: str | None, label_column: str | None) -> tuple[str, str]:
    """The path and label columns: as named by the caller, ``path``/``label``, or found where unambiguous."""
    fields, where = table.fields, f"CSV manifest {table.path}"
    for given, key in ((path_column, "path_column"), (label_column, "label_column")):
        if given is not None and given not in fields:
            raise DataError(f"{where} has no column '{given}' (data.{key}); its columns are {', '.join(fields)}")
    pcol = path_column or ("path" if "path" in fields else None)
    if pcol is None:
        found = [f for f in fields if f != label_column and looks_like_paths(table, f, base)]
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


def read_manifest(table: Table, notes: list[str], skipped: list[str], *, allow_outside_paths: bool = False,
                  path_column: str | None = None, label_column: str | None = None
                  ) -> tuple[dict[str, SplitData], list[str]]:
    """Splits and class names of a single-label manifest, through the shared row rules (``rows``)."""
    path = table.path
    rules = PathRules(path, path.parent, allow_outside_paths)
    pcol, lcol = _choose_columns(table, Path(rules.base), path_column, label_column)
    has_split, has_group = "split" in table.fields, "patient_id" in table.fields
    for r, line in zip(table.rows, table.lines):
        if not r.get(lcol, "").strip():
            raise DataError(f"CSV manifest {path}, row {line}: empty label")
    refs = [r.get(pcol, "").strip() for r in table.rows]
    paths = [rules.resolve(ref, line, pcol) for ref, line in zip(refs, table.lines)]
    labels = _canonical_labels([r[lcol] for r in table.rows], path)
    groups = [r.get("patient_id", "").strip() for r in table.rows] if has_group else None
    if groups is not None and "" in groups:
        raise DataError(f"CSV manifest {path}, row {table.lines[groups.index('')]}: patient_id is empty "
                        f"(give every row its patient, or drop the column)")
    m = ManifestRows(path, table.lines, refs, paths, labels, groups=groups,
                     splits=[r.get("split", "").strip().lower() for r in table.rows] if has_split else None,
                     real=[rules.real(p) for p in paths])
    keep = select_rows(m, notes)
    skipped += m.skipped
    codes, classes = labels_from_names([labels[i] for i in keep])
    extra = [f for f in table.fields if f not in (pcol, lcol, "split", "patient_id") and f]
    meta = {f: [table.rows[i].get(f, "").strip() for i in keep] for f in extra}  # subgroup analysis reads these
    data = SplitData(labels=codes, paths=[paths[i] for i in keep],
                     groups=[groups[i] for i in keep] if groups is not None else None, meta=meta or None)
    return split_by_column(data, [m.splits[i] for i in keep] if m.splits is not None else None, path), classes
