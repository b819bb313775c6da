"""Training: one step function for SAM and plain optimizers, one loop, a run folder as the contract.

Run folder: config.yaml, best.pt, last.pt, history.csv, metrics.json, curves.png, confusion_matrix.png,
roc.png, gradcam_gallery.png, report.html. Checkpoints and history are written at the end of each epoch,
atomically, so an interrupted run can always be resumed with ``resume=True``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from medsight.checkpoint import FORMAT, load_checkpoint, save_atomic, write_text_atomic
from medsight.config import Config, ConfigError, config_to_dict, save_config, validate_config
from medsight.distributed import DistInfo, broadcast_flag, check_replicas, init_distributed, shutdown
from medsight.data import ROTATION_CLASSES, DataBundle, ImageDataset, load_data, make_loader, make_transform
from medsight.models import count_parameters, create_model, data_config, freeze_stages, layer_groups, prepare_compile
from medsight.optim import LookSAM, bn_update_disabled, create_optimizer, create_scheduler, is_sam

__all__ = ["train", "dry_run", "build_model", "make_loss", "make_mixer", "mix_batch", "train_step", "StepOptions", "autocast", "predict_proba", "RunResult", "resolve_device", "TrainingError",
           "HISTORY_FIELDS", "seed_everything"]

log = logging.getLogger("medsight")

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "seconds"]


class TrainingError(RuntimeError):
    """Training cannot go on: the loss diverged, or the run folder would be overwritten."""


@dataclass
class RunResult:
    out: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False


#: Training steps between reads of the running loss (divergence check, progress bar).
SYNC_EVERY = 10


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA GPU is available; use 'cpu' or 'auto'")
    return dev


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


@torch.no_grad()
def predict_proba(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                  desc: str | None = None, loss_fn: nn.Module | None = None
                  ) -> tuple[np.ndarray, np.ndarray, float, list[str]]:
    """Class probabilities over a loader: ``(probs, labels, mean loss, skipped files)``."""
    model.eval()
    probs, labels, skipped = [], [], []
    loss_sum, n = 0.0, 0
    for x, y, bad in tqdm(loader, desc=desc, leave=False, disable=desc is None or not sys.stderr.isatty()):
        skipped += bad
        if len(x) == 0:
            continue
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        logits = model(x).float()
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, y)) * len(y)
        n += len(y)
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        labels.append(y.cpu().numpy())
    if n == 0:
        raise TrainingError("no readable images to evaluate")
    return np.concatenate(probs), np.concatenate(labels), loss_sum / n, skipped


def _cpu_fp16_ok() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except (RuntimeError, AssertionError):
        return False


def make_loss(cfg: Config, counts: Any) -> nn.Module:
    """The training loss of ``cfg`` for training-set class ``counts``: CE or focal, class weights, smoothing."""
    from medsight.losses import ClassificationLoss, class_weights

    t, k = cfg.train, len(counts)
    weight = class_weights(counts, t.class_weight_mode, t.class_weight_beta) if t.class_weights else None
    alpha = None
    if t.loss == "focal" and t.focal_alpha is not None:
        if len(t.focal_alpha) != k:
            raise ConfigError(f"train.focal_alpha has {len(t.focal_alpha)} values but the data has {k} classes")
        alpha = torch.tensor(t.focal_alpha, dtype=torch.float32)
    smoothing = 0.0 if (t.mixup or t.cutmix) else t.label_smoothing
    return ClassificationLoss(gamma=t.focal_gamma if t.loss == "focal" else 0.0, weight=weight,
                              label_smoothing=smoothing, alpha=alpha)


def build_model(cfg: Config, num_classes: int, pretrained: bool | None = None) -> tuple[nn.Module, int]:
    """The model of ``cfg`` with its frozen stages and gradient checkpointing; returns (model, frozen count)."""
    m = cfg.model
    model = create_model(m.name, num_classes=num_classes, img_size=cfg.data.image_size,
                         pretrained=m.pretrained if pretrained is None else pretrained, weights=m.weights,
                         layout=m.layout, drop_path_rate=m.drop_path_rate)
    frozen = freeze_stages(model, m.freeze_stages)
    if cfg.train.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"train.grad_checkpointing: {m.name} does not support it")
        model.set_grad_checkpointing(True)
    return model, frozen


def make_mixer(cfg: Config, num_classes: int) -> Any:
    """timm's Mixup for ``train.mixup``/``train.cutmix`` (None when both are off).

    Label smoothing is applied by Mixup to the mixed targets, so :func:`make_loss` adds none of its own.
    """
    t = cfg.train
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


def _default_out(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.model.name}-{stamp}"


def _write_history(rows: list[dict[str, float]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in HISTORY_FIELDS})
    write_text_atomic(buf.getvalue(), path)


def _monitor_value(cfg: Config, val: dict[str, Any], val_loss: float) -> float:
    if cfg.train.monitor == "loss":
        return -val_loss
    v = val.get(cfg.train.monitor)
    return float("-inf") if v is None else float(v)


def train(cfg: Config, resume: bool = False, progress: bool = True) -> RunResult:
    """Train, select the best epoch on validation data, evaluate it on test, explain, and report.

    Args:
        cfg: the run configuration (validated here before any work starts).
        resume: continue the run in ``cfg.out`` from its ``last.pt``.
        progress: show tqdm bars (the one-line epoch summaries are always printed).
    """
    validate_config(cfg)
    dinfo, device = init_distributed(cfg.train.device)
    try:
        return _train(cfg, resume, progress and dinfo.main, dinfo, device)
    finally:
        shutdown()


def _train(cfg: Config, resume: bool, progress: bool, dinfo: DistInfo, device: torch.device) -> RunResult:
    from medsight.metrics import auc_score

    main = dinfo.main
    say = print if main else (lambda *a, **k: None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.out) if cfg.out else _default_out(cfg)
    if dinfo.enabled:  # every rank uses rank 0's folder name (the default one carries a timestamp)
        names = [str(out)]
        torch.distributed.broadcast_object_list(names, 0)
        out = Path(names[0])
    cfg.out = str(out)
    t = cfg.train
    if t.precision == "fp16" and device.type == "cpu" and not _cpu_fp16_ok():
        raise ConfigError("train.precision fp16 is not supported on this CPU build of torch; use bf16")
    if dinfo.enabled and t.precision == "fp16" and not cfg.optim.sam_sync_first_pass and "sam" in cfg.optim.name:
        # Per-replica ascent gradients could overflow on one rank only; the ranks would then disagree
        # about skipping the step and the loss scale. Synced gradients make the overflow check global.
        warnings.warn("fp16 on many processes: SAM's first pass is synced across ranks so that every rank "
                      "sees the same overflow check", stacklevel=2)
        cfg.optim.sam_sync_first_pass = True
    state: dict[str, Any] | None = None
    if resume:
        state = load_checkpoint(out / "last.pt")
        stored = state["config"]
        if stored.get("model", {}).get("name") != cfg.model.name:
            raise TrainingError(f"{out}/last.pt was trained with model {stored['model']['name']!r}, "
                                f"not {cfg.model.name!r}; resume with the run's own config.yaml")
    elif (out / "last.pt").exists():
        raise TrainingError(f"{out} already holds a run (last.pt); pass --resume to continue it or choose "
                            f"another --out")
    seed_everything(cfg.train.seed)
    bundle = load_data(cfg.data)
    k = len(bundle.classes)
    model, frozen = build_model(cfg, k)
    dc = data_config(model)
    mean, std = list(dc["mean"]), list(dc["std"])
    model = model.to(device).to(memory_format=torch.channels_last)
    seed_everything(cfg.train.seed + dinfo.rank)  # augmentations differ per rank; DDP syncs the weights
    size = cfg.data.image_size
    train_ds = ImageDataset(bundle.splits["train"], make_transform(size, mean, std, train=True, cfg=cfg.data))
    eval_tf = make_transform(size, mean, std, train=False, cfg=cfg.data)
    val_ds = ImageDataset(bundle.splits["val"], eval_tf)
    test_ds = ImageDataset(bundle.splits["test"], eval_tf)
    nw = cfg.data.num_workers
    if nw is None:  # a GPU waits on data loaded in the training process; a CPU needs its cores for compute
        nw = min(8, max(0, (os.cpu_count() or 1) // dinfo.world_size - 1)) if device.type == "cuda" else 0
    sampler = (torch.utils.data.DistributedSampler(train_ds, dinfo.world_size, dinfo.rank, shuffle=True,
                                                   seed=cfg.train.seed) if dinfo.enabled else None)
    per_step = t.batch_size * t.accum_steps
    shard = len(train_ds) // dinfo.world_size if dinfo.enabled else len(train_ds)
    # a final batch of one image cannot be trained with BatchNorm: drop it (it is reshuffled next epoch)
    train_loader = make_loader(train_ds, per_step, True, nw, seed=cfg.train.seed, sampler=sampler,
                               drop_last=shard % per_step == 1)
    val_loader = make_loader(val_ds, cfg.train.batch_size * 2, False, nw)
    test_loader = make_loader(test_ds, cfg.train.batch_size * 2, False, nw)

    fused = device.type == "cuda"
    ft = cfg.finetune
    phase_ends = [ft.head_epochs, ft.head_epochs + ft.discriminative_epochs, t.epochs] if ft.progressive else [t.epochs]

    def phase_of(epoch: int) -> int:
        return next(i for i, end in enumerate(phase_ends) if epoch < end) + 1

    def setup_phase(phase: int) -> tuple[torch.optim.Optimizer, Any]:
        """Trainable parameters, optimizer and schedule of a progressive fine-tuning phase (or the whole run)."""
        scales = None
        if ft.progressive:
            groups = layer_groups(model)
            for name, p in model.named_parameters():
                p.requires_grad_(phase > 1 or name in set(groups[-1]))
            if phase == 2:
                scales = [(ft.lr_decay ** (len(groups) - 1 - i), g) for i, g in enumerate(groups)]
            elif phase == 3:
                scales = [(ft.final_lr_scale, [n for g in groups for n in g])]
        opt = create_optimizer(model, cfg.optim, fused=fused, lr_scales=scales)
        start = phase_ends[phase - 2] if phase > 1 else 0
        sched = create_scheduler(opt, cfg.schedule, phase_ends[phase - 1] - start, len(train_loader), cfg.optim.lr)
        return opt, sched

    phase = phase_of(0)
    optimizer, scheduler = setup_phase(phase)
    loss_fn = make_loss(cfg, np.bincount(bundle.splits["train"].labels, minlength=len(bundle.classes))).to(device)
    mixer = make_mixer(cfg, len(bundle.classes))
    eval_loss_fn = nn.CrossEntropyLoss()
    use_scaler = t.precision == "fp16" and t.grad_scaler is not False
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    step_model: nn.Module = model
    if dinfo.enabled:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if t.compile:
        prepare_compile(model)
        step_model = torch.compile(step_model)
    opts = StepOptions(grad_clip=t.grad_clip, accum_steps=t.accum_steps, precision=t.precision, scaler=scaler,
                       sam_bn=cfg.optim.sam_bn, sync_first_pass=cfg.optim.sam_sync_first_pass)

    history: list[dict[str, float]] = []
    best, best_epoch, start_epoch = float("-inf"), 0, 0
    skipped: set[str] = set()
    if state is not None:
        model.load_state_dict(state["model"])
        if ft.progressive and phase_of(state["epoch"]) != phase and state["epoch"] < t.epochs:
            phase = phase_of(state["epoch"])
            optimizer, scheduler = setup_phase(phase)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        best, best_epoch, start_epoch = state["best"], state["best_epoch"], state["epoch"]
        skipped = set(state.get("skipped", []))
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if not dinfo.enabled:
            torch.set_rng_state(state["rng"])
        train_loader.generator.set_state(state["loader_rng"])
        say(f"resuming {out} at epoch {start_epoch + 1}/{cfg.train.epochs}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    n_params = count_parameters(model)
    counts = bundle.counts()
    world = f" · {dinfo.world_size} processes" if dinfo.enabled else ""
    extra = "".join(f" · {v}" for v in (t.precision if t.precision != "fp32" else "",
                                         f"accumulate {t.accum_steps}" if t.accum_steps > 1 else "",
                                         f"{frozen / 1e6:.2f}M frozen (stem + {cfg.model.freeze_stages} stages)"
                                         if frozen else "",
                                         f"{t.loss} loss" if t.loss != "ce" else "",
                                         f"progressive fine-tuning {ft.head_epochs}+{ft.discriminative_epochs}+"
                                         f"{t.epochs - phase_ends[1]} epochs" if ft.progressive else "") if v)
    say(f"medsight: {cfg.model.name} ({n_params / 1e6:.2f}M parameters{', layout ' + cfg.model.layout if cfg.model.layout else ''}) "
          f"· {cfg.optim.name} lr {cfg.optim.lr:g}{f' rho {cfg.optim.rho:g}' if is_sam(optimizer) else ''} "
          f"· {cfg.train.epochs} epochs · {device}{world}{extra}")
    say(f"data: {bundle.source} · classes {', '.join(bundle.classes)} · "
          + " · ".join(f"{s} {sum(c)} {c}" for s, c in counts.items()))
    for note in bundle.notes:
        say(f"data: {note}")

    meta = {"format": FORMAT, "classes": bundle.classes, "image_size": size, "mean": mean, "std": std,
            "config": config_to_dict(cfg)}
    interrupted = False
    since_best = 0 if not history else len(history) - best_epoch
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.time()
            if sampler is not None:
                sampler.set_epoch(epoch)
            if phase_of(epoch) != phase:
                phase = phase_of(epoch)
                optimizer, scheduler = setup_phase(phase)
                say(f"phase {phase}: " + ("every layer, discriminative learning rates" if phase == 2
                                          else f"every layer at {ft.final_lr_scale:g}× the learning rate"))
            model.train()
            # running sums stay on the device and are read every SYNC_EVERY steps: a read waits for the
            # GPU, and waiting every step would leave it idle while the next batch is launched
            loss_dev = torch.zeros((), device=device)
            correct_dev = torch.zeros((), device=device, dtype=torch.long)
            loss_sum, correct, seen, steps = 0.0, 0, 0, 0

            def sync_sums() -> None:
                nonlocal loss_sum, correct
                loss_sum, correct = float(loss_dev), int(correct_dev)
                if not math.isfinite(loss_sum):
                    raise TrainingError(f"loss became {loss_sum} at epoch {epoch + 1}: training diverged; lower "
                                        f"optim.lr (now {cfg.optim.lr:g}) or optim.rho, or set train.grad_clip")
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")

            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                       disable=not progress, dynamic_ncols=True)
            for x, y, bad in bar:
                skipped.update(bad)
                if len(x) == 0:
                    continue
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                y = y.to(device, non_blocking=True)
                x, y, target = mix_batch(mixer, x, y)
                loss, logits = train_step(step_model, x, target, optimizer, loss_fn, opts=opts)
                scheduler.step()
                loss_dev += loss.detach().float() * len(y)
                correct_dev += (logits.argmax(1) == y).sum()  # against the unmixed labels
                seen += len(y)
                steps += 1
                if steps % SYNC_EVERY == 0:
                    sync_sums()
            if seen:
                sync_sums()
            bar.close()
            if seen == 0:
                raise TrainingError("no readable training images in this epoch")
            train_seconds = time.time() - t0
            if dinfo.enabled:
                for b in model.buffers():  # BatchNorm statistics: rank 0's, so every rank evaluates alike
                    torch.distributed.broadcast(b, 0)
                check_replicas(model, device)
            vp, vl, val_loss, vbad = predict_proba(model, val_loader, device, loss_fn=eval_loss_fn)
            skipped.update(vbad)
            val_acc = float((vp.argmax(1) == vl).mean())
            val_auc = auc_score(vl, vp)
            row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   "val_loss": val_loss, "val_acc": val_acc, "val_auc": val_auc if val_auc is not None else float("nan"),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0,
                   "train_seconds": train_seconds, "train_images": seen, "phase": phase}
            history.append(row)
            from sklearn.metrics import balanced_accuracy_score

            current = _monitor_value(cfg, {"auc": val_auc, "accuracy": val_acc,
                                           "balanced_accuracy": balanced_accuracy_score(vl, vp.argmax(1))}, val_loss)
            improved = current > best
            if improved:
                best, best_epoch, since_best = current, epoch + 1, 0
                if main:
                    save_atomic({**meta, "model": model.state_dict(), "epoch": epoch + 1}, out / "best.pt")
            else:
                since_best += 1
            if main:
                save_atomic({**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                             "best": best, "best_epoch": best_epoch, "skipped": sorted(skipped),
                             "rng": torch.get_rng_state(), "loader_rng": train_loader.generator.get_state(),
                             "scaler": scaler.state_dict() if scaler is not None else None},
                            out / "last.pt")
                _write_history(history, out / "history.csv")
            auc_txt = f"{val_auc:.4f}" if val_auc is not None else "n/a"
            (tqdm.write if main else say)(f"epoch {epoch + 1:>3}/{cfg.train.epochs}  train loss {row['train_loss']:.4f} "
                       f"acc {row['train_acc']:.4f} │ val loss {val_loss:.4f} acc {val_acc:.4f} auc {auc_txt} "
                       f"│ lr {row['lr']:.2e} │ {row['seconds']:.1f}s{'  ★ best' if improved else ''}")
            stop = bool(cfg.train.patience and since_best >= cfg.train.patience)
            if broadcast_flag(stop, device):
                say(f"early stopping: no {cfg.train.monitor} improvement for {cfg.train.patience} epochs")
                break
    except KeyboardInterrupt:
        interrupted = True
        say(f"\ninterrupted: {out}/last.pt and history.csv hold the last finished epoch "
              f"({len(history)}); continue with `medsight train --resume --out {out}`")
    if skipped:
        say(f"skipped {len(skipped)} unreadable file(s): {', '.join(sorted(skipped)[:5])}"
              f"{' ...' if len(skipped) > 5 else ''}")
    if not history:
        return RunResult(out=out, metrics={}, history=history, interrupted=True)
    if interrupted:
        return RunResult(out=out, metrics={}, history=history, interrupted=True)
    if not main:  # rank 0 evaluates on test, explains and writes the report
        return RunResult(out=out, metrics={}, history=history)

    from medsight.report import finish_run

    metrics = finish_run(out, cfg, bundle, val_loader, test_loader, test_ds, device, history, best_epoch,
                         sorted(skipped), n_params, train_ds=ImageDataset(bundle.splits["train"], eval_tf))
    return RunResult(out=out, metrics=metrics, history=history)


def dry_run(cfg: Config, synthetic: bool = True, steps: int = 2) -> dict[str, Any]:
    """Build everything ``cfg`` describes and run ``steps`` training steps and one evaluation step.

    With ``synthetic``, on generated images of the configured size and class count (``data.class_names``,
    else 2), so a recipe is checked in seconds without its data set; otherwise on the first batches of
    the real data. Pretrained weights are not downloaded (random init, said in the result).
    """
    from medsight.metrics import classification_metrics

    validate_config(cfg)
    t0 = time.time()
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    size = cfg.data.image_size
    if synthetic:
        k = (len(ROTATION_CLASSES) if cfg.data.pretext == "rotation"
             else cfg.data.num_classes or (len(cfg.data.class_names) if cfg.data.class_names else 2))
        n = max(2 * k, min(cfg.train.batch_size * cfg.train.accum_steps, 16))
        g = torch.Generator().manual_seed(cfg.train.seed)
        raw = [torch.rand(1, size + 8, size + 8, generator=g) for _ in range(n)]
        labels = torch.arange(n) % k
        counts = np.bincount(labels.numpy(), minlength=k)
    else:
        bundle = load_data(cfg.data)
        k = len(bundle.classes)
        counts = np.bincount(bundle.splits["train"].labels, minlength=k)
    model, frozen = build_model(cfg, k, pretrained=False)
    dc = data_config(model)
    train_tf = make_transform(size, dc["mean"], dc["std"], train=True, cfg=cfg.data)
    eval_tf = make_transform(size, dc["mean"], dc["std"], train=False, cfg=cfg.data)
    if synthetic:
        from medsight.data import to_three_channels

        x_train = torch.stack([train_tf(to_three_channels(r)) for r in raw])
        x_eval, y = torch.stack([eval_tf(to_three_channels(r)) for r in raw]), labels
    else:
        ds = ImageDataset(bundle.splits["train"], train_tf)
        x_train, y, _ = next(iter(make_loader(ds, cfg.train.batch_size * cfg.train.accum_steps, True, 0)))
        x_eval = x_train
    model = model.to(device)
    optimizer = create_optimizer(model, cfg.optim)
    scheduler = create_scheduler(optimizer, cfg.schedule, cfg.train.epochs, 10, cfg.optim.lr)
    loss_fn = make_loss(cfg, counts).to(device)
    opts = StepOptions(grad_clip=cfg.train.grad_clip, accum_steps=min(cfg.train.accum_steps, len(y)),
                       precision=cfg.train.precision if device.type == "cuda" or cfg.train.precision == "bf16" else "fp32",
                       sam_bn=cfg.optim.sam_bn)
    x_train, _, target = mix_batch(make_mixer(cfg, k), x_train.to(device), y.to(device))
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
        probs = torch.softmax(model(x_eval.to(device)).float(), 1).cpu().numpy()
    metrics = classification_metrics(y.numpy(), probs, [str(i) for i in range(k)], n_boot=0)
    return {"model": cfg.model.name, "classes": k, "parameters": count_parameters(model), "frozen": frozen,
            "losses": losses, "eval_accuracy": metrics["accuracy"], "images": len(y), "synthetic": synthetic,
            "pretrained_skipped": cfg.model.pretrained, "seconds": time.time() - t0}
