"""Build a run from its config: data, task, model, loaders, loss, optimizer phases — nothing trains here.

The order of everything that draws random numbers (model init, then the per-rank augmentation seed) is
fixed, so the same config and seed give the same run on any machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsight.checkpoint import FORMAT
from medsight.config import Config, ConfigError, check_task_kind, config_to_dict
from medsight.data import DataBundle, ImageDataset, load_data, make_loader, make_transform
from medsight.data.loader import LoaderSettings, build_loader, loader_settings
from medsight.engine.distributed import DistInfo
from medsight.engine.step import StepOptions
from medsight.losses import EmbeddingLoss, PrototypicalLoss
from medsight.models import (EmbeddingTap, ManifoldMixup, count_parameters, create_model, data_config, freeze_stages,
                             install_head, layer_groups, prepare_compile, set_prototypes)
from medsight.optim import create_optimizer, create_scheduler
from medsight.planning import Plan, adopt_cache, apply_plan, fingerprint, make_plan
from medsight.tasks import Task, build_task

__all__ = ["Run", "Phases", "build_run", "build_model", "make_mixer", "mix_batch", "seed_everything", "default_out",
           "training_loss"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_out(cfg: Config) -> Path:
    """runs/DATA-TIMESTAMP (the model is not known until the plan has read the data)."""
    name = Path(cfg.data.path).stem if cfg.data.path else "pneumoniamnist"
    return Path("runs") / f"{name or 'data'}-{datetime.now():%Y%m%d-%H%M%S}"


def build_model(cfg: Config, num_outputs: int, pretrained: bool | None = None) -> tuple[nn.Module, int]:
    """The model of ``cfg`` with its frozen stages and gradient checkpointing; returns (model, frozen count)."""
    m = cfg.model
    model = create_model(m.name, num_classes=num_outputs, img_size=cfg.data.image_size,
                         pretrained=m.pretrained if pretrained is None else pretrained, weights=m.weights,
                         layout=m.layout, drop_path_rate=m.drop_path_rate)
    t = cfg.train
    install_head(model, t.head, num_outputs, t.cosine_scale, t.cosine_learn_scale)
    frozen = freeze_stages(model, m.freeze_stages)
    if cfg.train.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"train.grad_checkpointing: {m.name} does not support it")
        model.set_grad_checkpointing(True)
    return model, frozen


def make_mixer(cfg: Config, num_classes: int, model: nn.Module | None = None) -> Any:
    """timm's Mixup for ``train.mixup``/``train.cutmix``, or manifold mixup at a hidden layer of ``model`` for
    ``train.manifold_mixup`` (None when all are off); both smooth the mixed targets themselves, so the task's
    loss adds no smoothing of its own."""
    t = cfg.train
    if t.manifold_mixup and model is not None:
        return ManifoldMixup(model, t.manifold_mixup, num_classes, t.label_smoothing, seed=t.seed)
    if not (t.mixup or t.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, label_smoothing=t.label_smoothing,
                 num_classes=num_classes)


def mix_batch(mixer: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, targets): mixed images and soft targets, or the batch as it is without a mixer."""
    if mixer is None:
        return x, y, y
    if len(x) % 2:  # timm's Mixup pairs images within the batch
        x, y = x[:-1], y[:-1]
    mixed, target = mixer(x, y)
    return mixed, y, target


class Phases:
    """Progressive fine-tuning phases (head; discriminative learning rates; all layers low), or one phase
    for the whole run: which parameters train, and their optimizer and schedule."""

    def __init__(self, cfg: Config, model: nn.Module, steps_per_epoch: int, fused: bool) -> None:
        self.cfg, self.model, self.steps, self.fused = cfg, model, steps_per_epoch, fused
        ft, epochs = cfg.finetune, cfg.train.epochs
        self.ends = ([ft.head_epochs, ft.head_epochs + ft.discriminative_epochs, epochs] if ft.progressive
                     else [epochs])

    def of(self, epoch: int) -> int:
        return next(i for i, end in enumerate(self.ends) if epoch < end) + 1

    def setup(self, phase: int) -> tuple[torch.optim.Optimizer, Any]:
        ft, scales = self.cfg.finetune, None
        if ft.progressive:
            groups = layer_groups(self.model)
            for name, p in self.model.named_parameters():
                p.requires_grad_(phase > 1 or name in set(groups[-1]))
            if phase == 2:
                scales = [(ft.lr_decay ** (len(groups) - 1 - i), g) for i, g in enumerate(groups)]
            elif phase == 3:
                scales = [(ft.final_lr_scale, [n for g in groups for n in g])]
        opt = create_optimizer(self.model, self.cfg.optim, fused=self.fused, lr_scales=scales)
        start = self.ends[phase - 2] if phase > 1 else 0
        sched = create_scheduler(opt, self.cfg.schedule, self.ends[phase - 1] - start, self.steps, self.cfg.optim.lr)
        return opt, sched


@dataclass
class Run:
    """Everything a training run is made of, built once from the config."""

    cfg: Config
    out: Path
    dinfo: DistInfo
    device: torch.device
    bundle: DataBundle
    task: Task
    model: nn.Module  # what is saved
    step_model: nn.Module  # what trains: the model, or its DDP / compiled wrapper
    frozen: int
    mean: list[float]
    std: list[float]
    datasets: dict[str, ImageDataset]  # train (augmented), val, test, train_eval (train split, eval transform)
    loaders: dict[str, Any]  # DataLoader, or data.loader.DeviceLoader (a prepared cache, augmented on the device)
    sampler: Any
    loss_fn: nn.Module
    eval_loss_fn: nn.Module
    mixer: Any
    opts: StepOptions
    phases: Phases
    plan: Plan | None = None
    budget: Any = None  # the time-budget fit (engine.budget.BudgetFit), when train.time_budget is set
    before_eval: Callable[[], None] | None = None  # refreshes the model before validation (the prototype head)
    loader: LoaderSettings | None = None  # workers, pinned memory, prefetch: chosen for the device

    @property
    def n_params(self) -> int:
        return count_parameters(self.model)

    def meta(self) -> dict[str, Any]:
        """What every checkpoint of this run carries besides weights."""
        return {"format": FORMAT, "classes": self.task.classes, "task": self.task.state(),
                "image_size": self.cfg.data.image_size, "mean": self.mean, "std": self.std,
                "config": config_to_dict(self.cfg)}


def _loaders(cfg: Config, datasets: dict[str, ImageDataset], dinfo: DistInfo, device: torch.device
             ) -> tuple[dict[str, Any], Any, LoaderSettings]:
    t = cfg.train
    # a GPU waits on data loaded in the training process; a CPU needs its cores for compute
    settings = loader_settings(device, cfg.data.num_workers, dinfo.world_size)
    train_ds = datasets["train"]
    sampler = (torch.utils.data.DistributedSampler(train_ds, dinfo.world_size, dinfo.rank, shuffle=True,
                                                   seed=t.seed) if dinfo.enabled else None)
    per_step = t.batch_size * t.accum_steps
    shard = len(train_ds) // dinfo.world_size if dinfo.enabled else len(train_ds)
    # a final batch of one image cannot be trained with BatchNorm: drop it (it is reshuffled next epoch)
    loaders = {"train": build_loader(train_ds, per_step, True, settings, device, seed=t.seed, sampler=sampler,
                                     drop_last=shard % per_step == 1),
               "val": build_loader(datasets["val"], t.batch_size * 2, False, settings, device),
               "test": build_loader(datasets["test"], t.batch_size * 2, False, settings, device)}
    return loaders, sampler, settings


def training_loss(cfg: Config, task: Task, model: nn.Module, train_labels: Any) -> nn.Module:
    """The task's loss, with the embedding losses of ``train.triplet_weight``/``train.center_weight`` added, or
    the episodic prototypical loss for ``train.head=prototypical``."""
    t = cfg.train
    if t.head == "prototypical":
        return PrototypicalLoss(EmbeddingTap(model))
    base = task.head.loss(cfg, train_labels)
    if not (t.triplet_weight or t.center_weight):
        return base
    return EmbeddingLoss(base, EmbeddingTap(model), len(task.classes), t.triplet_weight, t.triplet_margin,
                         t.center_weight, t.center_alpha)


def _prototype_refresh(model: nn.Module, dataset: ImageDataset, batch_size: int, device: torch.device
                       ) -> Callable[[], None]:
    """Recompute the prototype head's class means from the training images (evaluation transform)."""
    def refresh() -> None:
        loader = make_loader(dataset, batch_size, False, 0)
        set_prototypes(model, ((x, y) for x, y, _ in loader if len(x)), device)
    return refresh


def build_run(cfg: Config, out: Path, dinfo: DistInfo, device: torch.device) -> Run:
    """Data, task, model, loaders, loss and optimizer phases of ``cfg``, in a fixed random order."""
    seed_everything(cfg.train.seed)
    cfg = adopt_cache(cfg)  # a prepared cache's size and resize policy, unless the user set others
    bundle = load_data(cfg.data)
    task = build_task(cfg.data.task, bundle.classes, bundle.splits["train"].labels, cfg=cfg)
    plan = make_plan(fingerprint(bundle, task.kind), cfg) if cfg.plan else None
    if plan is not None:  # every option the user did not set, from the data (medsight.planning)
        cfg = apply_plan(cfg, plan)
        task = build_task(task.kind, bundle.classes, bundle.splits["train"].labels, cfg=cfg)  # the plan's head
    check_task_kind(cfg, task.kind)
    t = cfg.train
    model, frozen = build_model(cfg, task.head.num_outputs)
    dc = data_config(model)
    mean, std = list(dc["mean"]), list(dc["std"])
    model = model.to(device).to(memory_format=torch.channels_last)
    seed_everything(t.seed + dinfo.rank)  # augmentations differ per rank; DDP syncs the weights
    size = cfg.data.image_size
    eval_tf = make_transform(size, mean, std, train=False, cfg=cfg.data)
    datasets = {"train": ImageDataset(bundle.splits["train"], make_transform(size, mean, std, train=True, cfg=cfg.data)),
                "val": ImageDataset(bundle.splits["val"], eval_tf), "test": ImageDataset(bundle.splits["test"], eval_tf),
                "train_eval": ImageDataset(bundle.splits["train"], eval_tf)}
    loaders, sampler, settings = _loaders(cfg, datasets, dinfo, device)
    phases = Phases(cfg, model, len(loaders["train"]), fused=device.type == "cuda")
    loss_fn = training_loss(cfg, task, model, bundle.splits["train"].labels).to(device)
    # the shift a weighted loss puts into the logits, undone by calibration (FittedRules.calibrate)
    task.rules.logit_offset = task.head.logit_offset(cfg, bundle.splits["train"].labels)
    mixer = make_mixer(cfg, task.head.num_outputs, model)
    refresh = (_prototype_refresh(model, datasets["train_eval"], t.batch_size * 2, device)
               if t.head == "prototypical" else None)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" and t.grad_scaler is not False else None
    step_model: nn.Module = model
    if dinfo.enabled:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if t.compile:
        prepare_compile(model)
        step_model = torch.compile(step_model)
    opts = StepOptions(grad_clip=t.grad_clip, accum_steps=t.accum_steps, precision=t.precision, scaler=scaler,
                       sam_bn=cfg.optim.sam_bn, sync_first_pass=cfg.optim.sam_sync_first_pass)
    return Run(cfg=cfg, out=out, dinfo=dinfo, device=device, bundle=bundle, task=task, model=model,
               step_model=step_model, frozen=frozen, mean=mean, std=std, datasets=datasets, loaders=loaders,
               sampler=sampler, loss_fn=loss_fn, eval_loss_fn=task.head.eval_loss(), mixer=mixer, opts=opts, phases=phases,
               plan=plan, before_eval=refresh, loader=settings)
