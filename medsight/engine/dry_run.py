"""Check a config in seconds: build everything it describes and run a few steps, without its data set."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from medsight.config import Config, validate_config
from medsight.data import ROTATION_CLASSES, ImageDataset, load_data, make_loader, make_transform, to_three_channels
from medsight.engine.build import build_model, make_mixer, mix_batch, seed_everything
from medsight.engine.loop import TrainingError
from medsight.engine.step import StepOptions, train_step
from medsight.models import count_parameters, data_config
from medsight.optim import create_optimizer, create_scheduler
from medsight.tasks import build_task
from medsight.utils.device import resolve_device

__all__ = ["dry_run"]


def _synthetic(cfg: Config) -> tuple[list[str], list[torch.Tensor], torch.Tensor]:
    """Generated images of the configured size and class count (``data.class_names``, else 2)."""
    k = (len(ROTATION_CLASSES) if cfg.data.pretext == "rotation"
         else cfg.data.num_classes or (len(cfg.data.class_names) if cfg.data.class_names else 2))
    size = cfg.data.image_size
    n = max(2 * k, min(cfg.train.batch_size * cfg.train.accum_steps, 16))
    g = torch.Generator().manual_seed(cfg.train.seed)
    raw = [torch.rand(1, size + 8, size + 8, generator=g) for _ in range(n)]
    return [str(i) for i in range(k)], raw, torch.arange(n) % k


def dry_run(cfg: Config, synthetic: bool = True, steps: int = 2) -> dict[str, Any]:
    """Build everything ``cfg`` describes and run ``steps`` training steps and one evaluation step.

    With ``synthetic``, on generated images, so a recipe is checked in seconds without its data set;
    otherwise on the first batch of the real data. Pretrained weights are not downloaded (random init,
    said in the result).
    """
    cfg = validate_config(cfg)
    t0 = time.time()
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    if synthetic:
        classes, raw, labels = _synthetic(cfg)
    else:
        bundle = load_data(cfg.data)
        classes = bundle.classes
    task = build_task(cfg.data.task, classes, cfg=cfg)
    model, frozen = build_model(cfg, task.head.num_outputs, pretrained=False)
    dc = data_config(model)
    size = cfg.data.image_size
    train_tf = make_transform(size, dc["mean"], dc["std"], train=True, cfg=cfg.data)
    eval_tf = make_transform(size, dc["mean"], dc["std"], train=False, cfg=cfg.data)
    if synthetic:
        x_train = torch.stack([train_tf(to_three_channels(r)) for r in raw])
        x_eval, y = torch.stack([eval_tf(to_three_channels(r)) for r in raw]), labels
    else:
        ds = ImageDataset(bundle.splits["train"], train_tf)
        x_train, y, _ = next(iter(make_loader(ds, cfg.train.batch_size * cfg.train.accum_steps, True, 0)))
        x_eval = x_train
    model = model.to(device)
    optimizer = create_optimizer(model, cfg.optim)
    scheduler = create_scheduler(optimizer, cfg.schedule, cfg.train.epochs, 10, cfg.optim.lr)
    loss_fn = task.head.loss(cfg, y.numpy() if synthetic else bundle.splits["train"].labels).to(device)
    opts = StepOptions(grad_clip=cfg.train.grad_clip, accum_steps=min(cfg.train.accum_steps, len(y)),
                       precision=cfg.train.precision if device.type == "cuda" or cfg.train.precision == "bf16" else "fp32",
                       sam_bn=cfg.optim.sam_bn)
    x_train, _, target = mix_batch(make_mixer(cfg, task.head.num_outputs), x_train.to(device), y.to(device))
    model.train()
    losses = []
    for _ in range(steps):
        loss, _ = train_step(model, x_train, target, optimizer, loss_fn, opts=opts)
        scheduler.step()
        if not math.isfinite(float(loss)):
            raise TrainingError(f"dry run: the loss is {float(loss)}")
        losses.append(float(loss))
    model.eval()
    with torch.no_grad():
        probs = task.head.activation(model(x_eval.to(device))).cpu().numpy()
    metrics = task.epoch_metrics(np.asarray(y), probs)
    return {"model": cfg.model.name, "classes": task.head.num_outputs, "parameters": count_parameters(model),
            "frozen": frozen, "losses": losses, "eval_accuracy": metrics["acc"], "images": len(y),
            "synthetic": synthetic, "pretrained_skipped": cfg.model.pretrained, "seconds": time.time() - t0}
