"""Classes put in grade order: ``data.grade_order`` names the data's classes lowest grade first.

Folder names and CSV labels sort alphabetically (``mild, moderate, none, proliferative, severe``), which is
no order at all for grades; an ordinal task needs them relabelled so that label i is the i-th grade.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from medsight.errors import MedsightError

__all__ = ["GradeOrderError", "order_grades"]


class GradeOrderError(MedsightError, ValueError):
    """``data.grade_order`` that does not name the data's classes exactly once each."""


def order_grades(splits: dict[str, Any], classes: Sequence[str], order: Sequence[str]
                 ) -> tuple[dict[str, Any], list[str]]:
    """Relabel every split so that class ``i`` is ``order[i]``; names match exactly, or ignoring case and
    surrounding spaces. Returns the relabelled splits and the classes in grade order (as ``order`` spells them)."""
    def key(name: str) -> str:
        return str(name).strip().casefold()

    wanted = {key(n): i for i, n in enumerate(order)}
    have = [key(c) for c in classes]
    unknown = [c for c, k in zip(classes, have) if k not in wanted]
    absent = [n for n in order if key(n) not in have]
    if unknown or absent or len(order) != len(classes):
        parts = ([f"it lacks {', '.join(unknown)}"] if unknown else []) + \
                ([f"the data has no class {', '.join(absent)}"] if absent else [])
        raise GradeOrderError(f"data.grade_order ({', '.join(order)}) must name each of the data's classes "
                              f"({', '.join(classes)}) once: {'; '.join(parts) or 'the counts differ'}")
    remap = np.array([wanted[k] for k in have], dtype=np.int64)
    return {name: replace(s, labels=remap[s.labels]) for name, s in splits.items()}, [str(n) for n in order]
