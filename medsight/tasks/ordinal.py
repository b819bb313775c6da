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

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medsight.config import OrdinalHead, choices
from medsight.losses import (ClassificationLoss, CornLoss, CornProbabilities, DistanceSmoothedCE, ExpectedGradeMSE,
                             RegressionProbabilities, class_weights)
from medsight.losses.ordinal import corn_probabilities, regression_probabilities
from medsight.metrics import (apply_cutpoints, auc_score, choose_threshold, fit_cutpoints, format_ci,
                              ordinal_checklist, ordinal_metrics, weighted_kappa)
from medsight.tasks.base import GalleryGroup, Task, correct_and_wrong_groups
from medsight.tasks.single_label import TaskConfigError

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


class OrdinalTask(Task):
    """K ordered grades; see the module docstring for the heads, decisions and the referable view."""

    kind = "ordinal"

    def __init__(self, classes: list[str], decision: dict[str, Any] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(classes, decision, options)
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

    @property
    def head(self) -> str:
        return str(self.options["head"])

    @property
    def refer_grade(self) -> int:
        """The label index of the lowest referable grade (``data.refer_grade`` is in the labels' own units)."""
        return int(self.options["refer_index"])

    # ---------------------------------------------------------------------------------------- head
    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        if self.head == "corn":
            return corn_probabilities(logits)
        if self.head == "regression":
            return regression_probabilities(logits)
        return torch.softmax(logits.float(), 1)

    def activation_module(self) -> nn.Module:
        return {"corn": CornProbabilities, "regression": RegressionProbabilities}.get(self.head, lambda: nn.Softmax(1))()

    @property
    def calibratable(self) -> bool:
        """Temperature scaling keeps the decisions of softmax heads; CORN's median grade and the regression
        score's cut-points would move with it, so those heads stay uncalibrated."""
        return self.head in ("ce", "smooth")

    def binary_views(self, labels: np.ndarray, probs: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """One question: is the grade referable (≥ refer_grade)? Scored by :meth:`refer_scores`."""
        y = (np.asarray(labels) >= self.refer_grade).astype(int)
        return [(f"grade ≥ {self.classes[self.refer_grade]}", y, self.refer_scores(probs))]

    # ------------------------------------------------------------------------------------ training
    def make_loss(self, cfg: Config, train_labels: np.ndarray) -> nn.Module:
        t, k = cfg.train, len(self.classes)
        counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=k)
        weight = class_weights(counts, t.class_weight_mode, t.class_weight_beta) if t.class_weights else None
        if self.head == "smooth":
            return DistanceSmoothedCE(float(self.options["smoothing"]), weight)
        if self.head == "corn":
            return CornLoss(weight)
        if self.head == "regression":
            return ExpectedGradeMSE(weight)
        smoothing = 0.0 if (t.mixup or t.cutmix) else t.label_smoothing
        return ClassificationLoss(gamma=t.focal_gamma if t.loss == "focal" else 0.0, weight=weight,
                                  label_smoothing=smoothing)

    def eval_loss(self) -> nn.Module:
        return {"corn": CornLoss, "regression": ExpectedGradeMSE}.get(self.head, nn.CrossEntropyLoss)()

    def batch_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = self.activation(logits.detach())
        k = p.shape[1]
        if self.head == "corn":
            grade = ((1 - p.cumsum(1)[:, :-1]) > 0.5).sum(1)
        elif self.head == "regression":
            expected = p @ torch.arange(k, device=p.device, dtype=p.dtype)
            cuts = torch.tensor(self.cutpoints, device=p.device, dtype=p.dtype)
            grade = (expected[:, None] > cuts[None, :]).sum(1)
        else:
            grade = p.argmax(1)
        return (grade == labels).sum()

    # ------------------------------------------------------------------------------------ decision
    @property
    def cutpoints(self) -> list[float]:
        """Regression head: the cut-points on the expected grade (fitted on validation, else k + 0.5)."""
        return list(self.decision.get("cutpoints") or (np.arange(len(self.classes) - 1) + 0.5).tolist())

    @staticmethod
    def expected(probs: np.ndarray) -> np.ndarray:
        p = np.asarray(probs, dtype=np.float64)
        return p @ np.arange(p.shape[1], dtype=np.float64)

    def refer_scores(self, probs: np.ndarray) -> np.ndarray:
        """The "refer" score per image: P(grade ≥ refer_grade), or for regression the expected grade / (K-1)."""
        p = np.asarray(probs, dtype=np.float64)
        if self.head == "regression":
            return self.expected(p) / (p.shape[1] - 1)
        return p[:, self.refer_grade:].sum(1)

    def fit_decision(self, val_labels: np.ndarray, val_probs: np.ndarray) -> None:
        """Regression: cut-points maximizing validation kappa. Every head: the referral threshold that
        reaches the target sensitivity on validation."""
        self.decision.pop("cutpoints", None)
        self.decision.pop("refer_threshold", None)
        labels = np.asarray(val_labels, dtype=np.int64)
        if self.head == "regression" and len(np.unique(labels)) > 1:
            self.decision["cutpoints"] = fit_cutpoints(labels, self.expected(val_probs), len(self.classes))
        t = choose_threshold(labels >= self.refer_grade, self.refer_scores(val_probs),
                             float(self.options["refer_sensitivity"]))
        if t is not None:
            self.decision["refer_threshold"] = t

    def decide(self, probs: np.ndarray) -> np.ndarray:
        p = np.asarray(probs, dtype=np.float64)
        if self.head == "corn":  # the median grade: P(y > j) > 0.5 for every grade j below it
            return ((1 - np.cumsum(p, 1)[:, :-1]) > 0.5).sum(1)
        if self.head == "regression":
            return apply_cutpoints(self.expected(p), self.cutpoints)
        return p.argmax(1)

    # ------------------------------------------------------------------------------------- metrics
    def metrics(self, labels: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        m = ordinal_metrics(labels, probs, self.decide(probs), self.classes, refer_scores=self.refer_scores(probs),
                            refer_grade=self.refer_grade, refer_at=self.decision.get("refer_threshold"),
                            n_boot=n_boot, seed=seed)
        m["head"] = self.head
        m["refer"]["target_sensitivity"] = float(self.options["refer_sensitivity"])
        if self.head == "regression":
            m["cutpoints"] = self.cutpoints
        return m

    def epoch_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        labels = np.asarray(labels, dtype=np.int64)
        pred = self.decide(probs)
        recalls = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
        return {"acc": float((pred == labels).mean()), "accuracy": float((pred == labels).mean()),
                "auc": auc_score(labels, np.asarray(probs)), "balanced_accuracy": float(np.mean(recalls)),
                "qwk": weighted_kappa(labels, pred, len(self.classes), 2)}

    def summary(self, m: dict[str, Any]) -> str:
        ci = m.get("ci95", {})

        def v(x: float | None, key: str | None = None, cis: dict[str, Any] | None = None) -> str:
            if x is None:
                return "n/a"
            c = (cis if cis is not None else ci).get(key) if key else None
            return f"{x:.4f}" + (f" {format_ci(c)}" if c else "")

        r = m["refer"]
        line = (f"QWK {v(m['qwk'], 'qwk')} · accuracy {v(m['accuracy'], 'accuracy')} · within one grade "
                f"{m['within_one']:.4f} · MAE {m['mae']:.4f} · AUC {v(m['auc'], 'auc')}")
        if r.get("threshold") is not None:
            rc = r.get("ci95", {})
            line += (f"\n  refer (grade ≥ {self.classes[r['grade']]}) at the val threshold {r['threshold']:.3f}: "
                     f"sensitivity {v(r.get('sensitivity'), 'sensitivity', rc)} · specificity "
                     f"{v(r.get('specificity'), 'specificity', rc)} · AUC {v(r.get('auc'), 'auc', rc)}")
        return line

    def checklist(self, m: dict[str, Any], thresholds: dict[str, float | None]) -> dict[str, Any] | None:
        return ordinal_checklist(m, **thresholds)

    # ------------------------------------------------------------------------------------- reports
    def report_tables(self, metrics: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
        test, val = metrics["test"], metrics.get("val", {})

        def ci(d: dict[str, Any], key: str) -> str:
            return format_ci(d.get("ci95", {}).get(key))

        names = {"qwk": "quadratic weighted kappa", "linear_kappa": "linear weighted kappa", "accuracy": "accuracy",
                 "within_one": "accuracy within one grade", "mae": "mean absolute grade error",
                 "balanced_accuracy": "balanced accuracy", "auc": "AUC (macro, one grade vs rest)", "ece": "ECE"}
        rows = [[label, val.get(key), test.get(key), ci(test, key)] for key, label in names.items() if key in test]
        r, rv = test["refer"], val.get("refer", {})
        grade = self.classes[r["grade"]]
        refer_rows = [
            ["threshold (chosen on val)", rv.get("threshold"), r.get("threshold"), ""],
            [f"sensitivity (target {r.get('target_sensitivity', 0):.2f} on val)", rv.get("sensitivity"),
             r.get("sensitivity"), ci(r, "sensitivity")],
            ["specificity", rv.get("specificity"), r.get("specificity"), ci(r, "specificity")],
            ["AUC", rv.get("auc"), r.get("auc"), ci(r, "auc")],
            [f"sensitivity of decided grade ≥ {grade}", rv.get("sensitivity_at_grade"), r.get("sensitivity_at_grade"), ""],
            [f"specificity of decided grade ≥ {grade}", rv.get("specificity_at_grade"), r.get("specificity_at_grade"), ""],
            ["referable images / all", f"{rv.get('n_refer')} / {rv.get('n')}" if rv else "",
             f"{r['n_refer']} / {r['n']}", ""]]
        per_grade = [[c, test["auc_per_grade"].get(c)] + [m[k] for k in ("precision", "recall", "specificity", "f1", "support")]
                     for c, m in test["per_class"].items()]
        head = [f"head: {self.head}"] + ([f"cut-points {', '.join(f'{c:.3f}' for c in test['cutpoints'])}"]
                                         if test.get("cutpoints") else [])
        return [(f"Metrics ({'; '.join(head)})", ["metric", "val", "test", "95% CI"], rows),
                (f"Referable: grade ≥ {grade}", ["", "val", "test", "95% CI"], refer_rows),
                ("Per grade (test)", ["grade", "AUC", "precision", "recall", "specificity", "F1", "support"], per_grade)]

    def gallery_groups(self, labels: np.ndarray, probs: np.ndarray, per_group: int,
                       rng: np.random.Generator) -> list[GalleryGroup]:
        return correct_and_wrong_groups(self.classes, labels, self.decide(probs), per_group, rng, "misgraded",
                                        "grade {name}")

    # ----------------------------------------------------------------------------------- inference
    def record(self, probs: np.ndarray) -> dict[str, Any]:
        p = np.asarray(probs, dtype=np.float64)
        grade = int(self.decide(p[None])[0])
        score = float(self.refer_scores(p[None])[0])
        t = self.decision.get("refer_threshold")
        rec = {"label": self.classes[grade], "grade": grade, "probability": float(p[grade]),
               "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
               "expected_grade": float(self.expected(p[None])[0]), "refer_score": score}
        if t is not None:
            rec["refer"] = bool(score >= t)
        return rec
