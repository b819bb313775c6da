"""Multi-label metrics: per finding and summarized, with masked labels (-1) left out of each finding.

Per finding (its images whose label is not masked): AUC with a bootstrap interval, average precision,
prevalence, sensitivity and specificity at a threshold chosen on validation data, ECE of its
probability. Summaries: mean AUC over the findings that can be scored (and which cannot, and why),
micro AUC (every unmasked label pooled), mAP, exact-match and Hamming accuracy. AUC and AP come from
scikit-learn; the bootstrap uses the rank-sum AUC (:func:`medsight.metrics.fast_auc`, equal to
scikit-learn's) because it runs 1,000 × K times; intervals follow :mod:`medsight.metrics.bootstrap`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

from medsight.metrics.bootstrap import bootstrap_cis
from medsight.metrics.calibration import binary_ece
from medsight.metrics.operating_points import choose_threshold
from medsight.metrics.ordinal import fast_auc
from medsight.metrics.rates import binary_rates

__all__ = ["multilabel_metrics", "multilabel_epoch_metrics", "finding_thresholds", "unscoreable_reason",
           "binary_ece", "mean_auc"]


def unscoreable_reason(y: np.ndarray) -> str | None:
    """Why a finding's AUC cannot be computed from its labels ``y`` (1, 0, -1 masked), or None."""
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if pos == 0 and neg == 0:
        return "every label masked"
    if pos == 0:
        return "no positive images"
    if neg == 0:
        return "no negative images"
    return None


def finding_thresholds(labels: np.ndarray, probs: np.ndarray, rule: str = "youden", target: float = 0.9
                       ) -> tuple[list[float], list[str | None]]:
    """Per finding, the threshold chosen on (validation) ``labels``: Youden's J, or the highest threshold
    reaching ``target`` sensitivity. A finding that cannot be scored keeps 0.5, with the reason."""
    thresholds, reasons = [], []
    for k in range(labels.shape[1]):
        y, p = labels[:, k], probs[:, k]
        keep = y >= 0
        why = unscoreable_reason(y)
        if why is not None:
            thresholds.append(0.5)
            reasons.append(why)
            continue
        t = choose_threshold(y[keep] == 1, p[keep], target if rule == "sensitivity" else None)
        thresholds.append(min(max(t, 0.0), 1.0))
        reasons.append(None)
    return thresholds, reasons


def mean_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean AUC over the findings that can be scored (None when none can)."""
    aucs = [fast_auc(labels[labels[:, k] >= 0, k] == 1, probs[labels[:, k] >= 0, k]) for k in range(labels.shape[1])]
    aucs = [a for a in aucs if a is not None]
    return float(np.mean(aucs)) if aucs else None


def _exact_hamming(labels: np.ndarray, decided: np.ndarray) -> tuple[float, float]:
    mask = labels >= 0
    right = (decided == labels) | ~mask
    exact = float(right.all(1).mean())
    hamming = float(((decided == labels) & mask).sum() / max(1, mask.sum()))
    return exact, hamming


def multilabel_epoch_metrics(labels: np.ndarray, probs: np.ndarray, decided: np.ndarray) -> dict[str, float | None]:
    """The cheap validation metrics of one epoch: mean AUC, mAP, exact-match and Hamming accuracy."""
    exact, hamming = _exact_hamming(labels, decided)
    aps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(labels.shape[1]):
            keep = labels[:, k] >= 0
            if unscoreable_reason(labels[:, k]) is None:
                aps.append(float(skm.average_precision_score(labels[keep, k] == 1, probs[keep, k])))
    return {"auc": mean_auc(labels, probs), "map": float(np.mean(aps)) if aps else None, "acc": exact,
            "accuracy": exact, "hamming_accuracy": hamming}


def _bootstrap(labels: np.ndarray, probs: np.ndarray, n_boot: int, seed: int) -> tuple[list[list[float] | None],
                                                                                   list[float] | None]:
    """Per finding, the interval of its AUC over ``n_boot`` resamples of the images; and that of the
    resamples' mean AUC over the findings they can score."""
    k = labels.shape[1]

    def stats(idx: np.ndarray) -> dict[str, float | None]:
        y, p = labels[idx], probs[idx]
        aucs = {str(j): fast_auc(y[y[:, j] >= 0, j] == 1, p[y[:, j] >= 0, j]) for j in range(k)}
        scored = [a for a in aucs.values() if a is not None]
        return {**aucs, "mean": float(np.mean(scored)) if scored else None}

    cis = bootstrap_cis(stats, len(labels), n_boot, seed)
    return [cis[str(j)] for j in range(k)], cis["mean"]


def multilabel_metrics(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], thresholds: Sequence[float],
                       *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every multi-label metric; see the module docstring. ``thresholds``: per finding, chosen on validation.

    ``auc`` is the mean AUC over scoreable findings and ``accuracy`` the exact-match accuracy (the keys
    every task's metrics share); ``per_class`` carries each finding's sensitivity as ``recall``.
    """
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    decided = (probs >= t[None, :]).astype(np.float64)
    ci_per, ci_mean = _bootstrap(labels, probs, n_boot, seed) if n_boot else ([None for _ in classes], None)
    findings: dict[str, dict[str, Any]] = {}
    unscoreable: dict[str, str] = {}
    aucs, aps, eces = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, name in enumerate(classes):
            y_all = labels[:, k]
            keep = y_all >= 0
            y, p = y_all[keep].astype(int), probs[keep, k]
            why = unscoreable_reason(y_all)
            rates = binary_rates(y == 1, p >= t[k])
            f: dict[str, Any] = {"n": int(keep.sum()), "positives": int((y == 1).sum()), "masked": int((~keep).sum()),
                                 "prevalence": float(y.mean()) if len(y) else None, "threshold": float(t[k]),
                                 "sensitivity": rates["sensitivity"], "specificity": rates["specificity"],
                                 "ece": binary_ece(y, p) if len(y) else None, "auc": None, "ap": None}
            if why is None:
                f["auc"] = float(skm.roc_auc_score(y, p))
                f["ap"] = float(skm.average_precision_score(y, p))
                f["ci95"] = {"auc": ci_per[k]} if n_boot else {}
                aucs.append(f["auc"])
                aps.append(f["ap"])
            else:
                unscoreable[name] = why
            if f["ece"] is not None:
                eces.append(f["ece"])
            findings[name] = f
        mask = labels >= 0
        flat_y, flat_p = labels[mask], probs[mask]
        micro = float(skm.roc_auc_score(flat_y, flat_p)) if len(np.unique(flat_y)) == 2 else None
    exact, hamming = _exact_hamming(labels, decided)
    balanced = [(f["sensitivity"] + f["specificity"]) / 2 for f in findings.values()
                if f["sensitivity"] is not None and f["specificity"] is not None]
    out: dict[str, Any] = {
        "n": int(len(labels)), "auc": float(np.mean(aucs)) if aucs else None, "mean_auc": float(np.mean(aucs)) if aucs else None,
        "scored": [c for c in classes if c not in unscoreable], "unscoreable": unscoreable,
        "micro_auc": micro, "map": float(np.mean(aps)) if aps else None,
        "accuracy": exact, "exact_match": exact, "hamming_accuracy": hamming,
        "balanced_accuracy": float(np.mean(balanced)) if balanced else None,
        "ece": float(np.mean(eces)) if eces else 0.0, "findings": findings,
        "per_class": {c: {"recall": f["sensitivity"], "specificity": f["specificity"], "support": f["positives"]}
                      for c, f in findings.items()},
    }
    if n_boot:
        out["ci95"] = {"auc": ci_mean}
    return out
