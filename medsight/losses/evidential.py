"""The evidential loss of Sensoy et al., "Evidential Deep Learning to Quantify Classification Uncertainty"
(NeurIPS 2018): the expected squared error under the Dirichlet (their Eq. 5) plus an annealed KL term that
shrinks the evidence of the wrong classes. Written by hand: neither torch nor timm ships it."""

from __future__ import annotations

import torch
from torch import nn

from medsight.models.heads import evidential_alpha

__all__ = ["EvidentialLoss", "ExpectedNLL", "dirichlet_kl_to_uniform"]


def dirichlet_kl_to_uniform(alpha: torch.Tensor) -> torch.Tensor:
    """KL(Dir(α) ‖ Dir(1, ..., 1)) per row (Sensoy et al., Eq. 7)."""
    k = alpha.shape[1]
    s = alpha.sum(1)
    return (torch.lgamma(s) - torch.lgamma(torch.tensor(float(k), device=alpha.device))
            - torch.lgamma(alpha).sum(1) + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(s)[:, None])).sum(1))


class EvidentialLoss(nn.Module):
    """Σ_j (y_j − p_j)² + p_j(1 − p_j)/(S + 1)  +  λ_t · KL(Dir(α̃) ‖ Dir(1)),  α̃ = y + (1 − y) ⊙ α,
    averaged over the batch (weighted by the class weight of each image's label when ``weight``).

    λ_t = min(1, t / ``anneal_epochs``) for epoch t (from 0), set by :meth:`set_epoch`, as in the paper: early
    on the model may spread evidence before the KL term punishes misleading evidence. ``targets`` are class
    indices or soft distributions (mixup).
    """

    def __init__(self, num_classes: int, anneal_epochs: int = 10, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.k, self.anneal_epochs = num_classes, anneal_epochs
        self.register_buffer("weight", weight)
        self.register_buffer("kl_weight", torch.tensor(0.0))

    def set_epoch(self, epoch: int) -> None:
        self.kl_weight.fill_(min(1.0, epoch / self.anneal_epochs))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        alpha = evidential_alpha(logits)
        s = alpha.sum(1, keepdim=True)
        p = alpha / s
        y = nn.functional.one_hot(targets, self.k).float() if targets.ndim == 1 else targets.float()
        fit = ((y - p) ** 2 + p * (1 - p) / (s + 1)).sum(1)
        kl = dirichlet_kl_to_uniform(y + (1 - y) * alpha)
        per = fit + self.kl_weight * kl
        if self.weight is None:
            return per.mean()
        w = (y * self.weight[None]).sum(1)
        return (per * w).sum() / w.sum()


class ExpectedNLL(nn.Module):
    """−log of the Dirichlet's expected probability of the true class: the evidential head's validation loss
    (comparable with cross-entropy, which reads softmax probabilities instead)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        alpha = evidential_alpha(logits)
        return -(alpha.gather(1, targets.long()[:, None]).squeeze(1) / alpha.sum(1)).log().mean()
