"""Classification losses: cross-entropy and focal loss, with class weights, label smoothing and soft targets.

One module handles every combination the recipes use, because torch's ``CrossEntropyLoss`` has weights
and smoothing but no focal term, timm's ``SoftTargetCrossEntropy`` (for mixup/cutmix) has neither
weights nor a focal term, and torchvision's ``sigmoid_focal_loss`` is the binary, per-logit form rather
than the multi-class softmax focal loss (Lin et al., ICCV 2017) used for diabetic-retinopathy grading.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["ClassificationLoss", "class_weights"]


def class_weights(counts: Sequence[int], mode: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """Per-class weights, normalized to mean 1.

    ``inverse``: N / (K · n_k). ``effective``: (1 − β) / (1 − β^n_k), the "effective number of samples"
    of Cui et al., CVPR 2019.
    """
    n = np.maximum(np.asarray(counts, dtype=np.float64), 1)
    if mode == "inverse":
        w = n.sum() / (len(n) * n)
    elif mode == "effective":
        w = (1 - beta) / (1 - np.power(beta, n))
    else:
        raise ValueError(f"unknown class weight mode {mode!r}; choose inverse or effective")
    return torch.tensor(w / w.mean(), dtype=torch.float32)


class ClassificationLoss(nn.Module):
    """Σ_k t_k · w_k · (1 − p_k)^γ · (−log p_k), averaged over the batch (weighted mean when ``weight``).

    ``targets`` are class indices (smoothed with ``label_smoothing``) or soft distributions (mixup).
    γ = 0 is cross-entropy — with hard targets it equals ``nn.CrossEntropyLoss(weight, label_smoothing)``.
    ``alpha`` multiplies the class weights (focal loss's α).
    """

    def __init__(self, gamma: float = 0.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0,
                 alpha: torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        w = weight if weight is not None else None
        if alpha is not None:
            w = alpha if w is None else w * alpha
        self.register_buffer("weight", w)
        self.gamma, self.label_smoothing = gamma, label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.float(), dim=1)
        k = logits.shape[1]
        if targets.ndim == 1:
            hard = targets
            t = torch.nn.functional.one_hot(targets, k).float()
            if self.label_smoothing:
                t = t * (1 - self.label_smoothing) + self.label_smoothing / k
        else:
            hard, t = None, targets.float()
        per_class = -logp
        if self.gamma:
            per_class = per_class * (1 - logp.exp()).pow(self.gamma)
        if self.weight is None:
            return (t * per_class).sum(1).mean()
        w = self.weight.to(logits.device)
        loss = (t * per_class * w).sum(1)
        # torch's convention: weighted mean, normalized by the weights of the samples' (main) classes
        norm = w[hard] if hard is not None else (t * w).sum(1)
        return loss.sum() / norm.sum()
