"""Task kinds: what a label is. Each kind is one :class:`Task` subclass in its own module, registered in
``TASKS`` under a name of ``medsight.config.TaskKind``; a new kind (multi-label, ordinal) goes here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from medsight.config import TaskKind, choices
from medsight.tasks.base import Task
from medsight.tasks.heads import Head, TaskConfigError
from medsight.tasks.multilabel import MultiLabelTask
from medsight.tasks.ordinal import OrdinalTask
from medsight.tasks.readout import BinaryView, GalleryGroup, Readout
from medsight.tasks.rules import FittedRules, RulesError
from medsight.tasks.single_label import SingleLabelTask

if TYPE_CHECKING:
    from medsight.config import Config

__all__ = ["Task", "TASKS", "GalleryGroup", "BinaryView", "Readout", "Head", "FittedRules", "RulesError",
           "SingleLabelTask", "OrdinalTask", "MultiLabelTask", "TaskConfigError", "build_task", "task_from_state",
           "task_from_checkpoint", "infer_kind", "fresh_task"]

TASKS: dict[str, type[Task]] = {cls.kind: cls for cls in (SingleLabelTask, OrdinalTask, MultiLabelTask)}
# every kind the config accepts has an implementation, and no implementation is unreachable
assert set(TASKS) | {"auto"} == set(choices(TaskKind)), "medsight.config.TaskKind and TASKS disagree"


def infer_kind(labels: np.ndarray) -> str:
    """The task kind the labels imply: N×K findings (1, 0, -1 masked) -> multilabel; one integer per image
    -> single_label (ordinal grades look the same and are asked for with data.task=ordinal)."""
    return "multilabel" if np.asarray(labels).ndim == 2 else "single_label"


def build_task(kind: str, classes: list[str], labels: np.ndarray | None = None, cfg: Config | None = None) -> Task:
    """The task of ``kind`` (``auto``: read from ``labels``) for ``classes``, with its options from ``cfg``."""
    if kind == "auto":
        kind = infer_kind(labels) if labels is not None else "single_label"
    if kind not in TASKS:
        raise TaskConfigError(f"unknown task kind {kind!r}; choose from {', '.join(TASKS)}")
    if labels is not None and (np.asarray(labels).ndim == 2) != (kind == "multilabel"):
        raise TaskConfigError(
            f"data.task={kind} but the labels have {'one column per finding (several findings per image)' if np.asarray(labels).ndim == 2 else 'one class per image'}; "
            f"use data.task={'multilabel' if np.asarray(labels).ndim == 2 else 'single_label or ordinal'} (or auto)")
    cls = TASKS[kind]
    return cls(classes, options=cls.options_from(cfg) if cfg is not None else None)


def task_from_state(state: dict[str, Any]) -> Task:
    """The task a checkpoint stored (:meth:`Task.state`); checkpoints written before the fitted rules had a
    type keep them under ``decision``, which is read the same way."""
    kind = state.get("kind")
    if kind not in TASKS:
        raise TaskConfigError(f"unknown task kind {kind!r} in the checkpoint; this medsight knows {', '.join(TASKS)}")
    rules = state["rules"] if "rules" in state else state.get("decision")
    return TASKS[kind](list(state["classes"]), rules, state.get("options"))


def fresh_task(task: Task) -> Task:
    """The same kind, classes and options with nothing fitted (an ensemble fits its own rules)."""
    return TASKS[task.kind](list(task.classes), None, dict(task.options))


def task_from_checkpoint(ckpt: dict[str, Any]) -> Task:
    """The checkpoint's task; checkpoints written before the task seam are single-label (their binary
    threshold, when present, sits at the top level)."""
    if isinstance(ckpt.get("task"), dict):
        return task_from_state(ckpt["task"])
    rules = {"threshold": float(ckpt["threshold"])} if ckpt.get("threshold") is not None else {}
    return SingleLabelTask(list(ckpt["classes"]), rules)
