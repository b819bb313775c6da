"""Single-label classification: one class per image, softmax (or Dirichlet evidence), argmax; for two classes
a Youden threshold chosen on validation is kept too."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from medsight.metrics import auc_score, choose_threshold, classification_metrics
from medsight.tasks.base import Task
from medsight.tasks.heads import Evidential, Head, Softmax, TaskConfigError
from medsight.tasks.readout import Readout

if TYPE_CHECKING:
    from medsight.config import Config

__all__ = ["SingleLabelTask", "TaskConfigError"]


class SingleLabelReadout(Readout):
    """The evidential head's confidence is 1 − u = 1 − K·min_k p_k (Sensoy et al.'s uncertainty), and
    ``predict`` returns u."""

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        p = np.asarray(probs, dtype=np.float64)
        return 1 - np.clip(p.shape[1] * p.min(1), 0, 1) if self.task.evidential else p.max(1)

    def record(self, probs: np.ndarray) -> dict[str, Any]:
        rec = super().record(probs)
        if self.task.evidential:
            rec["uncertainty"] = float(1 - self.confidence(np.asarray(probs)[None])[0])
        return rec


class SingleLabelTask(Task):
    """K mutually exclusive classes. The decision is the most probable class; for two classes the
    Youden-optimal threshold on validation is kept too, and reported as accuracy at that threshold."""

    kind = "single_label"
    Readout = SingleLabelReadout

    @classmethod
    def options_from(cls, cfg: Config) -> dict[str, Any]:
        return {"head": "evidential"} if cfg.train.head == "evidential" else {}

    @property
    def evidential(self) -> bool:
        """A Dirichlet head (train.head=evidential): probabilities α/S, confidence 1 − u (medsight.models.heads)."""
        return self.options.get("head") == "evidential"

    @cached_property
    def head(self) -> Head:
        return (Evidential if self.evidential else Softmax)(len(self.classes))

    def fit_decision(self, val_labels: np.ndarray, val_probs: np.ndarray) -> None:
        self.rules.threshold = None
        if len(self.classes) == 2 and len(np.unique(val_labels)) == 2:
            self.rules.threshold = float(choose_threshold(val_labels == 1, val_probs[:, 1]))

    def metrics(self, labels: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        return classification_metrics(labels, probs, self.classes, n_boot=n_boot, seed=seed,
                                      threshold=self.rules.threshold)

    def epoch_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        pred = self.decide(probs)
        return {"acc": float((pred == labels).mean()), "accuracy": float((pred == labels).mean()),
                "auc": auc_score(labels, probs), "balanced_accuracy": float(balanced_accuracy_score(labels, pred))}
