"""Training: one step function for SAM and plain optimizers, one loop, a run folder as the contract.

Run folder: config.yaml, best.pt, last.pt, history.csv, metrics.json, curves.png, confusion_matrix.png,
roc.png, gradcam_gallery.png, report.html. Checkpoints and history are written at the end of each epoch,
atomically, so an interrupted run can always be resumed with ``resume=True``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import sys
import time
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
from medsight.data import DataBundle, ImageDataset, load_data, make_loader, make_transform
from medsight.models import count_parameters, create_model, data_config
from medsight.optim import bn_update_disabled, create_optimizer, create_scheduler, is_sam

__all__ = ["train", "train_step", "predict_proba", "RunResult", "resolve_device", "TrainingError",
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


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_fn: nn.Module, grad_clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimization step; for SAM two forward-backward passes, BatchNorm statistics from the first.

    Returns the (detached) loss and logits of the first, unperturbed pass.
    """
    logits = model(images)
    loss = loss_fn(logits, labels)
    loss.backward()
    if is_sam(optimizer):
        optimizer.first_step(zero_grad=True)
        with bn_update_disabled(model):
            loss_fn(model(images), labels).backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.second_step(zero_grad=True)
    else:
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach()


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


def _class_weights(bundle: DataBundle) -> torch.Tensor:
    counts = np.bincount(bundle.splits["train"].labels, minlength=len(bundle.classes)).astype(np.float64)
    w = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


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
    from medsight.metrics import auc_score

    validate_config(cfg)
    device = resolve_device(cfg.train.device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.out) if cfg.out else _default_out(cfg)
    cfg.out = str(out)
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
    model = create_model(cfg.model.name, num_classes=k, img_size=cfg.data.image_size,
                         pretrained=cfg.model.pretrained, weights=cfg.model.weights, layout=cfg.model.layout,
                         drop_path_rate=cfg.model.drop_path_rate)
    dc = data_config(model)
    mean, std = list(dc["mean"]), list(dc["std"])
    model = model.to(device).to(memory_format=torch.channels_last)
    size = cfg.data.image_size
    train_ds = ImageDataset(bundle.splits["train"], make_transform(size, mean, std, train=True, cfg=cfg.data))
    eval_tf = make_transform(size, mean, std, train=False)
    val_ds = ImageDataset(bundle.splits["val"], eval_tf)
    test_ds = ImageDataset(bundle.splits["test"], eval_tf)
    nw = cfg.data.num_workers
    train_loader = make_loader(train_ds, cfg.train.batch_size, True, nw, seed=cfg.train.seed)
    val_loader = make_loader(val_ds, cfg.train.batch_size * 2, False, nw)
    test_loader = make_loader(test_ds, cfg.train.batch_size * 2, False, nw)

    optimizer = create_optimizer(model, cfg.optim)
    scheduler = create_scheduler(optimizer, cfg.schedule, cfg.train.epochs, len(train_loader), cfg.optim.lr)
    weight = _class_weights(bundle).to(device) if cfg.train.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)
    eval_loss_fn = nn.CrossEntropyLoss()

    history: list[dict[str, float]] = []
    best, best_epoch, start_epoch = float("-inf"), 0, 0
    skipped: set[str] = set()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        best, best_epoch, start_epoch = state["best"], state["best_epoch"], state["epoch"]
        skipped = set(state.get("skipped", []))
        torch.set_rng_state(state["rng"])
        train_loader.generator.set_state(state["loader_rng"])
        print(f"resuming {out} at epoch {start_epoch + 1}/{cfg.train.epochs}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    n_params = count_parameters(model)
    counts = bundle.counts()
    print(f"medsight: {cfg.model.name} ({n_params / 1e6:.2f}M parameters{', layout ' + cfg.model.layout if cfg.model.layout else ''}) "
          f"· {cfg.optim.name} lr {cfg.optim.lr:g}{f' rho {cfg.optim.rho:g}' if is_sam(optimizer) else ''} "
          f"· {cfg.train.epochs} epochs · {device}")
    print(f"data: {bundle.source} · classes {', '.join(bundle.classes)} · "
          + " · ".join(f"{s} {sum(c)} {c}" for s, c in counts.items()))
    for note in bundle.notes:
        print(f"data: {note}")

    meta = {"format": FORMAT, "classes": bundle.classes, "image_size": size, "mean": mean, "std": std,
            "config": config_to_dict(cfg)}
    interrupted = False
    since_best = 0 if not history else len(history) - best_epoch
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.time()
            model.train()
            loss_sum, correct, seen = 0.0, 0, 0
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                       disable=not progress, dynamic_ncols=True)
            for x, y, bad in bar:
                skipped.update(bad)
                if len(x) == 0:
                    continue
                x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                y = y.to(device, non_blocking=True)
                loss, logits = train_step(model, x, y, optimizer, loss_fn, cfg.train.grad_clip)
                scheduler.step()
                lv = float(loss)
                if not math.isfinite(lv):
                    raise TrainingError(f"loss became {lv} at epoch {epoch + 1}: training diverged; lower "
                                        f"optim.lr (now {cfg.optim.lr:g}) or optim.rho, or set train.grad_clip")
                loss_sum += lv * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            bar.close()
            if seen == 0:
                raise TrainingError("no readable training images in this epoch")
            vp, vl, val_loss, vbad = predict_proba(model, val_loader, device, loss_fn=eval_loss_fn)
            skipped.update(vbad)
            val_acc = float((vp.argmax(1) == vl).mean())
            val_auc = auc_score(vl, vp)
            row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                   "val_loss": val_loss, "val_acc": val_acc, "val_auc": val_auc if val_auc is not None else float("nan"),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0}
            history.append(row)
            from sklearn.metrics import balanced_accuracy_score

            current = _monitor_value(cfg, {"auc": val_auc, "accuracy": val_acc,
                                           "balanced_accuracy": balanced_accuracy_score(vl, vp.argmax(1))}, val_loss)
            improved = current > best
            if improved:
                best, best_epoch, since_best = current, epoch + 1, 0
                save_atomic({**meta, "model": model.state_dict(), "epoch": epoch + 1}, out / "best.pt")
            else:
                since_best += 1
            save_atomic({**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                         "best": best, "best_epoch": best_epoch, "skipped": sorted(skipped),
                         "rng": torch.get_rng_state(), "loader_rng": train_loader.generator.get_state()},
                        out / "last.pt")
            _write_history(history, out / "history.csv")
            auc_txt = f"{val_auc:.4f}" if val_auc is not None else "n/a"
            tqdm.write(f"epoch {epoch + 1:>3}/{cfg.train.epochs}  train loss {row['train_loss']:.4f} "
                       f"acc {row['train_acc']:.4f} │ val loss {val_loss:.4f} acc {val_acc:.4f} auc {auc_txt} "
                       f"│ lr {row['lr']:.2e} │ {row['seconds']:.1f}s{'  ★ best' if improved else ''}")
            if cfg.train.patience and since_best >= cfg.train.patience:
                print(f"early stopping: no {cfg.train.monitor} improvement for {cfg.train.patience} epochs")
                break
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted: {out}/last.pt and history.csv hold the last finished epoch "
              f"({len(history)}); continue with `medsight train --resume --out {out}`")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s): {', '.join(sorted(skipped)[:5])}"
              f"{' ...' if len(skipped) > 5 else ''}")
    if not history:
        return RunResult(out=out, metrics={}, history=history, interrupted=True)
    if interrupted:
        return RunResult(out=out, metrics={}, history=history, interrupted=True)

    from medsight.report import finish_run

    metrics = finish_run(out, cfg, bundle, val_loader, test_loader, test_ds, device, history, best_epoch,
                         sorted(skipped), n_params)
    return RunResult(out=out, metrics=metrics, history=history)
