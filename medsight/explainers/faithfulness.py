"""Are the heatmaps faithful to the model? Deletion and insertion curves (Petsiuk et al., RISE, BMVC 2018).

Deletion: remove the pixels a heatmap ranks highest first (replace them with the image's mean colour)
and follow the probability of the explained class; a faithful map makes it fall fast (low area under
the curve). Insertion: start from the flat mean image and restore the highest-ranked pixels first;
the probability should rise fast (high area). A random map is the yardstick. Written here because the
grad-cam library ships ROAD but not these two curves; everything is batched tensors, no image leaves
the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from medsight.explainers.cam import explain

__all__ = ["deletion_insertion", "faithfulness"]

Activation = Callable[[torch.Tensor], torch.Tensor]


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, 1)


def _baseline(x: torch.Tensor) -> torch.Tensor:
    """Each image's own mean colour: removes local evidence (a blur would keep a bright marker visible)."""
    return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)


@torch.no_grad()
def deletion_insertion(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, class_idx: torch.Tensor,
                       steps: int = 16, activation: Activation = _softmax) -> dict[str, torch.Tensor]:
    """Per image: the deletion and insertion curves (``steps + 1`` points) and their areas.

    Args:
        images: normalized batch (B, 3, H, W); heatmaps: (B, H, W) at the image size; class_idx: (B,).
        activation: logits -> probabilities (the task's: softmax for single-label).
    """
    b, _, h, w = images.shape
    blurred = _baseline(images)
    order = heatmaps.reshape(b, -1).argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w, device=images.device).expand(b, -1))
    ranks = ranks.reshape(b, 1, h, w)
    fractions = torch.linspace(0, 1, steps + 1, device=images.device)
    dele, ins = [], []
    for f in fractions:
        top = (ranks < f * h * w).to(images.dtype)  # the top-f share of pixels by heat
        for target, curve in ((images * (1 - top) + blurred * top, dele), (blurred * (1 - top) + images * top, ins)):
            p = activation(model(target).float()).gather(1, class_idx[:, None])[:, 0]
            curve.append(p)
    dele_t, ins_t = torch.stack(dele, 1), torch.stack(ins, 1)
    area = lambda c: torch.trapezoid(c, fractions, dim=1)  # noqa: E731
    return {"deletion": dele_t, "insertion": ins_t, "deletion_auc": area(dele_t), "insertion_auc": area(ins_t)}


def faithfulness(model: nn.Module, images: torch.Tensor, methods: Sequence[str] = ("gradcam",),
                 target_layer: str | None = None, steps: int = 16, seed: int = 0,
                 activation: Activation = _softmax,
                 explained: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Mean deletion/insertion areas per method and for a random map.

    ``explained`` maps probabilities (B, K) to the output explained per image (default: the most
    probable); ``activation`` is the task's logits -> probabilities.
    """
    model.eval()
    with torch.no_grad():
        probs = activation(model(images).float())
        cls = explained(probs) if explained is not None else probs.argmax(1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    maps = {m: explain(model, images, method=m, target_layer=target_layer, class_idx=cls) for m in methods}
    maps["random"] = torch.rand(images.shape[0], *images.shape[-2:], generator=g).to(images.device)
    out = {}
    for name, heat in maps.items():
        r = deletion_insertion(model, images, heat.to(images.device), cls, steps=steps, activation=activation)
        out[name] = {"deletion_auc": float(r["deletion_auc"].mean()), "insertion_auc": float(r["insertion_auc"].mean()),
                     "deletion_curve": [float(v) for v in r["deletion"].mean(0)],
                     "insertion_curve": [float(v) for v in r["insertion"].mean(0)]}
    return {"images": int(images.shape[0]), "steps": steps, "methods": out}
