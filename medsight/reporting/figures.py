"""Each task kind's figures for a run folder or an evaluation: the presentation of a task's predictions lives
here, in reporting, so that a task (and whatever loads one, such as the server) never imports matplotlib.

A new task kind adds its function to ``FIGURES`` under its ``kind`` (until then it has no figures).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsight.reporting.plots import plot_confusion, plot_roc, plot_roc_grid

if TYPE_CHECKING:
    from medsight.tasks import Task

__all__ = ["task_figures", "FIGURES"]

#: (labels, probabilities) per curve name: a split ("val", "test"), a run, or an ensemble.
Curves = dict[str, tuple[np.ndarray, np.ndarray]]


def _single_label(task: Task, out: Path, curves: Curves, test: dict[str, Any], title: str) -> list[str]:
    plot_confusion(test["confusion_matrix"], task.classes, out / "confusion_matrix.png", title=title)
    plot_roc(curves, task.classes, out / "roc.png")
    return ["confusion_matrix.png", "roc.png"]


def _ordinal(task: Task, out: Path, curves: Curves, test: dict[str, Any], title: str) -> list[str]:
    names = _single_label(task, out, curves, test, title)
    refer = {name: ((np.asarray(y) >= task.refer_grade).astype(int),
                    np.stack([1 - task.refer_scores(p), task.refer_scores(p)], 1)) for name, (y, p) in curves.items()}
    plot_roc(refer, ["no referral", "refer"], out / "refer_roc.png")
    return names + ["refer_roc.png"]


def _multilabel(task: Task, out: Path, curves: Curves, test: dict[str, Any], title: str) -> list[str]:
    plot_roc_grid(curves, task.classes, out / "roc_findings.png", thresholds=task.thresholds)
    return ["roc_findings.png"]


FIGURES: dict[str, Callable[[Task, Path, Curves, dict[str, Any], str], list[str]]] = {
    "single_label": _single_label, "ordinal": _ordinal, "multilabel": _multilabel}


def task_figures(task: Task, out: Path, curves: Curves, test: dict[str, Any], title: str = "") -> list[str]:
    """Write the figures of ``task``'s kind for (labels, probs) per curve name into ``out``; returns the file names.
    ``test`` is the task's metrics on test (the confusion matrix)."""
    draw = FIGURES.get(task.kind)
    return draw(task, out, curves, test, title) if draw is not None else []  # a new kind: no figures of its own yet
