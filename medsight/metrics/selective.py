"""Selective prediction: answering only when confident enough, and how much that buys.

The risk–coverage curve (Geifman & El-Yaniv, "Selective Classification for Deep Neural Networks", NeurIPS
2017) sorts the images from most to least confident and, at each coverage (the share answered), gives the
error rate among the answered; its area (AURC) is lower for a confidence score that ranks its own errors
last. The abstention threshold is the confidence below which a prediction is referred to a clinician,
chosen on validation data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["risk_coverage", "abstention_threshold"]


def risk_coverage(errors: np.ndarray, confidence: np.ndarray, points: int = 50) -> dict[str, Any]:
    """The risk–coverage curve and its area for 0/1 ``errors`` ranked by ``confidence`` (higher = surer).

    Ties in confidence are broken by error (errors first among equals is the pessimistic order), so a
    constant score gets the AURC of random ranking's expected risk, not a lucky one.
    Returns ``aurc``, the full-coverage ``risk``, and the curve at up to ``points`` coverages.
    """
    err = np.asarray(errors, dtype=np.float64)
    conf = np.asarray(confidence, dtype=np.float64)
    n = len(err)
    if n == 0:
        return {"aurc": None, "risk": None, "coverage": [], "selective_risk": []}
    order = np.lexsort((-err, -conf))  # most confident first; among equals, errors first
    risks = np.cumsum(err[order]) / np.arange(1, n + 1)
    pick = np.unique(np.linspace(0, n - 1, min(points, n)).round().astype(int))
    return {"aurc": float(risks.mean()), "risk": float(err.mean()),
            "coverage": ((pick + 1) / n).tolist(), "selective_risk": risks[pick].tolist()}


def abstention_threshold(confidence: np.ndarray, refer_fraction: float) -> float | None:
    """The confidence below which ``refer_fraction`` of (validation) images are referred; None for 0."""
    if refer_fraction <= 0 or not len(confidence):
        return None
    return float(np.quantile(np.asarray(confidence, dtype=np.float64), refer_fraction))
