"""Multi-label findings: any number of K findings per image (effusion *and* cardiomegaly; none = "No Finding").

A sigmoid per finding. Loss (``train.loss``): ``bce`` (also what ``ce`` means here) with per-finding
positive weights when ``train.class_weights``, ``focal`` in its binary form, or ``asl`` (asymmetric loss,
Ridnik et al. 2021). Labels are (N, K) with -1 where masked (uncertain or blank under the "ignore"
policy): masked labels are left out of the loss and of that finding's metrics.

The decision: a finding is present when its probability reaches its own threshold, chosen on validation
data (Youden's J, or the highest threshold reaching ``train.target_sensitivity``); a finding that cannot
be scored on validation keeps 0.5, and says so. Grad-CAM explains one finding's logit at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medsight.losses import AsymmetricLoss, BinaryFocal, MaskedBCE, positive_weights
from medsight.metrics import checklist, finding_thresholds, multilabel_epoch_metrics, multilabel_metrics
from medsight.reporting.plots import plot_roc_grid
from medsight.tasks.base import GalleryGroup, Task
from medsight.tasks.single_label import TaskConfigError

if TYPE_CHECKING:
    from medsight.config import Config

__all__ = ["MultiLabelTask"]


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


class MultiLabelTask(Task):
    """K findings, each present or absent; see the module docstring."""

    kind = "multilabel"

    def __init__(self, classes: list[str], decision: dict[str, Any] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(classes, decision, options)
        self.options.setdefault("threshold_rule", "youden")
        self.options.setdefault("target_sensitivity", 0.9)
        if len(self.classes) < 1:
            raise TaskConfigError("a multi-label task needs at least one finding")

    @classmethod
    def options_from(cls, cfg: Config) -> dict[str, Any]:
        return {"threshold_rule": cfg.train.threshold_rule, "target_sensitivity": cfg.train.target_sensitivity}

    @property
    def thresholds(self) -> list[float]:
        return list(self.decision.get("thresholds") or [0.5] * len(self.classes))

    # ---------------------------------------------------------------------------------------- head
    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def activation_module(self) -> nn.Module:
        return nn.Sigmoid()

    # ------------------------------------------------------------------------------------ training
    def make_loss(self, cfg: Config, train_labels: np.ndarray) -> nn.Module:
        t = cfg.train
        labels = np.asarray(train_labels)
        if labels.ndim != 2 or labels.shape[1] != len(self.classes):
            raise TaskConfigError(f"data.task=multilabel needs one label column per finding ({len(self.classes)}); "
                                  f"the training labels have shape {labels.shape}")
        smoothing = t.label_smoothing
        if t.loss == "asl":
            return AsymmetricLoss(t.asl_gamma_neg, t.asl_gamma_pos, t.asl_clip, label_smoothing=smoothing)
        if t.loss == "focal":
            alpha = None
            if t.focal_alpha is not None:
                if len(t.focal_alpha) != 1 or not 0 < t.focal_alpha[0] < 1:
                    raise TaskConfigError("multi-label focal loss takes one train.focal_alpha in (0, 1): the weight "
                                          "of positives (e.g. [0.25])")
                alpha = float(t.focal_alpha[0])
            return BinaryFocal(t.focal_gamma, alpha, label_smoothing=smoothing)
        return MaskedBCE(positive_weights(labels) if t.class_weights else None, label_smoothing=smoothing)

    def eval_loss(self) -> nn.Module:
        return MaskedBCE()

    def batch_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images whose every unmasked finding is decided right at 0.5 (exact match)."""
        decided = (logits.detach() >= 0).to(labels.dtype)
        return ((decided == labels) | (labels < 0)).all(1).sum()

    # ------------------------------------------------------------------------------------ decision
    def fit_decision(self, val_labels: np.ndarray, val_probs: np.ndarray) -> None:
        t, why = finding_thresholds(np.asarray(val_labels), np.asarray(val_probs), self.options["threshold_rule"],
                                    float(self.options["target_sensitivity"]))
        self.decision = {"thresholds": t, "rule": self.options["threshold_rule"],
                         "not_fitted": {c: w for c, w in zip(self.classes, why) if w is not None}}

    def decide(self, probs: np.ndarray) -> np.ndarray:
        return (np.asarray(probs) >= np.asarray(self.thresholds)[None, :]).astype(np.int64)

    def explained_output(self, probs: np.ndarray) -> int:
        """The most probable finding."""
        return int(np.argmax(probs))

    def border_outputs(self, labels: np.ndarray, probs: np.ndarray) -> list[int]:
        """Each finding the image carries (its own border score), else the most probable finding."""
        carried = [int(k) for k in np.flatnonzero(np.asarray(labels) == 1)]
        return carried or [self.explained_output(probs)]

    def per_image_correct(self, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels)
        return ((self.decide(probs) == labels) | (labels < 0)).all(1)

    # ------------------------------------------------------------------------------------- metrics
    def metrics(self, labels: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        m = multilabel_metrics(labels, probs, self.classes, self.thresholds, n_boot=n_boot, seed=seed)
        m["threshold_rule"] = self.decision.get("rule", "0.5 (not fitted)")
        m["thresholds_not_fitted"] = dict(self.decision.get("not_fitted", {}))
        return m

    def epoch_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        return multilabel_epoch_metrics(np.asarray(labels), np.asarray(probs), (np.asarray(probs) >= 0.5).astype(int))

    def summary(self, m: dict[str, Any]) -> str:
        ci = (m.get("ci95") or {}).get("auc")
        line = (f"mean AUC {_f(m['auc'])}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
                + f" over {len(m['scored'])} findings · micro AUC {_f(m['micro_auc'])} · mAP {_f(m['map'])} · "
                  f"exact match {m['exact_match']:.4f} · Hamming {m['hamming_accuracy']:.4f}")
        if m["unscoreable"]:
            line += "\n  not scoreable: " + "; ".join(f"{c} ({w})" for c, w in m["unscoreable"].items())
        return line

    def checklist(self, m: dict[str, Any], thresholds: dict[str, float | None]) -> dict[str, Any] | None:
        scored = {**m, "per_class": {c: v for c, v in m["per_class"].items() if v["recall"] is not None}}
        return checklist(scored, **{k: thresholds.get(k) for k in ("min_accuracy", "min_auc", "min_recall", "max_ece")})

    # ------------------------------------------------------------------------------------- reports
    def figures(self, out: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], test: dict[str, Any],
                title: str = "") -> list[str]:
        plot_roc_grid(curves, self.classes, out / "roc_findings.png", thresholds=self.thresholds)
        return ["roc_findings.png"]

    def report_tables(self, metrics: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
        test, val = metrics["test"], metrics.get("val", {})
        ci = (test.get("ci95") or {}).get("auc")
        rows = [["mean AUC (scoreable findings)", val.get("auc"), test["auc"], f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""]]
        for key, label in (("micro_auc", "micro AUC"), ("map", "mAP"), ("exact_match", "exact-match accuracy"),
                           ("hamming_accuracy", "Hamming accuracy"), ("balanced_accuracy", "mean balanced accuracy"),
                           ("ece", "mean ECE")):
            rows.append([label, val.get(key), test.get(key), ""])
        vf, not_fitted = val.get("findings", {}), test.get("thresholds_not_fitted", {})
        per = []
        for c, f in test["findings"].items():
            fc = (f.get("ci95") or {}).get("auc")
            per.append([c, f"{f['positives']} / {f['n']}", f["prevalence"], f["auc"],
                        f"[{fc[0]:.3f}, {fc[1]:.3f}]" if fc else "", f["ap"], f["threshold"], f["sensitivity"],
                        f["specificity"], f["ece"], (vf.get(c) or {}).get("auc"),
                        test["unscoreable"].get(c) or (f"threshold 0.5 (val: {not_fitted[c]})" if c in not_fitted else "")])
        notes = [[c, w] for c, w in test["unscoreable"].items()]
        tables = [("Metrics", ["metric", "val", "test", "95% CI"], rows),
                  (f"Per finding (test; thresholds by {test.get('threshold_rule')} on validation)",
                   ["finding", "positives / labelled", "prevalence", "AUC", "95% CI", "AP", "threshold", "sensitivity",
                    "specificity", "ECE", "val AUC", "note"], per)]
        if notes:
            tables.append(("Not scoreable on test", ["finding", "why"], notes))
        return tables

    def gallery_groups(self, labels: np.ndarray, probs: np.ndarray, per_group: int,
                       rng: np.random.Generator) -> list[GalleryGroup]:
        """Per finding: test images carrying it, each explained by that finding's logit."""
        groups: list[GalleryGroup] = []
        for k, name in enumerate(self.classes):
            idx = np.flatnonzero(np.asarray(labels)[:, k] == 1)
            pick = [int(i) for i in rng.choice(idx, size=min(per_group, len(idx)), replace=False)] if len(idx) else []
            groups.append((f"{name}: test images carrying it", pick, [k] * len(pick)))
        return groups

    # ----------------------------------------------------------------------------------- inference
    def record(self, probs: np.ndarray) -> dict[str, Any]:
        p = np.asarray(probs, dtype=np.float64)
        found = [c for c, v, t in zip(self.classes, p, self.thresholds) if v >= t]
        top = int(np.argmax(p))
        return {"label": ", ".join(found) if found else "no finding above its threshold", "findings": found,
                "probability": float(p[top]), "explained": self.classes[top],
                "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
                "thresholds": {c: float(t) for c, t in zip(self.classes, self.thresholds)}}
