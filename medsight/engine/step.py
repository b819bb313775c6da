"""One training step for every optimizer: plain (one pass) and SAM/LookSAM (two passes), with mixed
precision, gradient accumulation, clipping and DDP. The engine's loop calls it; nothing else trains."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from medsight.optim import LookSAM, bn_update_disabled, is_sam

__all__ = ["StepOptions", "autocast", "train_step"]


@dataclass
class StepOptions:
    """How :func:`train_step` runs: precision, accumulation, SAM's BatchNorm and multi-GPU behaviour."""

    grad_clip: float = 0.0
    accum_steps: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    sam_bn: str = "first"  # "first" | "both"
    sync_first_pass: bool = True  # DDP: all-reduce the gradient of SAM's ascent pass


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _forward_backward(model: nn.Module, chunks: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: nn.Module,
                      opts: StepOptions, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate gradients over micro-batches; under DDP only the last one all-reduces (if ``sync``)."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    losses, logits_all = [], []
    device = chunks[0][0].device
    n = sum(len(y) for _, y in chunks)
    for i, (x, y) in enumerate(chunks):
        last = i == len(chunks) - 1
        no_sync = model.no_sync() if ddp and not (sync and last) else contextlib.nullcontext()
        with no_sync:
            with autocast(device, opts.precision):
                logits = model(x)
                loss = loss_fn(logits.float(), y) * (len(y) / n)
            (opts.scaler.scale(loss) if opts.scaler is not None else loss).backward()
        losses.append(loss.detach().float())  # stays on the device: no sync per micro-batch
        logits_all.append(logits.detach().float())
    return torch.stack(losses).sum(), torch.cat(logits_all)


def _grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_fn: nn.Module, grad_clip: float = 0.0, opts: StepOptions | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimization step on a batch; for SAM two forward-backward passes.

    The batch is split into ``opts.accum_steps`` micro-batches whose gradients are accumulated, so SAM's
    perturbation uses the gradient of the whole batch. BatchNorm statistics come from the first pass
    only unless ``opts.sam_bn == "both"``. With fp16, the scaler's inf/nan check covers both passes: an
    overflow in either skips the update, and the scale is updated once per step. Returns the (detached)
    loss and logits of the first, unperturbed pass.
    """
    opts = opts or StepOptions(grad_clip=grad_clip)
    scaler = opts.scaler
    chunks = list(zip(images.chunk(opts.accum_steps), labels.chunk(opts.accum_steps)))
    sam = is_sam(optimizer)
    two_pass = sam and (not isinstance(optimizer, LookSAM) or optimizer.needs_second_pass())
    loss, logits = _forward_backward(model, chunks, loss_fn, opts, sync=opts.sync_first_pass or not two_pass)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if two_pass:
        if scaler is not None:
            scaler.unscale_(optimizer)  # the ascent needs the true gradient norm
            if not _grads_finite(optimizer):  # skip both passes; the scaler backs off once
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                return loss, logits
        optimizer.first_step(zero_grad=True)
        bn = contextlib.nullcontext() if opts.sam_bn == "both" else bn_update_disabled(model)
        with bn:
            _forward_backward(model, chunks, loss_fn, opts, sync=True)
        if scaler is not None:
            scaler.unscale_(optimizer.base_optimizer)
        if opts.grad_clip:
            nn.utils.clip_grad_norm_(params, opts.grad_clip)
        optimizer.second_step(zero_grad=True, scaler=scaler)
    else:
        step_opt = optimizer.base_optimizer if sam else optimizer
        if scaler is not None:
            scaler.unscale_(step_opt)
        if opts.grad_clip:
            nn.utils.clip_grad_norm_(params, opts.grad_clip)
        if sam:
            optimizer.reuse_step(zero_grad=True, scaler=scaler)
        else:
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()
    return loss, logits
