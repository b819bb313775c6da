"""Multi-label findings: any number of K findings per image (effusion *and* cardiomegaly; none = "No Finding").

A sigmoid per finding. Loss (``train.loss``): ``bce`` (also what ``ce`` means here) with per-finding
positive weights when ``train.class_weights``, ``focal`` in its binary form, or ``asl`` (asymmetric loss,
Ridnik et al. 2021). Labels are (N, K) with -1 where masked (uncertain or blank under the "ignore"
policy): masked labels are left out of the loss and of that finding's metrics.

The decision: a finding is present when its probability reaches its own threshold, chosen on validation
data (Youden's J, or the highest threshold reaching ``train.target_sensitivity``); a finding that cannot
be scored on validation keeps 0.5, and says so. Grad-CAM explains one finding's logit at a time.

Trust, per finding: one temperature per finding (fitted on that finding's labelled validation images; 1.0
where validation holds only one answer) — after undoing the positive weights' shift when the model was
trained with them: BCE with ``pos_weight`` w is minimized by logit(p) + log w, not logit(p) (the prior
correction of King & Zeng 2001; logit adjustment, Menon et al. 2021), so a temperature alone cannot bring a
rare finding's inflated probabilities down and log w is subtracted first. Then operating points, calibration and subgroup gaps on each finding's
binary view (masked labels left out), and split conformal sets per finding ({absent}, {present}, or both:
uncertain). An image's confidence is its least sure finding's, measured from that finding's threshold; its
error is the share of its labelled findings decided wrong (Hamming loss: at per-finding Youden thresholds
nearly every image has some finding wrong, so "any finding wrong" would rank nothing); it is referred to a
clinician when its confidence is below the abstention threshold.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from medsight.metrics import finding_thresholds, multilabel_epoch_metrics, multilabel_metrics
from medsight.metrics.calibration import reliability_bins
from medsight.metrics.conformal import binary_set_metrics, binary_sets, fit_binary_conformal
from medsight.tasks.base import Task
from medsight.tasks.heads import Sigmoid, TaskConfigError
from medsight.tasks.readout import BinaryView, GalleryGroup, Readout

if TYPE_CHECKING:
    from medsight.config import Config

__all__ = ["MultiLabelTask"]


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


class MultiLabelReadout(Readout):
    """Each finding is its own yes/no question; see the module docstring for confidence, error and referral."""

    def binary_views(self, labels: np.ndarray, probs: np.ndarray) -> list[BinaryView]:
        """One view per finding, its masked labels left out."""
        y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
        return [(c, y[y[:, k] >= 0, k].astype(int), p[y[:, k] >= 0, k]) for k, c in enumerate(self.classes)]

    def view_labelled(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels) >= 0

    def margins(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) how far each probability is from its finding's threshold, as a share of the way to 0 or 1."""
        p = np.asarray(probs, dtype=np.float64)
        t = np.asarray(self.task.thresholds, dtype=np.float64)[None, :]
        return np.where(p >= t, (p - t) / np.maximum(1 - t, 1e-12), (t - p) / np.maximum(t, 1e-12))

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """The least sure finding's confidence, 0.5 + margin / 2: max(p, 1 − p) when its threshold is 0.5."""
        return 0.5 + 0.5 * self.margins(probs).min(1)

    def errors(self, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Per image, the share of its labelled findings decided wrong at their thresholds (0 when none is
        labelled): selective prediction's risk becomes the Hamming loss among the answered images."""
        y = np.asarray(labels)
        wrong = ((self.task.decide(probs) != y) & (y >= 0)).sum(1)
        return wrong / np.maximum((y >= 0).sum(1), 1)

    def reliability(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
        """Every labelled (image, finding) probability against whether the finding is present."""
        y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
        keep = y >= 0
        return reliability_bins(p[keep], y[keep])

    def tta_spread(self, views: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """The largest spread of a finding's probability over the TTA views."""
        return views.std(0).max(1)

    def fit_conformal(self, labels: np.ndarray, probs: np.ndarray, coverage: float, method: str = "lac",
                      class_conditional: bool = False) -> dict[str, Any]:
        """Split conformal sets per finding ({absent}, {present} or both), each calibrated on its own labelled
        validation images; ``class_conditional`` calibrates positives and negatives apart (rare findings)."""
        per = {name: fit_binary_conformal(y, s, coverage, method, class_conditional)
               for name, y, s in self.binary_views(labels, probs)}
        return {"method": method, "coverage": float(coverage), "class_conditional": bool(class_conditional),
                "per_finding": per, "qhat": {n: c["qhat"] for n, c in per.items()}, "n_calibration": int(len(labels))}

    def conformal_metrics(self, labels: np.ndarray, probs: np.ndarray, conformal: dict[str, Any]) -> dict[str, Any]:
        """Per finding: coverage, mean set size (1 or 2 answers), uncertain share; their means over findings; and
        how many images have every labelled finding covered at once (not guaranteed: reported, not targeted)."""
        y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
        per, all_covered = {}, np.ones(len(y), dtype=bool)
        for k, name in enumerate(self.classes):
            keep = y[:, k] >= 0
            per[name] = binary_set_metrics(y[keep, k], p[keep, k], conformal["per_finding"][name])
            sets = binary_sets(p[:, k], conformal["per_finding"][name])
            all_covered &= ~keep | sets[np.arange(len(y)), np.clip(y[:, k], 0, 1).astype(int)]
        keys = ("coverage", "mean_set_size", "singleton_rate", "empty_rate", "uncertain_rate")
        return {**{k: _mean([m[k] for m in per.values()]) for k in keys},
                "all_findings_covered": float(all_covered.mean()) if len(y) else None,
                "coverage_per_class": {n: m["coverage"] for n, m in per.items()},
                "per_finding": {n: {k: m[k] for k in (*keys, "n")} for n, m in per.items()}, "n": int(len(y))}

    def record(self, probs: np.ndarray) -> dict[str, Any]:
        p, thresholds = np.asarray(probs, dtype=np.float64), self.task.thresholds
        found = [c for c, v, t in zip(self.classes, p, thresholds) if v >= t]
        top = int(np.argmax(p))
        return {"label": ", ".join(found) if found else "no finding above its threshold", "findings": found,
                "probability": float(p[top]), "explained": self.classes[top],
                "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
                "thresholds": {c: float(t) for c, t in zip(self.classes, thresholds)}}

    def answer(self, probs: np.ndarray) -> dict[str, Any]:
        """:meth:`record`, and with the trust rules fitted: whether to refer to a clinician (and the least sure
        finding, which decided it), and the findings whose conformal set holds both answers."""
        rec = super().answer(probs)
        p = np.asarray(probs, dtype=np.float64)
        if "refer_to_clinician" in rec:
            rec["least_certain_finding"] = self.classes[int(np.argmin(self.margins(p[None])[0]))]
        per = (self.task.rules.conformal or {}).get("per_finding")
        if per:
            rec["uncertain_findings"] = [c for k, c in enumerate(self.classes)
                                         if c in per and bool(binary_sets(p[[k]], per[c])[0].all())]
        return rec

    def explained_output(self, probs: np.ndarray) -> int:
        """The most probable finding."""
        return int(np.argmax(probs))

    def border_outputs(self, labels: np.ndarray, probs: np.ndarray) -> list[int]:
        """Each finding the image carries (its own border score), else the most probable finding."""
        carried = [int(k) for k in np.flatnonzero(np.asarray(labels) == 1)]
        return carried or [self.explained_output(probs)]

    def gallery_groups(self, labels: np.ndarray, probs: np.ndarray, per_group: int,
                       rng: np.random.Generator) -> list[GalleryGroup]:
        """Per finding: test images carrying it, each explained by that finding's logit."""
        groups: list[GalleryGroup] = []
        for k, name in enumerate(self.classes):
            idx = np.flatnonzero(np.asarray(labels)[:, k] == 1)
            pick = [int(i) for i in rng.choice(idx, size=min(per_group, len(idx)), replace=False)] if len(idx) else []
            groups.append((f"{name}: test images carrying it", pick, [k] * len(pick)))
        return groups


class MultiLabelTask(Task):
    """K findings, each present or absent; see the module docstring."""

    kind = "multilabel"
    Readout = MultiLabelReadout

    @classmethod
    def options_from(cls, cfg: Config) -> dict[str, Any]:
        return {"threshold_rule": cfg.train.threshold_rule, "target_sensitivity": cfg.train.target_sensitivity}

    def __init__(self, classes: list[str], rules: Any = None, options: dict[str, Any] | None = None) -> None:
        super().__init__(classes, rules, options)
        self.options.setdefault("threshold_rule", "youden")
        self.options.setdefault("target_sensitivity", 0.9)
        if len(self.classes) < 1:
            raise TaskConfigError("a multi-label task needs at least one finding")

    @cached_property
    def head(self) -> Sigmoid:
        return Sigmoid(len(self.classes))

    @property
    def thresholds(self) -> list[float]:
        return list(self.rules.thresholds or [0.5] * len(self.classes))

    def fit_decision(self, val_labels: np.ndarray, val_probs: np.ndarray) -> None:
        """Per-finding thresholds; the rest of the rules (temperatures, trust rules) is kept."""
        t, why = finding_thresholds(np.asarray(val_labels), np.asarray(val_probs), self.options["threshold_rule"],
                                    float(self.options["target_sensitivity"]))
        self.rules.thresholds, self.rules.threshold_rule = t, self.options["threshold_rule"]
        self.rules.thresholds_not_fitted = {c: w for c, w in zip(self.classes, why) if w is not None}

    def metrics(self, labels: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        m = multilabel_metrics(labels, probs, self.classes, self.thresholds, n_boot=n_boot, seed=seed)
        m["threshold_rule"] = self.rules.threshold_rule or "0.5 (not fitted)"
        m["thresholds_not_fitted"] = dict(self.rules.thresholds_not_fitted)
        return m

    def epoch_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        return multilabel_epoch_metrics(np.asarray(labels), np.asarray(probs), (np.asarray(probs) >= 0.5).astype(int))
