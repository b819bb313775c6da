"""Losses for ordered grades (0 < 1 < ... < K-1), each on a head of K outputs.

* :class:`DistanceSmoothedCE` — cross-entropy against a target that keeps ``1 - ε`` on the true grade and
  spreads ``ε`` over the other grades in proportion to ``exp(-|k - y|)``: a grade-4 eye called 3 costs
  less than one called 0. The soft-label idea of SORD (Díaz & Marathe, CVPR 2019), in label-smoothing form.
* :class:`CornLoss` — CORN (Shi, Cao & Raschka, "Deep neural networks for rank-consistent ordinal regression
  based on conditional probabilities", Pattern Analysis and Applications 2023): output ``j`` (1..K-1) is the
  logit of P(y ≥ j | y ≥ j-1), trained only on the images with y ≥ j-1; the products of these conditionals
  are rank-consistent by construction. Output 0 is a "grade 0" logit (BCE on y = 0), so that every grade has
  an output for Grad-CAM to explain; it does not enter the probabilities.
* :class:`ExpectedGradeMSE` — regression: the squared error of the expected grade Σ_k k·softmax(z)_k (a
  score bounded to [0, K-1]), decoded with cut-points tuned on validation data. Squared error leaves the
  softmax itself free (a grade-2 score can be half 0, half 4), so its per-grade probabilities are read from
  the score instead: :func:`regression_probabilities`, a discretized normal of width ``TAU`` around it.

All take class weights (per grade) as per-image weights, with the weighted mean torch uses for cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DistanceSmoothedCE", "CornLoss", "ExpectedGradeMSE", "distance_targets", "corn_probabilities",
           "CornProbabilities", "expected_grade", "regression_probabilities", "RegressionProbabilities", "TAU"]

#: Width (in grades) of the per-grade probabilities a regression head reports around its score.
TAU = 0.5


def distance_targets(labels: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """(N, K) targets: ``1 - eps`` on the grade, ``eps`` over the others in proportion to exp(-|k - y|)."""
    grades = torch.arange(k, device=labels.device)
    dist = (grades[None, :] - labels[:, None]).abs().float()
    w = torch.where(dist > 0, torch.exp(-dist), torch.zeros_like(dist))
    w = w / w.sum(1, keepdim=True)
    return (1 - eps) * F.one_hot(labels, k).float() + eps * w


def _weighted_mean(per_sample: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_sample.mean()
    w = weight.to(per_sample.device)[labels]
    return (per_sample * w).sum() / w.sum()


class DistanceSmoothedCE(nn.Module):
    """Cross-entropy against :func:`distance_targets` (hard labels) or given soft targets (mixup)."""

    def __init__(self, eps: float = 0.2, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if not 0 < eps < 1:
            raise ValueError(f"smoothing must be in (0, 1), got {eps}")
        self.eps = eps
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), 1)
        if targets.ndim == 2:  # already soft (mixup): plain soft cross-entropy
            return -(targets * logp).sum(1).mean()
        t = distance_targets(targets, logits.shape[1], self.eps)
        return _weighted_mean(-(t * logp).sum(1), targets, self.weight)


def corn_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Per-grade probabilities of a CORN head (N, K): P(y > j) = Π_{i ≤ j} σ(z_{i+1}), differenced."""
    cond = torch.sigmoid(logits[:, 1:].float())
    above = [cond[:, 0]]
    for j in range(1, cond.shape[1]):  # a running product, unrolled (K is small; exports to any opset)
        above.append(above[-1] * cond[:, j])
    cum = torch.stack(above, 1)  # P(y > j), j = 0..K-2, non-increasing in j
    ones, zeros = torch.ones_like(cum[:, :1]), torch.zeros_like(cum[:, :1])
    upper = torch.cat([ones, cum], 1)
    lower = torch.cat([cum, zeros], 1)
    return upper - lower


class CornProbabilities(nn.Module):
    """:func:`corn_probabilities` as a module (inside an exported ONNX graph)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return corn_probabilities(logits)


class CornLoss(nn.Module):
    """CORN's conditional binary cross-entropies, summed over the eligible (image, task) pairs and divided
    by their (weighted) number, plus the mean binary cross-entropy of output 0 for "grade 0"."""

    def __init__(self, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = logits.float()
        k = z.shape[1]
        y = targets
        tasks = torch.arange(k - 1, device=z.device)  # task j: output j+1, images with y >= j, target y > j
        eligible = (y[:, None] >= tasks[None, :]).float()
        target = (y[:, None] > tasks[None, :]).float()
        bce = F.binary_cross_entropy_with_logits(z[:, 1:], target, reduction="none")
        w = self.weight.to(z.device)[y] if self.weight is not None else torch.ones_like(z[:, 0])
        cond = (bce * eligible * w[:, None]).sum() / (eligible * w[:, None]).sum().clamp_min(1e-12)
        first = F.binary_cross_entropy_with_logits(z[:, 0], (y == 0).float(), reduction="none")
        return cond + (first * w).sum() / w.sum()


def expected_grade(logits: torch.Tensor) -> torch.Tensor:
    """Σ_k k · softmax(z)_k: the regression head's score, in [0, K-1]."""
    p = torch.softmax(logits.float(), 1)
    return p @ torch.arange(p.shape[1], device=p.device, dtype=p.dtype)


def regression_probabilities(logits: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Per-grade probabilities of a regression head: p_k ∝ exp(-(s - k)² / 2τ²) around its score s. Their
    own expected grade rises with s, so cut-points on it decide as cut-points on s would."""
    s = expected_grade(logits)
    grades = torch.arange(logits.shape[1], device=logits.device, dtype=s.dtype)
    return torch.softmax(-((s[:, None] - grades[None, :]) ** 2) / (2 * tau ** 2), 1)


class RegressionProbabilities(nn.Module):
    """:func:`regression_probabilities` as a module (inside an exported ONNX graph)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return regression_probabilities(logits)


class ExpectedGradeMSE(nn.Module):
    """Squared error of :func:`expected_grade` against the grade (weighted mean with class weights)."""

    def __init__(self, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        err = (expected_grade(logits) - targets.float()) ** 2
        return _weighted_mean(err, targets, self.weight)
