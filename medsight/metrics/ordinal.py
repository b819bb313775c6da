"""Metrics for ordered grades: weighted kappa, accuracy within one grade, mean absolute grade error, per-grade
AUC, and the referable view (grade ≥ r: sensitivity, specificity and AUC at a threshold chosen on
validation data for a target sensitivity), each with a percentile bootstrap interval
(:mod:`medsight.metrics.bootstrap`).

Quadratic weighted kappa (Cohen 1968) is the metric of the Kaggle/EyePACS (2015) and APTOS (2019)
diabetic-retinopathy competitions: disagreements cost the square of their distance in grades. The point
estimates come from scikit-learn (``cohen_kappa_score``); the bootstrap recomputes kappa and AUC from
confusion counts and ranks, which gives the same numbers (tested) a hundred times faster.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.metrics import cohen_kappa_score

from medsight.metrics.bootstrap import bootstrap_cis
from medsight.metrics.classification import auc_score, checklist, classification_metrics
from medsight.metrics.rates import binary_rates

__all__ = ["weighted_kappa", "quadratic_kappa", "fast_auc", "referable", "ordinal_metrics",
           "ordinal_checklist", "fit_cutpoints", "apply_cutpoints"]


def quadratic_kappa(labels: np.ndarray, pred: np.ndarray, k: int, weights: str = "quadratic") -> float | None:
    """scikit-learn's weighted kappa over the grades 0..k-1; None when undefined (one grade everywhere)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = cohen_kappa_score(labels, pred, labels=list(range(k)), weights=weights)
    return None if not np.isfinite(v) else float(v)


def weighted_kappa(labels: np.ndarray, pred: np.ndarray, k: int, power: int = 2) -> float | None:
    """Weighted kappa from the confusion counts: 1 - Σ w·O / Σ w·E, w = |i - j|^power (2: quadratic)."""
    n = len(labels)
    if n == 0:
        return None
    o = np.bincount(np.asarray(labels) * k + np.asarray(pred), minlength=k * k).reshape(k, k).astype(np.float64)
    e = np.outer(o.sum(1), o.sum(0)) / n
    i = np.arange(k)
    w = np.abs(i[:, None] - i[None, :]).astype(np.float64) ** power
    denom = (w * e).sum()
    return None if denom == 0 else float(1 - (w * o).sum() / denom)


def fast_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half; None without both classes."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, where, counts = np.unique(np.asarray(score, dtype=np.float64), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[where]  # 1-based ranks, ties averaged
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _macro_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    present = np.unique(labels)
    if len(present) < 2:
        return None
    return float(np.mean([fast_auc(labels == c, probs[:, c]) for c in present]))


def referable(labels: np.ndarray, scores: np.ndarray, grade: int, threshold: float | None) -> dict[str, Any]:
    """Sensitivity, specificity (at ``threshold``) and AUC of ``scores`` for "grade ≥ ``grade``"."""
    positive = np.asarray(labels) >= grade
    out: dict[str, Any] = {"grade": grade, "n_refer": int(positive.sum()), "n": int(len(positive)),
                           "auc": fast_auc(positive, scores), "threshold": threshold}
    if threshold is not None:
        rates = binary_rates(positive, np.asarray(scores) >= threshold)
        out["sensitivity"], out["specificity"] = rates["sensitivity"], rates["specificity"]
    return out


def apply_cutpoints(scores: np.ndarray, cuts: list[float] | np.ndarray) -> np.ndarray:
    """Grades from scores: the number of cut-points each score exceeds."""
    return (np.asarray(scores, dtype=np.float64)[:, None] > np.asarray(cuts, dtype=np.float64)[None, :]).sum(1)


def fit_cutpoints(labels: np.ndarray, scores: np.ndarray, k: int, passes: int = 10,
                  max_candidates: int = 256) -> list[float]:
    """Cut-points on ``scores`` that maximize quadratic weighted kappa against ``labels``.

    Coordinate ascent from the rounding cuts 0.5, 1.5, ...: each cut in turn moves to the midpoint between
    neighbouring scores (kept between its neighbours) that gives the highest kappa, the nearest one on a tie,
    until a pass changes nothing. The "optimized rounder" that won APTOS 2019 does the same with Nelder-Mead.
    Fit on validation data only: on the data it was fit on, its kappa is optimistic.
    """
    labels = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    cuts = np.arange(k - 1, dtype=np.float64) + 0.5
    u = np.unique(s)
    mids = (u[1:] + u[:-1]) / 2 if len(u) > 1 else u
    if len(mids) > max_candidates:
        mids = np.unique(np.quantile(mids, np.linspace(0, 1, max_candidates)))

    def kappa(c: np.ndarray) -> float:
        v = weighted_kappa(labels, apply_cutpoints(s, c), k, 2)
        return -np.inf if v is None else v

    best = kappa(cuts)
    for _ in range(passes):
        moved = False
        for j in range(k - 1):
            lo = cuts[j - 1] if j > 0 else -np.inf
            hi = cuts[j + 1] if j < k - 2 else np.inf
            options = [c for c in mids if lo < c < hi]
            for c in sorted(options, key=lambda c: abs(c - cuts[j])):
                trial = cuts.copy()
                trial[j] = c
                v = kappa(trial)
                if v > best + 1e-12:
                    best, cuts, moved = v, trial, True
        if not moved:
            break
    return [float(c) for c in cuts]


def _bootstrap(labels: np.ndarray, probs: np.ndarray, pred: np.ndarray, k: int, refer_scores: np.ndarray,
               refer_grade: int, threshold: float | None, n_boot: int, seed: int) -> dict[str, list[float] | None]:
    def stats(i: np.ndarray) -> dict[str, float | None]:
        y, p, err = labels[i], pred[i], np.abs(labels[i] - pred[i])
        r = referable(y, refer_scores[i], refer_grade, threshold)
        return {"qwk": weighted_kappa(y, p, k, 2), "linear_kappa": weighted_kappa(y, p, k, 1),
                "accuracy": float((err == 0).mean()), "within_one": float((err <= 1).mean()), "mae": float(err.mean()),
                "auc": _macro_auc(y, probs[i]), "refer_sensitivity": r.get("sensitivity"),
                "refer_specificity": r.get("specificity"), "refer_auc": r["auc"]}

    return bootstrap_cis(stats, len(labels), n_boot, seed)


def ordinal_metrics(labels: np.ndarray, probs: np.ndarray, pred: np.ndarray, classes: list[str], *,
                    refer_scores: np.ndarray, refer_grade: int = 2, refer_at: float | None = None,
                    n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every metric of graded predictions: the classification metrics at the decided grades ``pred``, plus
    quadratic and linear weighted kappa, accuracy within one grade, mean absolute error, AUC per grade and
    the referable view (``refer_scores`` thresholded at ``refer_at``), with 95% bootstrap intervals."""
    labels = np.asarray(labels, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    out = classification_metrics(labels, probs, classes, n_boot=0, pred=pred)
    err = np.abs(labels - pred)
    out.update({
        "qwk": quadratic_kappa(labels, pred, k, "quadratic"),
        "linear_kappa": quadratic_kappa(labels, pred, k, "linear"),
        "within_one": float((err <= 1).mean()),
        "mae": float(err.mean()),
        "auc": auc_score(labels, probs),
        "auc_per_grade": {c: fast_auc(labels == g, probs[:, g]) for g, c in enumerate(classes)},
        "refer": referable(labels, refer_scores, refer_grade, refer_at),
    })
    at_grade = binary_rates(labels >= refer_grade, pred >= refer_grade)
    out["refer"]["sensitivity_at_grade"] = at_grade["sensitivity"]
    out["refer"]["specificity_at_grade"] = at_grade["specificity"]
    if n_boot:
        ci = _bootstrap(labels, probs, pred, k, np.asarray(refer_scores, dtype=np.float64), refer_grade, refer_at,
                        n_boot, seed)
        out["ci95"] = {key: v for key, v in ci.items() if not key.startswith("refer_")}
        out["refer"]["ci95"] = {key[len("refer_"):]: v for key, v in ci.items() if key.startswith("refer_")}
    return out


def ordinal_checklist(m: dict[str, Any], min_accuracy: float | None = None, min_auc: float | None = None,
                      min_recall: float | None = None, max_ece: float | None = None, min_qwk: float | None = None,
                      min_refer_sensitivity: float | None = None) -> dict[str, Any] | None:
    """The classification checklist plus kappa and referable sensitivity, or None when nothing is set."""
    base = checklist(m, min_accuracy=min_accuracy, min_auc=min_auc, min_recall=min_recall, max_ece=max_ece)
    rows = list(base["checks"]) if base else []
    if min_qwk is not None:
        v = m.get("qwk")
        rows.append({"check": "quadratic weighted kappa >=", "threshold": min_qwk, "value": v,
                     "pass": bool(v is not None and v >= min_qwk)})
    if min_refer_sensitivity is not None:
        v = m.get("refer", {}).get("sensitivity")
        rows.append({"check": f"referable (grade >= {m.get('refer', {}).get('grade')}) sensitivity >=",
                     "threshold": min_refer_sensitivity, "value": v,
                     "pass": bool(v is not None and v >= min_refer_sensitivity)})
    return {"pass": all(r["pass"] for r in rows), "checks": rows} if rows else None
