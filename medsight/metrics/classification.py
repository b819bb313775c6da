"""Clinical classification metrics with intervals, from predicted probabilities (scikit-learn underneath)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn import metrics as skm

from medsight.metrics.bootstrap import bootstrap_cis
from medsight.metrics.calibration import reliability_bins

__all__ = ["classification_metrics", "checklist", "expected_calibration_error", "auc_score", "bootstrap_ci"]


def auc_score(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary: AUC of the positive class; multi-class: macro one-vs-rest. None when undefined."""
    k = probs.shape[1]
    present = np.unique(labels)
    if len(present) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if k == 2:
            return float(skm.roc_auc_score(labels, probs[:, 1]))
        if len(present) < k:  # macro one-vs-rest over the classes present only
            return float(np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in present]))
        return float(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al., ICML 2017): the most probable class's
    probability against being right, binned by :func:`medsight.metrics.calibration.reliability_bins`."""
    return reliability_bins(probs.max(1), (probs.argmax(1) == labels).astype(np.float64), n_bins)["ece"]


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals (:mod:`medsight.metrics.bootstrap`) for AUC and accuracy of the most
    probable class."""
    pred = probs.argmax(1)

    def stats(idx: np.ndarray) -> dict[str, float | None]:
        return {"auc": auc_score(labels[idx], probs[idx]), "accuracy": float((pred[idx] == labels[idx]).mean())}

    return bootstrap_cis(stats, len(labels), n_boot, seed, level)


def classification_metrics(labels: np.ndarray, probs: np.ndarray, classes: list[str], *,
                           n_boot: int = 1000, seed: int = 0, threshold: float | None = None,
                           pred: np.ndarray | None = None) -> dict[str, Any]:
    """Accuracy, balanced accuracy, AUC, ECE, per-class precision/recall/specificity/F1/support,
    the confusion matrix and report text, and 95% bootstrap intervals for AUC and accuracy.

    For binary tasks, ``threshold`` (chosen on validation data) adds the accuracy at that threshold.
    ``pred``: the decisions, when the task's rule is not the most probable class (the intervals are then
    left to the caller, since ``bootstrap_ci`` decides by argmax).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    pred = probs.argmax(1) if pred is None else np.asarray(pred, dtype=np.int64)
    cm = skm.confusion_matrix(labels, pred, labels=list(range(k)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prec, rec, f1, support = skm.precision_recall_fscore_support(labels, pred, labels=list(range(k)),
                                                                     zero_division=0)
        bacc = float(skm.balanced_accuracy_score(labels, pred))
        report = skm.classification_report(labels, pred, labels=list(range(k)), target_names=classes,
                                           zero_division=0, digits=4)
    total = cm.sum()
    per_class = {}
    for i, c in enumerate(classes):
        tn = total - cm[i, :].sum() - cm[:, i].sum() + cm[i, i]
        fp = cm[:, i].sum() - cm[i, i]
        per_class[c] = {
            "precision": float(prec[i]), "recall": float(rec[i]),
            "specificity": float(tn / (tn + fp)) if (tn + fp) else 0.0,
            "f1": float(f1[i]), "support": int(support[i]),
        }
    out: dict[str, Any] = {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": bacc,
        "auc": auc_score(labels, probs),
        "ece": expected_calibration_error(labels, probs),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "report": report,
    }
    if n_boot:
        out["ci95"] = bootstrap_ci(labels, probs, n_boot=n_boot, seed=seed)
    if k == 2 and threshold is not None:
        out["threshold"] = float(threshold)
        out["accuracy_at_threshold"] = float(((probs[:, 1] >= threshold).astype(int) == labels).mean())
    return out


def checklist(m: dict[str, Any], min_accuracy: float | None = None, min_auc: float | None = None,
              min_recall: float | None = None, max_ece: float | None = None) -> dict[str, Any] | None:
    """PASS/FAIL lines for the thresholds that are set, ``{"pass", "checks": [{"check", "threshold", "value",
    "pass"}]}``, or None when no threshold is set."""
    rows = []

    def add(name: str, threshold: float, value: float | None, ok: bool) -> None:
        rows.append({"check": name, "threshold": threshold, "value": value, "pass": bool(ok)})

    if min_accuracy is not None:
        add("accuracy >=", min_accuracy, m["accuracy"], m["accuracy"] >= min_accuracy)
    if min_auc is not None:
        add("AUC >=", min_auc, m["auc"], m["auc"] is not None and m["auc"] >= min_auc)
    if min_recall is not None:
        for cls, pc in m["per_class"].items():
            add(f"recall of {cls} >=", min_recall, pc["recall"], pc["recall"] >= min_recall)
    if max_ece is not None:
        add("ECE <=", max_ece, m["ece"], m["ece"] <= max_ece)
    return {"pass": all(r["pass"] for r in rows), "checks": rows} if rows else None
