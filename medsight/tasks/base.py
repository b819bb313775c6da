"""The Task seam: everything that depends on what a label *is* lives in one object.

A task kind owns the head's activation, the training loss, the decision rule, the metrics, the
validation value that picks the best epoch, what ``predict`` returns, and which output Grad-CAM
explains. The engine, evaluation, reports, inference, serving, export and ensembles ask the task and
never assume softmax or argmax. A task is stored in every checkpoint (:meth:`Task.state`) and rebuilt
from it (:func:`medsight.tasks.task_from_state`), so every command restores the same rules.

A new task kind is a subclass in its own module of this folder, registered in ``TASKS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from medsight.metrics.calibration import fit_temperature, reliability_bins
from medsight.metrics.conformal import fit_conformal, prediction_sets, set_metrics

if TYPE_CHECKING:
    from medsight.config import Config

__all__ = ["Task", "GalleryGroup", "correct_and_wrong_groups", "Temperature", "BinaryView"]

#: (name, y_true_binary, score): one yes/no question a task's probabilities answer (a class against the rest,
#: the referable grades, a finding), for operating points, per-finding calibration and subgroup gaps.
BinaryView = tuple[str, np.ndarray, np.ndarray]


class Temperature(nn.Module):
    """Divides logits by fitted temperatures (one, or one per output), after subtracting a per-output offset
    when one is given: the calibration step of an ONNX graph."""

    def __init__(self, temperature: float | list[float], offset: list[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("t", torch.as_tensor(temperature, dtype=torch.float32))
        self.register_buffer("b", torch.as_tensor(offset if offset is not None else 0.0, dtype=torch.float32))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits - self.b) / self.t

#: (title, indices of images to show, output index explained for each of them)
GalleryGroup = tuple[str, list[int], list[int]]


def correct_and_wrong_groups(classes: list[str], labels: np.ndarray, pred: np.ndarray, per_group: int,
                             rng: np.random.Generator, wrong: str, title: str = "{name}") -> list[GalleryGroup]:
    """Per class, up to ``per_group`` test images decided right and decided wrong (each explained for the
    decided class): the gallery of one-decision-per-image tasks."""
    groups: list[GalleryGroup] = []
    for c, name in enumerate(classes):
        for kind, mask in (("correct", (labels == c) & (pred == c)), (wrong, (labels == c) & (pred != c))):
            idx = np.flatnonzero(mask)
            pick = [int(i) for i in rng.choice(idx, size=min(per_group, len(idx)), replace=False)] if len(idx) else []
            groups.append((f"{title.format(name=name)}: {kind}", pick, [int(pred[i]) for i in pick]))
    return groups


class Task(ABC):
    """One kind of label. Subclasses set ``kind`` and implement the abstract methods."""

    kind: ClassVar[str]

    def __init__(self, classes: list[str], decision: dict[str, Any] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.classes = list(classes)
        self.decision: dict[str, Any] = dict(decision or {})
        self.options: dict[str, Any] = dict(options or {})

    @classmethod
    def options_from(cls, cfg: Config) -> dict[str, Any]:
        """The task's own settings from a run's config (e.g. an ordinal head), stored with the task."""
        return {}

    # ---------------------------------------------------------------------------------------- head
    @property
    def num_outputs(self) -> int:
        """Width of the model's last layer."""
        return len(self.classes)

    @abstractmethod
    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> probabilities (what every consumer of the model reads)."""

    @abstractmethod
    def activation_module(self) -> nn.Module:
        """The activation as a module, for graphs that carry it inside (ONNX export)."""

    # --------------------------------------------------------------------------------- calibration
    @property
    def temperature(self) -> float | list[float] | None:
        """The fitted temperature (None: uncalibrated); a list holds one per output (multi-label findings)."""
        return self.decision.get("temperature")

    @property
    def calibratable(self) -> bool:
        """Whether temperature scaling applies to this task's logits without changing its decisions."""
        return True

    @property
    def logit_offset(self) -> list[float] | None:
        """A per-output shift the training loss put into the logits, which calibration subtracts before the
        temperature (None: none). Multi-label training with positive weights w shifts each finding by log w."""
        return self.decision.get("loss_logit_offset")

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        """(Logits − :attr:`logit_offset`) divided by the fitted temperature (unchanged when none is fitted)."""
        t, b = self.temperature, self.logit_offset
        if t is None:
            return logits
        if b is not None:
            logits = logits - torch.as_tensor(b, dtype=logits.dtype, device=logits.device)
        return logits / torch.as_tensor(t, dtype=logits.dtype, device=logits.device)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities: what every consumer of a fitted model reads (predict, serve, export,
        ensembles, evaluation). :meth:`activation` stays the raw one that training uses."""
        return self.activation(self.calibrate(logits))

    def calibration_module(self) -> nn.Module:
        """The calibration step as a module (ONNX export): :meth:`calibrate`'s subtraction and division, or
        identity."""
        return nn.Identity() if self.temperature is None else Temperature(self.temperature, self.logit_offset)

    def temperature_nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of the true labels under :meth:`activation` of (scaled) logits."""
        p = self.activation(logits).clamp_min(1e-12)
        return -p.gather(1, labels.long()[:, None]).log().mean()

    def fit_temperature(self, val_logits: np.ndarray, val_labels: np.ndarray) -> None:
        """Temperature scaling (Guo et al. 2017) on validation logits; stored in the decision. A multi-label
        task overrides this to fit one temperature per finding."""
        self.decision.pop("temperature", None)
        if self.calibratable and len(np.unique(val_labels)) > 1:
            self.decision["temperature"] = fit_temperature(val_logits, val_labels, self.temperature_nll)

    # ------------------------------------------------------------------------------------ training
    @abstractmethod
    def make_loss(self, cfg: Config, train_labels: np.ndarray) -> nn.Module:
        """The training loss for ``cfg``, given the training split's labels (for class weights)."""

    @abstractmethod
    def eval_loss(self) -> nn.Module:
        """The plain (unweighted) loss reported on validation data."""

    @abstractmethod
    def batch_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Correct decisions in a training batch (a device tensor: no host sync)."""

    # ------------------------------------------------------------------------------------ decision
    def fit_decision(self, val_labels: np.ndarray, val_probs: np.ndarray) -> None:
        """Choose the decision rule's free parameters on validation data (never on test)."""

    @abstractmethod
    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities (N, K) -> decisions, one per image."""

    # ---------------------------------------------------------------------------------------- trust
    def binary_views(self, labels: np.ndarray, probs: np.ndarray) -> list[BinaryView]:
        """The yes/no questions the probabilities answer: for two classes the second class; for more, each
        class against the rest. Ordinal (referable grades) and multi-label (each finding) override it."""
        y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
        classes = self.classes[1:] if len(self.classes) == 2 else self.classes
        return [(c, (y == self.classes.index(c)).astype(int), p[:, self.classes.index(c)]) for c in classes]

    def view_labelled(self, labels: np.ndarray) -> np.ndarray:
        """(N, V) bool: which images each of :meth:`binary_views` keeps (all of them, unless labels are masked),
        so that per-image data such as subgroups lines up with a view's arrays."""
        n = len(np.asarray(labels))
        return np.ones((n, len(self.binary_views(labels, np.full((n, len(self.classes)), 0.5)))), dtype=bool)

    def errors(self, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """0/1 per image: the decision is wrong (what selective prediction's risk counts); multi-label gives the
        share of findings wrong."""
        return (self.decide(probs) != np.asarray(labels)).astype(int)

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """How sure the model is per image (higher = surer): the probability of the most probable class.
        The abstention rule refers images below a threshold of it."""
        return np.asarray(probs, dtype=np.float64).max(1)

    def reliability(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
        """The reliability diagram's bins and ECE of the whole output: top-label confidence against being right.
        Multi-label pools every labelled (image, finding) probability instead."""
        return reliability_bins(self.confidence(probs), 1 - self.errors(labels, probs))

    def tta_spread(self, views: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Per image, how much TTA views (V, N, K) disagree: the spread of the decided output's probability."""
        decided = self.decide(probs)
        return views[:, np.arange(len(decided)), decided].std(0)

    def fit_conformal(self, labels: np.ndarray, probs: np.ndarray, coverage: float, method: str = "lac",
                      class_conditional: bool = False) -> dict[str, Any]:
        """Split conformal prediction sets of classes, calibrated on validation (see :mod:`medsight.metrics.conformal`)."""
        return fit_conformal(labels, probs, coverage, method, class_conditional)

    def conformal_metrics(self, labels: np.ndarray, probs: np.ndarray, conformal: dict[str, Any]) -> dict[str, Any]:
        """Empirical coverage, mean set size and single-answer rate of the fitted sets on ``labels``."""
        return set_metrics(labels, prediction_sets(probs, conformal))

    def answer(self, probs: np.ndarray) -> dict[str, Any]:
        """:meth:`record` plus, when an abstention threshold was fitted, whether to refer to a clinician."""
        rec = self.record(probs)
        below = self.decision.get("abstain_below")
        if below is not None:
            conf = float(self.confidence(np.asarray(probs)[None])[0])
            rec["confidence"] = conf
            rec["refer_to_clinician"] = bool(conf < below)
        return rec

    # ------------------------------------------------------------------------------------- metrics
    @abstractmethod
    def metrics(self, labels: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000,
                seed: int = 0) -> dict[str, Any]:
        """Every metric of this task, with bootstrap intervals when ``n_boot``."""

    @abstractmethod
    def epoch_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        """The cheap validation metrics printed each epoch: ``acc`` and ``auc`` at least, plus every name
        ``train.monitor`` may ask for."""

    def monitor_value(self, epoch_metrics: dict[str, float | None], val_loss: float, monitor: str) -> float:
        """Higher is better: the value that picks best.pt."""
        if monitor == "loss":
            return -val_loss
        v = epoch_metrics.get(monitor)
        return float("-inf") if v is None else float(v)

    @abstractmethod
    def summary(self, m: dict[str, Any]) -> str:
        """One console line for a metrics dict of :meth:`metrics`."""

    @abstractmethod
    def checklist(self, m: dict[str, Any], thresholds: dict[str, float | None]) -> dict[str, Any] | None:
        """PASS/FAIL lines for the configured thresholds, or None when none is set."""

    # ------------------------------------------------------------------------------------- reports
    @abstractmethod
    def report_tables(self, metrics: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
        """(title, header, rows) tables for the HTML report."""

    @abstractmethod
    def gallery_groups(self, labels: np.ndarray, probs: np.ndarray, per_group: int,
                       rng: np.random.Generator) -> list[GalleryGroup]:
        """Which test images the Grad-CAM gallery shows, and which output each one explains."""

    # ----------------------------------------------------------------------------------- inference
    @abstractmethod
    def record(self, probs: np.ndarray) -> dict[str, Any]:
        """What ``predict`` and the REST API return for one image's probabilities (1-D)."""

    def explained_output(self, probs: np.ndarray) -> int:
        """The output Grad-CAM explains by default for one image: the decided class."""
        return int(self.decide(probs[None])[0])

    def border_outputs(self, labels: np.ndarray, probs: np.ndarray) -> list[int]:
        """The outputs whose heatmaps score one image's border (shortcut) heat: by default the explained one."""
        return [self.explained_output(probs)]

    def per_image_correct(self, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Per image: was the decision right (for ensemble diversity)."""
        return self.decide(probs) == np.asarray(labels)

    # -------------------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """Plain data for the checkpoint: kind, classes, the fitted decision rule (and options, if any)."""
        state = {"kind": self.kind, "classes": list(self.classes), "decision": dict(self.decision)}
        if self.options:
            state["options"] = dict(self.options)
        return state
