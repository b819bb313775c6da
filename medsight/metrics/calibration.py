"""Calibration: temperature scaling and reliability (Guo et al., "On Calibration of Modern Neural Networks",
ICML 2017).

Temperature scaling divides the logits by one scalar T fitted on validation data by minimizing the negative
log-likelihood; it never changes which class has the largest logit, only how sure the model says it is.
The fit is a one-parameter LBFGS on log T (so T stays positive), written here because scikit-learn's
calibrators (isotonic, Platt) work on one score at a time and would not keep the softmax's argmax.

The binary functions take ``(y_true_binary, score)`` so that a task can apply them per class or per finding
(a multi-label task calls them once per finding, with its own T per finding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["fit_temperature", "reliability_bins", "binary_ece", "softmax_nll"]


def softmax_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the true class under softmax."""
    return torch.nn.functional.cross_entropy(logits, labels)


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = softmax_nll,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T > 0 minimizing ``nll(logits / T, labels)`` on (validation) data.

    Args:
        logits: (N, K) raw model outputs.
        labels: (N,) integer labels (or whatever ``nll`` takes as its target).
        nll: the negative log-likelihood of scaled logits (softmax cross-entropy by default; a task whose
            activation is not softmax passes its own).
        bounds: T is clipped into this range (an almost constant model would otherwise drive T to infinity).
    Returns:
        T as a float (1.0 when there is nothing to fit: fewer than two images).
    """
    if len(logits) < 2:
        return 1.0
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not np.isfinite(t):
        return 1.0
    return float(min(max(t, bounds[0]), bounds[1]))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Equal-width confidence bins: per bin the mean confidence, the observed frequency and the count, and
    the ECE they add up to (Σ n_b/N · |freq_b − conf_b|). ``correct`` is 0/1 per image."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(which, weights=hit, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, conf_sum / np.maximum(counts, 1), np.nan)
        freq = np.where(counts > 0, hit_sum / np.maximum(counts, 1), np.nan)
    n = max(len(conf), 1)
    ece = float(np.nansum(counts / n * np.abs(freq - mean_conf)))
    return {"edges": edges.tolist(), "confidence": [None if np.isnan(v) else float(v) for v in mean_conf],
            "frequency": [None if np.isnan(v) else float(v) for v in freq], "count": counts.astype(int).tolist(),
            "ece": ece}


def binary_ece(y_true: np.ndarray, score: np.ndarray, n_bins: int = 15) -> float:
    """ECE of one binary finding: bins of the predicted probability ``score`` against the observed rate of
    ``y_true`` (calibration of a probability, not of a decision)."""
    return reliability_bins(np.asarray(score, dtype=np.float64), np.asarray(y_true, dtype=np.float64), n_bins)["ece"]
