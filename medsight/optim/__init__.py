"""Optimizers by name (plain and SAM-wrapped) and learning-rate schedules."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from medsight.config import OptimizerName, choices
from medsight.errors import UsageError
from medsight.optim.sam import SAM, LookSAM, bn_update_disabled

if TYPE_CHECKING:
    from medsight.config import OptimConfig, ScheduleConfig

__all__ = ["SAM", "LookSAM", "OPTIMIZERS", "bn_update_disabled", "create_optimizer", "create_scheduler", "is_sam"]

#: name -> (base optimizer class, wrapper: None, SAM or LookSAM); the names are config.OptimizerName's.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], type[SAM] | None]] = {
    "sgd": (torch.optim.SGD, None),
    "adam": (torch.optim.Adam, None),
    "adamw": (torch.optim.AdamW, None),
    "sam-sgd": (torch.optim.SGD, SAM),
    "sam-adam": (torch.optim.Adam, SAM),
    "sam-adamw": (torch.optim.AdamW, SAM),
    "looksam-sgd": (torch.optim.SGD, LookSAM),
    "looksam-adam": (torch.optim.Adam, LookSAM),
    "looksam-adamw": (torch.optim.AdamW, LookSAM),
}
assert tuple(OPTIMIZERS) == choices(OptimizerName), "medsight.config.OptimizerName and OPTIMIZERS disagree"


def is_sam(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, SAM)


def create_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False,
                     lr_scales: list[tuple[float, list[str]]] | None = None) -> torch.optim.Optimizer:
    """Build the optimizer named in ``cfg``; biases and norm weights get no weight decay (timm's grouping).

    ``fused`` asks torch for its fused multi-tensor kernels (CUDA parameters only). ``lr_scales`` gives
    (scale, parameter names) pairs for discriminative learning rates; frozen parameters are left out.
    """
    from timm.optim import param_groups_weight_decay

    if cfg.name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {cfg.name!r}; choose from {', '.join(OPTIMIZERS)}")
    base, wrapper = OPTIMIZERS[cfg.name]
    if lr_scales is None:
        params = param_groups_weight_decay(model, cfg.weight_decay)
    else:  # discriminative learning rates: one pair of groups (decay / no decay) per scale
        params = []
        named = dict(model.named_parameters())
        for scale, names in lr_scales:
            ps = [named[n] for n in names if named[n].requires_grad]
            decay = [p for p in ps if p.ndim > 1]
            no_decay = [p for p in ps if p.ndim <= 1]
            params += [g for g in ({"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr * scale},
                                   {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr * scale}) if g["params"]]
    kwargs: dict = {"lr": cfg.lr}
    if base is torch.optim.SGD:
        kwargs.update(momentum=cfg.momentum, nesterov=False)
    if fused:
        kwargs["fused"] = True  # torch's fused kernels (CUDA); one launch for all parameters
    if wrapper is LookSAM:
        return LookSAM(params, base, rho=cfg.rho, adaptive=cfg.adaptive, k=cfg.looksam_k,
                       alpha=cfg.looksam_alpha, layerwise=cfg.looksam_layerwise, **kwargs)
    if wrapper is SAM:
        return SAM(params, base, rho=cfg.rho, adaptive=cfg.adaptive, **kwargs)
    return base(params, **kwargs)


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, epochs: int,
                     steps_per_epoch: int, base_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration schedule: cosine with linear warmup, StepLR or MultiStepLR (by epoch), or constant."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1) if cfg.name == "cosine" else 0
    floor = min(cfg.min_lr / base_lr, 1.0)

    def factor(step: int) -> float:
        if cfg.name == "step":
            return cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
        if cfg.name == "multistep":
            return cfg.gamma ** sum(step >= m * steps_per_epoch for m in cfg.milestones)
        if cfg.name == "none":
            return 1.0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
