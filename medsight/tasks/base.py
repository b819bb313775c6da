"""The Task seam: what a label *is*, in three parts that each change for one reason.

* the **label strategy**: a :class:`Task` subclass per kind (single-label, ordinal, multi-label) with its
  :class:`~medsight.tasks.heads.Head` (activation, losses, the one decoder), its decision rule and metrics,
  and its :class:`~medsight.tasks.readout.Readout` (how one image's probabilities are read: yes/no views,
  confidence, error, conformal sets, what Grad-CAM explains, what ``predict`` returns);
* the **fitted rules**: one typed :class:`~medsight.tasks.rules.FittedRules` (temperature, thresholds,
  cut-points, conformal quantiles, abstention) that validation fits and every consumer reads;
* **presentation** (console line, report tables, checklist, figures) lives in :mod:`medsight.reporting`.

The engine, evaluation, reports, inference, serving, export and ensembles ask the task and never assume
softmax or argmax. A task is stored in every checkpoint (:meth:`Task.state`) and rebuilt from it
(:func:`medsight.tasks.task_from_state`), so every command restores the same rules. A new task kind is a
subclass in its own module of this folder, registered in ``TASKS``; a new head is a
:class:`~medsight.tasks.heads.Head`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from medsight.tasks.readout import Readout
from medsight.tasks.rules import FittedRules

if TYPE_CHECKING:
    from medsight.config import Config
    from medsight.tasks.heads import Head

__all__ = ["Task"]


class Task(ABC):
    """One kind of label. Subclasses set ``kind`` (and ``Readout`` where images are read differently) and
    implement the abstract members."""

    kind: ClassVar[str]
    Readout: ClassVar[type[Readout]] = Readout

    def __init__(self, classes: list[str], rules: FittedRules | dict[str, Any] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.classes = list(classes)
        self.options: dict[str, Any] = dict(options or {})
        self.rules = rules.model_copy(deep=True) if isinstance(rules, FittedRules) else FittedRules.from_state(rules)
        self.readout = self.Readout(self)

    @classmethod
    def options_from(cls, cfg: Config) -> dict[str, Any]:
        """The task's own settings from a run's config (e.g. an ordinal head), stored with the task."""
        return {}

    @property
    @abstractmethod
    def head(self) -> Head:
        """The output layer's strategy: activation, losses, decoder (chosen once from the options)."""

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities: what every consumer of a fitted model reads (predict, serve, export,
        ensembles, evaluation). ``head.activation`` stays the raw one that training uses."""
        return self.head.activation(self.rules.calibrate(logits))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) -> decisions, one per image (the head's decoder, with the fitted rules)."""
        p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
        return self.head.decode(p, self.rules).numpy()

    def fit_decision(self, val_labels: np.ndarray, val_probs: np.ndarray) -> None:
        """Choose the decision rule's free parameters on validation data (never on test)."""

    @abstractmethod
    def metrics(self, labels: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000,
                seed: int = 0) -> dict[str, Any]:
        """Every metric of this task, with bootstrap intervals when ``n_boot``."""

    @abstractmethod
    def epoch_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        """The cheap validation metrics printed each epoch: ``acc`` and ``auc`` at least, plus every name
        ``train.monitor`` may ask for."""

    def state(self) -> dict[str, Any]:
        """Plain data for the checkpoint: kind, classes, the fitted rules (and options, if any)."""
        state = {"kind": self.kind, "classes": list(self.classes), "rules": self.rules.state()}
        if self.options:
            state["options"] = dict(self.options)
        return state
