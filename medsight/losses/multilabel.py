"""Multi-label losses: one sigmoid per finding, with masked labels (-1) left out.

Every loss here takes logits (B, K) and targets (B, K) holding 1, 0 or -1 (masked: an uncertain label
under the "ignore" policy, or a blank one) and returns the mean over the labels that are not masked, so
a batch with many masked labels weighs each remaining label as much as a batch without.

* :class:`MaskedBCE` — binary cross-entropy (torch's ``binary_cross_entropy_with_logits``) with
  per-finding positive weights (negatives / positives in training: a rare finding's positives count
  as much as its negatives in all).
* :class:`BinaryFocal` — the binary focal loss of Lin et al., ICCV 2017 (torchvision's
  ``sigmoid_focal_loss``), per finding.
* :class:`AsymmetricLoss` — ASL, Ridnik et al., "Asymmetric Loss for Multi-Label Classification",
  ICCV 2021: separate focusing for positives and negatives and a probability margin that discards very
  easy negatives. Written here because timm's ``AsymmetricLossMultiLabel`` returns a sum over all labels
  and cannot leave masked ones out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

__all__ = ["MaskedBCE", "BinaryFocal", "AsymmetricLoss", "positive_weights"]


def positive_weights(labels: np.ndarray, cap: float = 100.0) -> torch.Tensor:
    """Per finding: negatives / positives among the labels that are not masked (1 for a finding without
    positives or negatives, at most ``cap``) — the ``pos_weight`` of torch's BCE."""
    labels = np.asarray(labels)
    pos = (labels == 1).sum(0).astype(np.float64)
    neg = (labels == 0).sum(0).astype(np.float64)
    w = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.minimum(w, cap), dtype=torch.float32)


def _masked_mean(per_label: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    mask = (targets >= 0).to(per_label.dtype)
    return (per_label * mask).sum() / mask.sum().clamp_min(1)


class _MultiLabelLoss(nn.Module):
    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def _targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Masked entries -> 0 (their loss is multiplied by 0), smoothing toward 1/2 where asked."""
        t = targets.float().clamp_min(0)
        return t * (1 - self.label_smoothing) + 0.5 * self.label_smoothing if self.label_smoothing else t

    def per_label(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return _masked_mean(self.per_label(logits, self._targets(targets)), targets)


class MaskedBCE(_MultiLabelLoss):
    """Binary cross-entropy per finding with optional ``pos_weight`` (K,), masked labels left out."""

    def __init__(self, pos_weight: torch.Tensor | Sequence[float] | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32))

    def per_label(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, t, pos_weight=self.pos_weight, reduction="none")


class BinaryFocal(_MultiLabelLoss):
    """Binary focal loss per finding (γ focusing; ``alpha`` weights positives, None = no weighting)."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(label_smoothing)
        self.gamma, self.alpha = float(gamma), alpha

    def per_label(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sigmoid_focal_loss(logits, t, alpha=-1 if self.alpha is None else self.alpha, gamma=self.gamma,
                                  reduction="none")


class AsymmetricLoss(_MultiLabelLoss):
    """ASL (Ridnik et al. 2021): L+ = (1-p)^γ+ log p, L- = p_m^γ- log(1-p_m) with p_m = max(p - clip, 0)."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 label_smoothing: float = 0.0, eps: float = 1e-8) -> None:
        super().__init__(label_smoothing)
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = float(gamma_neg), float(gamma_pos), float(clip), eps

    def per_label(self, logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        p_m = (p - self.clip).clamp_min(0) if self.clip else p
        pos = t * (1 - p).pow(self.gamma_pos) * torch.log(p.clamp_min(self.eps))
        neg = (1 - t) * p_m.pow(self.gamma_neg) * torch.log((1 - p_m).clamp_min(self.eps))
        return -(pos + neg)
