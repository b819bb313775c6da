"""Losses on the embedding (the classifier's input): batch-hard triplet, center and prototypical losses, and
the wrapper that adds them to a task's own loss. Written by hand: timm and torch have none of them with
batch-hard mining or the center update of the paper.

* Triplet (Schroff et al., CVPR 2015, on L2-normalized embeddings, margin m) with batch-hard mining (Hermans
  et al. 2017): per anchor, its farthest same-class image and nearest other-class image in the batch.
* Center loss (Wen et al., ECCV 2016): ½‖f − c_y‖², the centres c moved toward their class's features by the
  paper's rule c_j ← c_j − α Σ_i (c_j − f_i) / (1 + n_j) each forward pass, not by the optimizer. (With SAM
  both passes of a step move them.)
* Prototypical (Snell et al., NeurIPS 2017): each batch is an episode; per class half its images are the
  support (at least one), whose mean is the prototype, the rest are queries classified by −‖f − c_k‖².
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medsight.models.heads import EmbeddingTap

__all__ = ["batch_hard_triplet", "CenterLoss", "prototypical_loss", "EmbeddingLoss", "PrototypicalLoss"]


def _pairwise_distances(z: torch.Tensor) -> torch.Tensor:
    sq = (z * z).sum(1)
    return (sq[:, None] - 2 * z @ z.T + sq[None]).clamp_min(1e-12).sqrt()


def batch_hard_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Mean over anchors that have both a positive and a negative in the batch of
    max(0, d(a, hardest positive) − d(a, hardest negative) + margin); 0 when no anchor has both."""
    z = F.normalize(embeddings.float(), dim=1)
    d = _pairwise_distances(z)
    same = labels[:, None] == labels[None]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    hardest_pos = d.masked_fill(~pos, 0).max(1).values
    hardest_neg = d.masked_fill(same, float("inf")).min(1).values
    valid = pos.any(1) & (~same).any(1)
    if not valid.any():
        return z.sum() * 0
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()


class CenterLoss(nn.Module):
    """½ mean ‖f_i − c_{y_i}‖² with per-class centres updated by Wen et al.'s rule at rate ``alpha``."""

    def __init__(self, num_classes: int, alpha: float = 0.5) -> None:
        super().__init__()
        self.k, self.alpha = num_classes, alpha
        self.register_buffer("centers", torch.zeros(0))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        f = features.float()
        if self.centers.numel() == 0:
            self.centers = torch.zeros(self.k, f.shape[1], device=f.device)
        c = self.centers[labels]
        loss = 0.5 * ((f - c) ** 2).sum(1).mean()
        if torch.is_grad_enabled():
            with torch.no_grad():
                diff = torch.zeros_like(self.centers).index_add_(0, labels, c - f.detach())
                n = torch.bincount(labels, minlength=self.k).to(f.dtype)
                self.centers -= self.alpha * diff / (1 + n)[:, None]
        return loss


def prototypical_loss(embeddings: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """Cross-entropy of the queries over −‖f − c_k‖² to the prototypes of the classes in the batch (one random
    support/query split per class: half support, at least one); 0 (with a graph) when there is no query."""
    f = embeddings.float()
    present = torch.unique(labels)
    protos, queries, targets = [], [], []
    for j, c in enumerate(present):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator).to(idx.device)]
        n_support = max(1, len(idx) // 2)
        protos.append(f[idx[:n_support]].mean(0))
        queries.append(idx[n_support:])
        targets.append(torch.full((len(idx) - n_support,), j, dtype=torch.long, device=f.device))
    q = torch.cat(queries)
    if len(q) == 0:
        return f.sum() * 0
    c = torch.stack(protos)
    logits = -((f[q][:, None, :] - c[None]) ** 2).sum(-1)
    return F.cross_entropy(logits, torch.cat(targets))


def _hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indices; for mixed soft targets the dominant class of each image."""
    return targets if targets.ndim == 1 else targets.argmax(1)


class EmbeddingLoss(nn.Module):
    """The task's ``base`` loss plus ``triplet_weight`` × batch-hard triplet and ``center_weight`` × center
    loss on the embedding that ``tap`` captured in the same forward pass."""

    def __init__(self, base: nn.Module, tap: EmbeddingTap, num_classes: int, triplet_weight: float = 0.0,
                 triplet_margin: float = 0.2, center_weight: float = 0.0, center_alpha: float = 0.5) -> None:
        super().__init__()
        self.base, self.tap = base, tap
        self.triplet_weight, self.triplet_margin, self.center_weight = triplet_weight, triplet_margin, center_weight
        self.center = CenterLoss(num_classes, center_alpha)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.base(logits, targets)
        f, y = self.tap.take(), _hard_labels(targets)
        if self.triplet_weight:
            loss = loss + self.triplet_weight * batch_hard_triplet(f, y, self.triplet_margin)
        if self.center_weight:
            loss = loss + self.center_weight * self.center(f, y)
        return loss


class PrototypicalLoss(nn.Module):
    """Episodic training of the prototype head: :func:`prototypical_loss` on the captured embedding (the
    head's own logits, from the previous prototypes, are not used)."""

    def __init__(self, tap: EmbeddingTap) -> None:
        super().__init__()
        self.tap = tap

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return prototypical_loss(self.tap.take(), _hard_labels(targets))
