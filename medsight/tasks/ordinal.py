"""Ordinal grading: grades 0..K-1 in order (diabetic retinopathy 0-4), where calling a grade-4 eye grade 3 is
a small error and calling it grade 0 a missed referral.

Four ways to learn the grades (``train.ordinal``), all on a head of K outputs so that every grade has an
output for Grad-CAM to explain and every consumer reads per-grade probabilities (N, K):

* ``ce`` — plain cross-entropy; decision: the most probable grade.
* ``smooth`` — distance-aware label smoothing (:class:`medsight.losses.DistanceSmoothedCE`); most probable grade.
* ``corn`` — CORN's conditional binary outputs (:class:`medsight.losses.CornLoss`), rank-consistent
  probabilities; decision: the median grade (P(y > j) > 0.5 for every j below it), CORN's own rule.
* ``regression`` — squared error of the expected grade (:class:`medsight.losses.ExpectedGradeMSE`), with
  per-grade probabilities read from that score (:func:`medsight.losses.ordinal.regression_probabilities`);
  decision: the score cut at points tuned on validation data to maximize quadratic weighted kappa (the
  "optimized rounder" of the APTOS 2019 winners).

Every head also answers the screening question: refer when P(grade ≥ ``refer_grade``) (for regression, the
expected grade) reaches a threshold chosen on validation data for a target sensitivity. Metrics are
:func:`medsight.metrics.ordinal_metrics`; ``train.monitor=qwk`` selects the best epoch by validation kappa.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from medsight.config import OrdinalHead, choices
from medsight.metrics import auc_score, choose_threshold, ordinal_metrics, weighted_kappa
from medsight.tasks.base import Task
from medsight.tasks.heads import (Corn, DistanceSmoothed, GradeHead, OrdinalSoftmax, Regression, TaskConfigError,
                                  mean_grade)
from medsight.tasks.readout import BinaryView, Readout

if TYPE_CHECKING:
    from medsight.config import Config

__all__ = ["OrdinalTask", "check_grade_names", "refer_index"]

HEADS = choices(OrdinalHead)


def _as_int(name: str) -> int | None:
    try:
        return int(str(name).strip())
    except ValueError:
        return None


def check_grade_names(classes: list[str]) -> None:
    """Class names that are grades: integers, in increasing order, none missing between the first and last.

    Raises :class:`TaskConfigError` naming what is wrong and how to give the order.
    """
    numbers = [_as_int(c) for c in classes]
    listed = ", ".join(map(str, classes))
    if any(n is None for n in numbers):
        raise TaskConfigError(
            f"data.task=ordinal needs grades in order, but the class names ({listed}) are not grade numbers, so "
            f"medsight cannot tell their order (folder and label names sort alphabetically). Give it, lowest "
            f"grade first, e.g. --set 'data.grade_order=[{listed}]' with the names in grade order")
    same = {n: [c for c, m in zip(classes, numbers) if m == n] for n in set(numbers)}
    twice = {n: names for n, names in same.items() if len(names) > 1}
    if twice:
        spelled = "; ".join(f"{' and '.join(repr(c) for c in names)} are both grade {n}" for n, names in twice.items())
        raise TaskConfigError(f"data.task=ordinal: {spelled}; write each grade one way in the labels (or give "
                              f"data.grade_order if they are different grades)")
    if numbers != sorted(numbers):
        raise TaskConfigError(f"data.task=ordinal: the grades {listed} are not in increasing order")
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if missing:
        raise TaskConfigError(
            f"data.task=ordinal: grade(s) {', '.join(map(str, missing))} appear nowhere in the data (its grades are "
            f"{listed}); distances between grades would be wrong. Add images of the missing grade(s), or give "
            f"data.grade_order to say that these names are consecutive grades")


def refer_index(classes: list[str], grade: int) -> int:
    """The label index of the lowest class referred at ``data.refer_grade=grade``, read in the labels' units:
    with grades 1-5, ``refer_grade=3`` refers 3, 4 and 5. Class names that are not grade numbers (an order
    given by data.grade_order) count from 0. Referring every grade, or none, is refused."""
    numbers = [_as_int(c) for c in classes]
    values = numbers if all(n is not None for n in numbers) else list(range(len(classes)))
    index = next((i for i, v in enumerate(values) if v >= grade), len(classes))
    if not 1 <= index <= len(classes) - 1:
        raise TaskConfigError(f"data.refer_grade={grade} (in the labels' units) would refer "
                              f"{'every' if index == 0 else 'no'} grade of {', '.join(map(str, classes))}; choose "
                              f"{values[1]}..{values[-1]}")
    return index


class OrdinalReadout(Readout):
    """Grades: one yes/no question (is the grade referable?), and ``predict`` adds the expected grade and the
    referral."""

    wrong, title = "misgraded", "grade {name}"

    def binary_views(self, labels: np.ndarray, probs: np.ndarray) -> list[BinaryView]:
        """One question: is the grade referable (≥ refer_grade)? Scored by :meth:`OrdinalTask.refer_scores`."""
        t = self.task
        y = (np.asarray(labels) >= t.refer_grade).astype(int)
        return [(f"grade ≥ {self.classes[t.refer_grade]}", y, t.refer_scores(probs))]

    def record(self, probs: np.ndarray) -> dict[str, Any]:
        t, p = self.task, np.asarray(probs, dtype=np.float64)
        grade = int(t.decide(p[None])[0])
        score = float(t.refer_scores(p[None])[0])
        rec = {"label": self.classes[grade], "grade": grade, "probability": float(p[grade]),
               "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
               "expected_grade": float(mean_grade(p[None])[0]), "refer_score": score}
        if t.rules.refer_threshold is not None:
            rec["refer"] = bool(score >= t.rules.refer_threshold)
        return rec


class OrdinalTask(Task):
    """K ordered grades; see the module docstring for the heads, decisions and the referable view."""

    kind = "ordinal"
    Readout = OrdinalReadout

    def __init__(self, classes: list[str], rules: Any = None, options: dict[str, Any] | None = None) -> None:
        super().__init__(classes, rules, options)
        o = self.options
        o.setdefault("head", "ce")
        o.setdefault("smoothing", 0.2)
        o.setdefault("refer_grade", 2)
        o.setdefault("refer_sensitivity", 0.9)
        if o["head"] not in HEADS:
            raise TaskConfigError(f"unknown ordinal head {o['head']!r}; choose from {', '.join(HEADS)}")
        k = len(self.classes)
        if k < 2:
            raise TaskConfigError(f"an ordinal task needs at least 2 grades, got {k}")
        if "refer_index" not in o:
            o["refer_index"] = refer_index(self.classes, int(o["refer_grade"]))
        if "ordered_by" not in o:  # a new task: its class names must say the order themselves
            check_grade_names(self.classes)
            o["ordered_by"] = "grade numbers"

    @classmethod
    def options_from(cls, cfg: Config) -> dict[str, Any]:
        d, t = cfg.data, cfg.train
        opts: dict[str, Any] = {"head": t.ordinal, "smoothing": t.ordinal_smoothing, "refer_grade": d.refer_grade,
                                "refer_sensitivity": d.refer_sensitivity}
        if d.grade_order:
            opts["ordered_by"] = "data.grade_order"
        elif d.class_names:
            opts["ordered_by"] = "data.class_names (label order)"
        return opts

    @cached_property
    def head(self) -> GradeHead:
        k, name = len(self.classes), self.options["head"]
        if name == "smooth":
            return DistanceSmoothed(k, float(self.options["smoothing"]))
        return {"ce": OrdinalSoftmax, "corn": Corn, "regression": Regression}[name](k)

    @property
    def refer_grade(self) -> int:
        """The label index of the lowest referable grade (``data.refer_grade`` is in the labels' own units)."""
        return int(self.options["refer_index"])

    def refer_scores(self, probs: np.ndarray) -> np.ndarray:
        """The "refer" score per image: P(grade ≥ refer_grade), or for regression the expected grade / (K-1)."""
        return self.head.refer_scores(probs, self.refer_grade)

    def fit_decision(self, val_labels: np.ndarray, val_probs: np.ndarray) -> None:
        """Regression: cut-points maximizing validation kappa. Every head: the referral threshold that
        reaches the target sensitivity on validation."""
        self.rules.cutpoints = self.rules.refer_threshold = None
        labels = np.asarray(val_labels, dtype=np.int64)
        self.head.fit(labels, val_probs, self.rules)
        self.rules.refer_threshold = choose_threshold(labels >= self.refer_grade, self.refer_scores(val_probs),
                                                      float(self.options["refer_sensitivity"]))

    def metrics(self, labels: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        m = ordinal_metrics(labels, probs, self.decide(probs), self.classes, refer_scores=self.refer_scores(probs),
                            refer_grade=self.refer_grade, refer_at=self.rules.refer_threshold,
                            n_boot=n_boot, seed=seed)
        m["head"] = self.head.name
        m["refer"]["target_sensitivity"] = float(self.options["refer_sensitivity"])
        m.update(self.head.described(self.rules))
        return m

    def epoch_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        labels = np.asarray(labels, dtype=np.int64)
        pred = self.decide(probs)
        recalls = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
        return {"acc": float((pred == labels).mean()), "accuracy": float((pred == labels).mean()),
                "auc": auc_score(labels, np.asarray(probs)), "balanced_accuracy": float(np.mean(recalls)),
                "qwk": weighted_kappa(labels, pred, len(self.classes), 2)}
