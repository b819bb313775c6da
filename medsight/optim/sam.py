"""Sharpness-Aware Minimization.

Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021; the adaptive variant from Kwon et al., "ASAM", ICML 2021.

Written here because no maintained package ships SAM as a torch optimizer; the shape follows the
widely used reference implementation (davda54/sam): an ``Optimizer`` that wraps a base optimizer,
shares its ``param_groups`` and exposes ``first_step`` / ``second_step`` / ``step(closure)``.
Unlike the reference, ``state_dict`` carries the base optimizer's state (momentum, Adam moments),
so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["SAM", "LookSAM", "bn_update_disabled"]


class SAM(torch.optim.Optimizer):
    """SAM around any torch optimizer.

    Args:
        params: parameters or parameter groups, as for any optimizer.
        base_optimizer: the optimizer class that makes the descent step (e.g. ``torch.optim.SGD``).
        rho: radius of the neighbourhood, ρ in the paper.
        adaptive: ASAM's scale-invariant neighbourhood, ε = ρ·w²·g/‖w·g‖.
        **kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay, ...).

    Usage (two forward-backward passes per step)::

        loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)   # w -> w + e(w)
        loss_fn(model(x), y).backward()
        optimizer.second_step(zero_grad=True)  # back to w, base step with the sharpness-aware gradient
    """

    def __init__(self, params: Any, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, **kwargs: Any) -> None:
        if not rho > 0:
            raise ValueError(f"SAM: rho must be > 0, got {rho}")
        if adaptive and not 0.01 <= rho <= 10:
            warnings.warn(f"SAM: adaptive SAM usually needs rho in [0.01, 10] (the ASAM paper uses 0.5-2); got {rho}",
                          stacklevel=2)
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        norms = [
            ((p.abs() if group["adaptive"] else 1.0) * p.grad).norm(p=2)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).norm(p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to the worst-case point w + ε(w) of the ρ-ball, remembering w."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                e_w = (p.pow(2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        """Return to w and let the base optimizer step with the gradient taken at w + ε(w).

        With an fp16 ``scaler`` the step goes through ``scaler.step(base_optimizer)``, which skips it when
        the second pass overflowed; unscale the second pass with ``scaler.unscale_(base_optimizer)`` first.
        """
        self.restore()
        if scaler is not None:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._opt_called = True  # what torch's LR schedulers check; they only see a wrapped SAM.step
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Return to w without stepping (used when a step is skipped, e.g. an fp16 overflow)."""
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    p.copy_(old)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        """Drop-in step: call after the first ``loss.backward()``; ``closure`` must redo forward+backward."""
        if closure is None:
            raise ValueError("SAM.step needs a closure that recomputes the loss and calls backward()")
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        closure()
        self.second_step()

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


class LookSAM(SAM):
    """SAM that computes the sharpness-aware gradient only every ``k`` steps (Liu et al., CVPR 2022).

    On a refresh step it runs both SAM passes and keeps ``g_v``, the part of the SAM gradient g_s
    orthogonal to the plain gradient g. On the k-1 steps between, one pass gives g and the update uses
    g + α·(‖g‖/‖g_v‖)·g_v (norms per parameter tensor with ``layerwise``, the default; over the whole
    model otherwise), so the extra cost of SAM is paid once every k steps. Written here because
    no maintained package ships it.

    Training loops ask :meth:`needs_second_pass` before each step; when False they call
    :meth:`reuse_step` after the single backward instead of ``first_step``/``second_step``.
    """

    def __init__(self, params: Any, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05,
                 adaptive: bool = False, k: int = 5, alpha: float = 0.7, layerwise: bool = True,
                 **kwargs: Any) -> None:
        if k < 1:
            raise ValueError(f"LookSAM: k must be >= 1, got {k}")
        if alpha < 0:
            raise ValueError(f"LookSAM: alpha must be >= 0, got {alpha}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, **kwargs)
        self.k, self.alpha, self.layerwise = k, alpha, layerwise
        self.steps = 0
        self.g_v: dict[torch.Tensor, torch.Tensor] = {}

    def needs_second_pass(self) -> bool:
        return self.steps % self.k == 0 or not self.g_v

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["g"] = p.grad.detach().clone()
        super().first_step(zero_grad)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None and "g" in self.state[p]]
        if params:
            gs = [p.grad for p in params]
            g = [self.state[p].pop("g") for p in params]
            dot = sum((a.double() * b.double()).sum() for a, b in zip(gs, g))
            gg = sum((b.double() ** 2).sum() for b in g)
            cos = dot / (gg + 1e-24)
            if torch.isfinite(cos):
                self.g_v = {p: (a - cos.to(a.dtype) * b) for p, a, b in zip(params, gs, g)}
        super().second_step(zero_grad, scaler)
        self.steps += 1

    @torch.no_grad()
    def reuse_step(self, zero_grad: bool = False, scaler: torch.amp.GradScaler | None = None) -> None:
        """One-pass step: add the stored orthogonal SAM direction to the plain gradient, then step."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None and p in self.g_v]
        if params and self.layerwise:
            # Layer-wise LookSAM (the paper's variant for adaptive optimizers): each tensor's reused
            # direction is scaled to its own gradient's norm, so Adam's per-coordinate normalization
            # cannot blow a stale direction up in layers whose gradients are small.
            for p in params:
                v = self.g_v[p]
                p.grad.add_(v * (self.alpha * p.grad.norm() / (v.norm() + 1e-12)))
        elif params:
            g_norm = torch.stack([p.grad.norm() for p in params]).norm()
            v_norm = torch.stack([self.g_v[p].norm() for p in params]).norm()
            scale = self.alpha * g_norm / (v_norm + 1e-12)
            for p in params:
                p.grad.add_(self.g_v[p] * scale.to(p.grad.dtype))
        if scaler is not None:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._opt_called = True
        self.steps += 1
        if zero_grad:
            self.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {"base": self.base_optimizer.state_dict(), "steps": self.steps,
                "g_v": {index[p]: v for p, v in self.g_v.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict["base"])
        params = [p for g in self.param_groups for p in g["params"]]
        self.steps = int(state_dict["steps"])
        self.g_v = {params[int(i)]: v.to(params[int(i)]) for i, v in state_dict["g_v"].items()}


@contextlib.contextmanager
def bn_update_disabled(model: nn.Module) -> Iterator[None]:
    """Freeze BatchNorm running statistics for SAM's second pass.

    The original JAX SAM updates the statistics on the first (unperturbed) pass only; the second pass
    sees perturbed weights, whose activations should not leak into the running mean and variance.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
