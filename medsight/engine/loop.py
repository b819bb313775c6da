"""The loop's two halves: one training epoch, and one validation pass (timm's train_one_epoch / validate)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from medsight.engine.build import Run, mix_batch
from medsight.engine.distributed import check_replicas
from medsight.engine.step import train_step
from medsight.errors import MedsightError
from medsight.inference.predictor import predict_loader

__all__ = ["TrainingError", "EpochState", "train_one_epoch", "validate", "SYNC_EVERY"]

#: Training steps between reads of the running loss (divergence check, progress bar).
SYNC_EVERY = 10


class TrainingError(MedsightError, RuntimeError):
    """Training cannot go on: the loss diverged, the data is unusable, or the run folder would be overwritten."""


@dataclass
class EpochState:
    """What the loop carries from epoch to epoch (and what last.pt stores to resume it)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best: float = float("-inf")
    best_epoch: int = 0
    since_best: int = 0
    skipped: set[str] = field(default_factory=set)
    stop: bool = False
    optimizer: Any = None
    scheduler: Any = None
    phase: int = 1


def train_one_epoch(run: Run, state: EpochState, epoch: int, progress: bool) -> dict[str, float]:
    """One pass over the training loader; returns the epoch's mean loss, accuracy, images and seconds."""
    device, t0 = run.device, time.time()
    run.model.train()
    if hasattr(run.loss_fn, "set_epoch"):  # the evidential loss anneals its KL term by epoch
        run.loss_fn.set_epoch(epoch)
    # running sums stay on the device and are read every SYNC_EVERY steps: a read waits for the GPU, and
    # waiting every step would leave it idle while the next batch is launched
    loss_dev = torch.zeros((), device=device)
    correct_dev = torch.zeros((), device=device, dtype=torch.long)
    sums = {"loss": 0.0, "correct": 0, "seen": 0}
    bar = tqdm(run.loaders["train"], desc=f"epoch {epoch + 1}/{run.cfg.train.epochs}", leave=False,
               disable=not progress, dynamic_ncols=True)

    def read() -> None:
        sums["loss"], sums["correct"] = float(loss_dev), int(correct_dev)
        if not math.isfinite(sums["loss"]):
            raise TrainingError(f"loss became {sums['loss']} at epoch {epoch + 1}: training diverged; lower "
                                f"optim.lr (now {run.cfg.optim.lr:g}) or optim.rho, or set train.grad_clip")
        bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.4f}", acc=f"{sums['correct'] / sums['seen']:.3f}")

    for steps, (x, y, bad) in enumerate(bar, 1):
        state.skipped.update(bad)
        if len(x) == 0:
            continue
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        x, y, target = mix_batch(run.mixer, x, y)
        loss, logits = train_step(run.step_model, x, target, state.optimizer, run.loss_fn, opts=run.opts)
        state.scheduler.step()
        loss_dev += loss.detach().float() * len(y)
        correct_dev += run.task.head.correct(logits, y, run.task.rules)  # against the unmixed labels
        sums["seen"] += len(y)
        if steps % SYNC_EVERY == 0:
            read()
    if sums["seen"]:
        read()
    bar.close()
    if sums["seen"] == 0:
        raise TrainingError("no readable training images in this epoch")
    return {"train_loss": sums["loss"] / sums["seen"], "train_acc": sums["correct"] / sums["seen"],
            "train_images": sums["seen"], "train_seconds": time.time() - t0}


def validate(run: Run, state: EpochState) -> tuple[dict[str, float | None], float]:
    """The task's epoch metrics and the plain loss on the validation split."""
    if run.dinfo.enabled:
        for b in run.model.buffers():  # BatchNorm statistics: rank 0's, so every rank evaluates alike
            torch.distributed.broadcast(b, 0)
        check_replicas(run.model, run.device)
    if run.before_eval is not None:
        run.before_eval()
    probs, labels, loss, bad = predict_loader(run.model, run.loaders["val"], run.device, run.task,
                                              loss_fn=run.eval_loss_fn)
    state.skipped.update(bad)
    return run.task.epoch_metrics(np.asarray(labels), probs), loss
