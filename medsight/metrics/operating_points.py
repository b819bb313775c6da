"""Operating points of a binary score: a threshold chosen on validation data for a stated target (a
sensitivity, a specificity, or Youden's J), and the sensitivity, specificity, PPV and NPV it reaches on
test with percentile bootstrap intervals.

Functions take ``(y_true_binary, score)`` so that a task applies them to its binary views: the positive class
of a binary task, each class against the rest, the referable grades of an ordinal task, or each finding of a
multi-label task.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from medsight.metrics.bootstrap import bootstrap_cis
from medsight.metrics.rates import RATES, binary_rates

__all__ = ["choose_threshold", "operating_point", "describe_target", "RATES"]


def describe_target(target_sensitivity: float | None, target_specificity: float | None) -> str:
    if target_sensitivity is not None:
        return f"sensitivity ≥ {target_sensitivity:g}"
    if target_specificity is not None:
        return f"specificity ≥ {target_specificity:g}"
    return "Youden's J (sensitivity + specificity − 1) maximal"


def choose_threshold(y_true: np.ndarray, score: np.ndarray, target_sensitivity: float | None = None,
                     target_specificity: float | None = None) -> float | None:
    """The threshold (positive when ``score >= threshold``) for the target, on validation data.

    * ``target_sensitivity``: the highest threshold whose sensitivity reaches the target (the most specific
      one that does);
    * ``target_specificity``: the lowest threshold whose specificity reaches the target;
    * neither: the threshold maximizing Youden's J.

    None when the data lacks positives (or negatives, for a specificity or Youden target).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    if target_sensitivity is not None:
        pos = np.sort(s[y])[::-1]
        if not len(pos):
            return None
        return float(pos[max(1, math.ceil(target_sensitivity * len(pos) - 1e-9)) - 1])
    if target_specificity is not None:
        neg = np.sort(s[~y])
        if not len(neg):
            return None
        m = max(1, math.ceil(target_specificity * len(neg) - 1e-9))  # at least m negatives strictly below
        return float(np.nextafter(neg[m - 1], np.inf))
    if y.all() or not y.any():
        return None
    fpr, tpr, thr = roc_curve(y, s)
    return float(min(max(thr[int(np.argmax(tpr - fpr))], 0.0), 1.0 if s.max() <= 1 else np.inf))


def operating_point(y_true: np.ndarray, score: np.ndarray, threshold: float, *, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict[str, Any]:
    """Sensitivity, specificity, PPV and NPV of ``score >= threshold``, with percentile bootstrap intervals
    (:mod:`medsight.metrics.bootstrap`: None where fewer than half of the resamples define a rate)."""
    y = np.asarray(y_true).astype(bool)
    called = np.asarray(score, dtype=np.float64) >= threshold
    out: dict[str, Any] = {"threshold": float(threshold), "n": int(len(y)), "n_positive": int(y.sum()),
                           **binary_rates(y, called)}
    if n_boot and len(y):
        out["ci95"] = bootstrap_cis(lambda idx: binary_rates(y[idx], called[idx]), len(y), n_boot, seed, level)
    return out
