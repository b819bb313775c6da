"""Sharpness of a trained model: how much the loss can rise within a ρ-ball around its weights.

    S(w) = max_{‖ε‖ ≤ ρ} L(w + ε) − L(w)

estimated on a fixed set of batches (the same images every time, no augmentation, BatchNorm in eval
mode) two ways: by projected gradient ascent (the SAM direction ρ·g/‖g‖, refined for a few steps),
which finds a lower bound of the worst case, and by the largest rise over random directions of norm ρ,
the "average-case" sharpness. Written here because no maintained package measures this for torch
models; the definition is the one of Foret et al. 2021 (and Keskar et al. 2017 for random directions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medsight.data.dataset import label_tensor
from medsight.errors import UsageError

__all__ = ["sharpness", "fixed_batches"]


def fixed_batches(dataset: torch.utils.data.Dataset, n_batches: int, batch_size: int = 64,
                  seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` batches of readable images drawn once with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    batches, xs, ys = [], [], []
    for i in order:
        x, y = dataset[i]
        if x is None:
            continue
        xs.append(x)
        ys.append(y)
        if len(xs) == batch_size:
            batches.append((torch.stack(xs), label_tensor(ys)))
            xs, ys = [], []
            if len(batches) == n_batches:
                break
    if xs and len(batches) < n_batches:
        batches.append((torch.stack(xs), label_tensor(ys)))
    return batches


def _loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], loss_fn: nn.Module,
          device: torch.device, grad: bool = False) -> float:
    total, n = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with torch.set_grad_enabled(grad):
            loss = loss_fn(model(x).float(), y)
            if grad:
                (loss * len(y)).backward()
        total += float(loss.detach()) * len(y)
        n += len(y)
    return total / max(n, 1)


def sharpness(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], rho: float = 0.05,
              loss_fn: nn.Module | None = None, ascent_steps: int = 3, random_directions: int = 5,
              seed: int = 0) -> dict[str, Any]:
    """Estimate the ρ-sharpness of ``model`` on ``batches``; the weights are left as they were.

    Returns ``{"rho", "loss", "ascent", "random", "batches", "images"}``: the loss at w, the rise found
    by gradient ascent and the largest rise over random directions.
    """
    if not rho > 0:
        raise UsageError(f"rho must be > 0, got {rho}")
    if not batches:
        raise UsageError("sharpness needs at least one batch of images")
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()
    try:
        base = _loss(model, batches, loss_fn, device)
        # Projected gradient ascent: start with SAM's ε = ρ·g/‖g‖, then take steps of ρ/2 along the
        # gradient at w+ε and project back onto the sphere of radius ρ.
        eps = [torch.zeros_like(p) for p in params]
        ascent = 0.0
        for step in range(max(1, ascent_steps)):
            model.zero_grad(set_to_none=True)
            _loss(model, batches, loss_fn, device, grad=True)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            gnorm = torch.stack([g.norm() for g in grads]).norm() + 1e-12
            with torch.no_grad():
                lr = rho if step == 0 else rho / 2
                eps = [e + lr * g / gnorm for e, g in zip(eps, grads)]
                enorm = torch.stack([e.norm() for e in eps]).norm() + 1e-12
                eps = [e * (rho / enorm) for e in eps]
                for p, w, e in zip(params, saved, eps):
                    p.copy_(w + e)
            ascent = max(ascent, _loss(model, batches, loss_fn, device) - base)
        model.zero_grad(set_to_none=True)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        rand = float("-inf")
        for _ in range(random_directions):
            d = [torch.randn(p.shape, generator=gen).to(p) for p in params]
            dnorm = torch.stack([x.norm() for x in d]).norm()
            with torch.no_grad():
                for p, w, x in zip(params, saved, d):
                    p.copy_(w + x * (rho / dnorm))
            rand = max(rand, _loss(model, batches, loss_fn, device) - base)
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        model.train(was_training)
    return {"rho": rho, "loss": base, "ascent": ascent, "random": rand if random_directions else None,
            "batches": len(batches), "images": sum(len(y) for _, y in batches)}
