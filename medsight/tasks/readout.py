"""How one image's probabilities are read, beyond the decision: the yes/no questions they answer, how sure
and how wrong each answer is, conformal sets, which output Grad-CAM explains and what ``predict`` returns.

:class:`Readout` is the rule for tasks that make one decision per image (single-label classes, ordinal
grades); a kind that reads images otherwise (multi-label findings) subclasses it in its own module. The
readout reads its task's decision (:meth:`medsight.tasks.Task.decide`) and fitted rules; it fits nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from medsight.metrics.calibration import reliability_bins
from medsight.metrics.conformal import fit_conformal, prediction_sets, set_metrics

if TYPE_CHECKING:
    from medsight.tasks.base import Task

__all__ = ["Readout", "BinaryView", "GalleryGroup"]

#: (name, y_true_binary, score): one yes/no question a task's probabilities answer (a class against the rest,
#: the referable grades, a finding), for operating points, per-finding calibration and subgroup gaps.
BinaryView = tuple[str, np.ndarray, np.ndarray]
#: (title, indices of images to show, output index explained for each of them)
GalleryGroup = tuple[str, list[int], list[int]]


class Readout:
    """One decision per image. ``wrong`` and ``title`` word the Grad-CAM gallery's groups."""

    wrong, title = "misclassified", "{name}"

    def __init__(self, task: Task) -> None:
        self.task = task

    @property
    def classes(self) -> list[str]:
        return self.task.classes

    # ---------------------------------------------------------------------------------------- trust
    def binary_views(self, labels: np.ndarray, probs: np.ndarray) -> list[BinaryView]:
        """The yes/no questions the probabilities answer: for two classes the second class; for more, each
        class against the rest."""
        y, p, classes = np.asarray(labels), np.asarray(probs, dtype=np.float64), self.classes
        names = classes[1:] if len(classes) == 2 else classes
        return [(c, (y == classes.index(c)).astype(int), p[:, classes.index(c)]) for c in names]

    def view_labelled(self, labels: np.ndarray) -> np.ndarray:
        """(N, V) bool: which images each of :meth:`binary_views` keeps (all of them, unless labels are masked),
        so that per-image data such as subgroups lines up with a view's arrays."""
        n = len(np.asarray(labels))
        return np.ones((n, len(self.binary_views(labels, np.full((n, len(self.classes)), 0.5)))), dtype=bool)

    def errors(self, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """0/1 per image: the decision is wrong (what selective prediction's risk counts)."""
        return (self.task.decide(probs) != np.asarray(labels)).astype(int)

    def correct(self, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Per image: was the decision right (for ensemble diversity)."""
        return self.errors(labels, probs) == 0

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """How sure the model is per image (higher = surer): the probability of the most probable class.
        The abstention rule refers images below a threshold of it."""
        return np.asarray(probs, dtype=np.float64).max(1)

    def reliability(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
        """The reliability diagram's bins and ECE of the whole output: top-label confidence against being right."""
        return reliability_bins(self.confidence(probs), 1 - self.errors(labels, probs))

    def tta_spread(self, views: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Per image, how much TTA views (V, N, K) disagree: the spread of the decided output's probability."""
        decided = self.task.decide(probs)
        return views[:, np.arange(len(decided)), decided].std(0)

    def fit_conformal(self, labels: np.ndarray, probs: np.ndarray, coverage: float, method: str = "lac",
                      class_conditional: bool = False) -> dict[str, Any]:
        """Split conformal prediction sets of classes, calibrated on validation (see :mod:`medsight.metrics.conformal`)."""
        return fit_conformal(labels, probs, coverage, method, class_conditional)

    def conformal_metrics(self, labels: np.ndarray, probs: np.ndarray, conformal: dict[str, Any]) -> dict[str, Any]:
        """Empirical coverage, mean set size and single-answer rate of the fitted sets on ``labels``."""
        return set_metrics(labels, prediction_sets(probs, conformal))

    # ----------------------------------------------------------------------------------- inference
    def record(self, probs: np.ndarray) -> dict[str, Any]:
        """What ``predict`` and the REST API return for one image's probabilities (1-D)."""
        label = int(self.task.decide(probs[None])[0])
        return {"label": self.classes[label], "probability": float(probs[label]),
                "probabilities": {c: float(v) for c, v in zip(self.classes, probs)}}

    def answer(self, probs: np.ndarray) -> dict[str, Any]:
        """:meth:`record` plus, when an abstention threshold was fitted, whether to refer to a clinician."""
        rec = self.record(probs)
        below = self.task.rules.abstain_below
        if below is not None:
            conf = float(self.confidence(np.asarray(probs)[None])[0])
            rec["confidence"] = conf
            rec["refer_to_clinician"] = bool(conf < below)
        return rec

    # ------------------------------------------------------------------------------- explanations
    def explained_output(self, probs: np.ndarray) -> int:
        """The output Grad-CAM explains by default for one image: the decided class."""
        return int(self.task.decide(probs[None])[0])

    def border_outputs(self, labels: np.ndarray, probs: np.ndarray) -> list[int]:
        """The outputs whose heatmaps score one image's border (shortcut) heat: the explained one."""
        return [self.explained_output(probs)]

    def gallery_groups(self, labels: np.ndarray, probs: np.ndarray, per_group: int,
                       rng: np.random.Generator) -> list[GalleryGroup]:
        """Per class, up to ``per_group`` test images decided right and decided wrong (each explained for the
        decided class)."""
        pred, groups = self.task.decide(probs), []
        for c, name in enumerate(self.classes):
            for kind, mask in (("correct", (labels == c) & (pred == c)), (self.wrong, (labels == c) & (pred != c))):
                idx = np.flatnonzero(mask)
                pick = [int(i) for i in rng.choice(idx, size=min(per_group, len(idx)), replace=False)] if len(idx) else []
                groups.append((f"{self.title.format(name=name)}: {kind}", pick, [int(pred[i]) for i in pick]))
        return groups
