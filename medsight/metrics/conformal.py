"""Split conformal prediction sets (Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction and
Distribution-Free Uncertainty Quantification", 2021).

A score says how badly a class fits an image; its (1 − α) quantile on held-out calibration data (validation)
gives a threshold q̂, and the set of classes scoring at most q̂ contains the true class with probability at
least 1 − α — on average over new images *exchangeable with the calibration images*. The guarantee holds
neither per subgroup nor under distribution shift.

Scores: ``lac`` (least ambiguous set-valued classifier, Sadinle et al. 2019): 1 − p_true; ``aps`` (adaptive
prediction sets, Romano et al. 2020, the non-randomized form): the probability mass of every class at least
as probable as the true one. ``class_conditional`` computes q̂ per true class (Mondrian conformal), which
gives the coverage per class at the cost of larger sets for rare classes.

For a binary view (one finding of a multi-label task) the classes are "absent" and "present": the set is
{absent}, {present}, or both — "uncertain at this coverage" (:func:`fit_binary_conformal`,
:func:`binary_set_metrics`). Each finding's coverage holds on its own; that every finding of an image is
covered at once is not guaranteed, and is reported beside it.

Written here because the method is a quantile and a comparison; the libraries for it (MAPIE, crepes) wrap
scikit-learn estimators, not probabilities from a network.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["conformal_scores", "conformal_quantile", "prediction_sets", "set_metrics", "fit_conformal",
           "fit_binary_conformal", "binary_sets", "binary_set_metrics"]


def conformal_scores(probs: np.ndarray, method: str = "lac") -> np.ndarray:
    """(N, K) non-conformity of every class for every image."""
    p = np.asarray(probs, dtype=np.float64)
    if method == "lac":
        return 1.0 - p
    if method == "aps":
        order = np.argsort(-p, axis=1, kind="stable")
        cum = np.cumsum(np.take_along_axis(p, order, 1), 1)
        scores = np.empty_like(p)
        np.put_along_axis(scores, order, cum, 1)
        return scores
    raise ValueError(f"unknown conformal score {method!r}; choose lac or aps")


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The finite-sample corrected quantile: the ⌈(n+1)(1−α)⌉-th smallest score (inf when n is too small)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    rank = math.ceil((n + 1) * (1 - alpha))
    return float(s[rank - 1]) if 1 <= rank <= n else float("inf")


def fit_conformal(labels: np.ndarray, probs: np.ndarray, coverage: float, method: str = "lac",
                  class_conditional: bool = False) -> dict[str, Any]:
    """q̂ from calibration (validation) data: ``{"method", "coverage", "class_conditional", "qhat"}``, where
    ``qhat`` is one number, or one per class (None for a class without enough calibration images to
    guarantee its coverage: that class is then always in the set)."""
    y = np.asarray(labels, dtype=np.int64)
    true_scores = conformal_scores(probs, method)[np.arange(len(y)), y]
    alpha = 1 - coverage
    if class_conditional:
        qs: list[float | None] = []
        for c in range(np.asarray(probs).shape[1]):
            q = conformal_quantile(true_scores[y == c], alpha)
            qs.append(None if math.isinf(q) else q)
        qhat: float | list[float | None] = qs
    else:
        q = conformal_quantile(true_scores, alpha)
        qhat = q if not math.isinf(q) else 1.0 + 1e-9  # too few images: every class, every time
    return {"method": method, "coverage": float(coverage), "class_conditional": bool(class_conditional),
            "qhat": qhat, "n_calibration": int(len(y))}


def prediction_sets(probs: np.ndarray, conformal: dict[str, Any]) -> np.ndarray:
    """(N, K) boolean membership of every class in every image's set."""
    scores = conformal_scores(probs, conformal["method"])
    q = conformal["qhat"]
    if isinstance(q, list):
        q = np.array([np.inf if v is None else v for v in q], dtype=np.float64)[None, :]
    return scores <= q + 1e-12


def set_metrics(labels: np.ndarray, sets: np.ndarray) -> dict[str, Any]:
    """Empirical coverage (share of images whose set holds the true class), mean set size, share of
    single-class sets, and the coverage per class."""
    y = np.asarray(labels, dtype=np.int64)
    hit = sets[np.arange(len(y)), y]
    size = sets.sum(1)
    per_class = {int(c): float(hit[y == c].mean()) for c in np.unique(y)}
    return {"coverage": float(hit.mean()) if len(y) else None, "mean_set_size": float(size.mean()) if len(y) else None,
            "singleton_rate": float((size == 1).mean()) if len(y) else None, "empty_rate": float((size == 0).mean())
            if len(y) else None, "coverage_per_class": per_class, "n": int(len(y))}


def _two_class(score: np.ndarray) -> np.ndarray:
    s = np.asarray(score, dtype=np.float64)
    return np.stack([1 - s, s], 1)


def fit_binary_conformal(y_true: np.ndarray, score: np.ndarray, coverage: float, method: str = "lac",
                         class_conditional: bool = False) -> dict[str, Any]:
    """:func:`fit_conformal` for one binary view: ``y_true`` 0/1, ``score`` the probability of 1."""
    return fit_conformal(np.asarray(y_true, dtype=np.int64), _two_class(score), coverage, method, class_conditional)


def binary_sets(score: np.ndarray, conformal: dict[str, Any]) -> np.ndarray:
    """(N, 2) membership of "absent" and "present" in each image's set for one binary view."""
    return prediction_sets(_two_class(score), conformal)


def binary_set_metrics(y_true: np.ndarray, score: np.ndarray, conformal: dict[str, Any]) -> dict[str, Any]:
    """:func:`set_metrics` of one binary view, plus ``uncertain_rate``: the share of sets holding both answers."""
    sets = binary_sets(score, conformal)
    m = set_metrics(np.asarray(y_true, dtype=np.int64), sets)
    m["uncertain_rate"] = float(sets.all(1).mean()) if len(sets) else None
    return m
