"""Finished runs as data: the run folder's predictions.npz, metrics.json and task, for compare and ensembles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsight.checkpoint import load_checkpoint
from medsight.errors import MedsightError
from medsight.tasks import Task, task_from_checkpoint
from medsight.reporting.run_report import RunReport

__all__ = ["RunData", "load_run", "check_compatible", "save_predictions", "EnsembleError"]


class EnsembleError(MedsightError, ValueError):
    """Runs that cannot be compared or combined (different classes or test sets, too few runs...)."""


@dataclass
class RunData:
    path: Path
    name: str
    model: str
    classes: list[str]
    val_probs: np.ndarray
    val_labels: np.ndarray
    test_probs: np.ndarray
    test_labels: np.ndarray
    metrics: dict[str, Any]
    task: Task


def load_run(run: str | Path) -> RunData:
    """A run folder's predictions and metrics (``best.pt`` may be given instead of the folder)."""
    p = Path(run)
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise EnsembleError(f"run folder not found: {p}")
    pred_file, metrics_file = p / "predictions.npz", p / "metrics.json"
    for f in (pred_file, metrics_file, p / "best.pt"):
        if not f.is_file():
            raise EnsembleError(f"{p} is not a finished medsight run: {f.name} is missing")
    with np.load(pred_file, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    metrics = RunReport.read(metrics_file).plain()
    ckpt = load_checkpoint(p / "best.pt")
    return RunData(path=p, name=p.name, model=ckpt["config"]["model"]["name"], classes=[str(c) for c in data["classes"]],
                   val_probs=data["val_probs"], val_labels=data["val_labels"], test_probs=data["test_probs"],
                   test_labels=data["test_labels"], metrics=metrics, task=task_from_checkpoint(ckpt))


def check_compatible(runs: list[RunData]) -> None:
    first = runs[0]
    for r in runs[1:]:
        if r.classes != first.classes:
            raise EnsembleError(f"{r.path} has classes {r.classes} but {first.path} has {first.classes}")
        for split in ("val", "test"):
            a, b = getattr(first, f"{split}_labels"), getattr(r, f"{split}_labels")
            if len(a) != len(b) or not np.array_equal(a, b):
                raise EnsembleError(f"{r.path} and {first.path} were evaluated on different {split} sets "
                                    f"({len(b)} vs {len(a)} images, labels {'equal' if np.array_equal(a, b) else 'differ'})")


def save_predictions(out: Path, val_probs: np.ndarray, val_labels: np.ndarray, test_probs: np.ndarray,
                     test_labels: np.ndarray, classes: list[str]) -> None:
    """``predictions.npz``: the validation and test probabilities that compare and ensemble work from."""
    np.savez_compressed(out / "predictions.npz", val_probs=val_probs, val_labels=val_labels, test_probs=test_probs,
                        test_labels=test_labels, classes=np.array(classes))
