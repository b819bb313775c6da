"""Fit a run into a time budget: measure this machine's speed in a few steps, then choose the epochs.

The measurement trains a copy of the model on a few real batches (the run's own weights and random
state are left exactly as they were), times validation, and estimates the end-of-run evaluation. The
chosen epoch count is saved in the run's config.yaml (with the budget removed), so the run can be
repeated exactly on any machine.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medsight.data import make_loader
from medsight.engine.build import Run
from medsight.engine.step import train_step
from medsight.errors import MedsightError
from medsight.optim import create_optimizer

__all__ = ["BudgetFit", "measure_speed", "epochs_for_budget", "BudgetError"]

#: Share of the budget kept for what the estimate misses (start-up, plots, the report).
SAFETY = 0.85


class BudgetError(MedsightError, ValueError):
    """A time budget too short for one epoch on this machine."""


@dataclass(frozen=True)
class BudgetFit:
    budget: float
    step_seconds: float  # one optimizer step (both SAM passes), measured
    eval_image_seconds: float  # one image through the model in evaluation, measured
    steps_per_epoch: int
    epoch_seconds: float
    finish_seconds: float
    epochs: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def measure_speed(run: Run, steps: int = 3) -> tuple[float, float]:
    """(seconds per optimizer step, seconds per evaluated image) on this machine, on real batches."""
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    model = copy.deepcopy(run.model).train()
    opt = create_optimizer(model, run.cfg.optim)
    loader = make_loader(run.datasets["train"], run.loaders["train"].batch_size, False, 0)
    batches = []
    for x, y, _ in loader:
        if len(x):
            batches.append((x.to(run.device).contiguous(memory_format=torch.channels_last), y.to(run.device)))
        if len(batches) == min(steps + 1, len(loader)):
            break
    try:
        times = []
        for i in range(steps + 1):  # the first step warms up; a small data set's batches are reused
            x, y = batches[i % len(batches)]
            t0 = time.perf_counter()
            train_step(model, x, y, opt, run.loss_fn, opts=run.opts)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step = float(np.median(times[1:]))
        model.eval()
        x = batches[0][0]
        with torch.no_grad():
            t0 = time.perf_counter()
            model(x)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            per_image = (time.perf_counter() - t0) / len(x)
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
    return step, per_image


def epochs_for_budget(run: Run, budget: float, max_epochs: int) -> BudgetFit:
    """The most epochs (up to ``max_epochs``) that fit ``budget`` seconds, evaluation included."""
    step, per_image = measure_speed(run)
    steps = len(run.loaders["train"])
    n_val, n_test = len(run.datasets["val"]), len(run.datasets["test"])
    epoch = steps * step + n_val * per_image
    # test predictions, the gallery's and faithfulness' CAM passes and the sharpness estimate: about
    # thirty training steps' worth of work on a few hundred images
    finish = n_test * per_image + 30 * step
    usable = budget * SAFETY - finish
    epochs = math.floor(usable / epoch) if epoch > 0 else max_epochs
    if epochs < 1:
        need = math.ceil((epoch + finish) / SAFETY)
        raise BudgetError(f"train.time_budget {budget:g}s is too short on this machine: one epoch takes about "
                          f"{epoch:.0f}s ({steps} steps of {step:.2f}s) plus {finish:.0f}s to evaluate and report; "
                          f"give at least {need}s, or lower data.image_size or train.batch_size")
    return BudgetFit(budget=budget, step_seconds=step, eval_image_seconds=per_image, steps_per_epoch=steps,
                     epoch_seconds=epoch, finish_seconds=finish, epochs=min(epochs, max_epochs))
