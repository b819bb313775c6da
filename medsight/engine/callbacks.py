"""What happens around the loop, as handlers the engine calls (MONAI's handlers, timm's CheckpointSaver).

A new logger or a new end-of-epoch action is a :class:`Callback` subclass; the loop never changes.
Only rank 0 gets the callbacks that write or print.
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

import torch

from medsight.engine.build import Run
from medsight.engine.distributed import broadcast_flag
from medsight.engine.loop import EpochState
from medsight.optim import is_sam
from medsight.utils.files import save_atomic, write_text_atomic

__all__ = ["Callback", "CheckpointSaver", "HistoryWriter", "ConsoleLogger", "EarlyStopping", "HISTORY_FIELDS"]

log = logging.getLogger(__name__)

HISTORY_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "lr", "seconds"]


class Callback:
    """Hooks of the engine; each does nothing unless overridden."""

    def on_train_start(self, run: Run, state: EpochState) -> None: ...

    def on_epoch_end(self, run: Run, state: EpochState, row: dict[str, Any], improved: bool) -> None: ...

    def on_train_end(self, run: Run, state: EpochState, metrics: dict[str, Any] | None) -> None: ...


class CheckpointSaver(Callback):
    """best.pt when the monitored value improves, last.pt (everything needed to resume) every epoch."""

    def on_epoch_end(self, run: Run, state: EpochState, row: dict[str, Any], improved: bool) -> None:
        meta, epoch = run.meta(), row["epoch"]
        if improved:
            save_atomic({**meta, "model": run.model.state_dict(), "epoch": epoch}, run.out / "best.pt")
        scaler = run.opts.scaler
        save_atomic({**meta, "model": run.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                     "scheduler": state.scheduler.state_dict(), "epoch": epoch, "history": state.history,
                     "best": state.best, "best_epoch": state.best_epoch, "skipped": sorted(state.skipped),
                     "rng": torch.get_rng_state(), "loader_rng": run.loaders["train"].generator.get_state(),
                     "scaler": scaler.state_dict() if scaler is not None else None}, run.out / "last.pt")


class HistoryWriter(Callback):
    """history.csv, rewritten whole (atomically) after every epoch."""

    def on_epoch_end(self, run: Run, state: EpochState, row: dict[str, Any], improved: bool) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        for r in state.history:
            writer.writerow({k: r[k] for k in HISTORY_FIELDS})
        write_text_atomic(buf.getvalue(), run.out / "history.csv")


class ConsoleLogger(Callback):
    """The banner, the data summary and one line per epoch, through ``logging`` (the CLI shows them)."""

    def on_train_start(self, run: Run, state: EpochState) -> None:
        cfg, t, ft = run.cfg, run.cfg.train, run.cfg.finetune
        world = f" · {run.dinfo.world_size} processes" if run.dinfo.enabled else ""
        parts = (t.precision if t.precision != "fp32" else "",
                 f"accumulate {t.accum_steps}" if t.accum_steps > 1 else "",
                 f"{run.frozen / 1e6:.2f}M frozen (stem + {cfg.model.freeze_stages} stages)" if run.frozen else "",
                 f"{t.loss} loss" if t.loss != "ce" else "",
                 f"ordinal head {t.ordinal}" if run.task.kind == "ordinal" else "",
                 f"progressive fine-tuning {ft.head_epochs}+{ft.discriminative_epochs}+"
                 f"{t.epochs - run.phases.ends[1]} epochs" if ft.progressive else "")
        extra = "".join(f" · {v}" for v in parts if v)
        layout = f", layout {cfg.model.layout}" if cfg.model.layout else ""
        rho = f" rho {cfg.optim.rho:g}" if is_sam(state.optimizer) else ""
        log.info(f"medsight: {cfg.model.name} ({run.n_params / 1e6:.2f}M parameters{layout}) · {cfg.optim.name} "
                 f"lr {cfg.optim.lr:g}{rho} · {t.epochs} epochs · {run.device}{world}{extra}")
        counts = run.bundle.counts()
        per = "positives per finding " if run.bundle.multilabel else ""
        log.info(f"data: {run.bundle.source} · {run.task.kind.replace('_', '-')} · "
                 f"{'findings' if run.bundle.multilabel else 'classes'} {', '.join(run.bundle.classes)} · {per}"
                 + " · ".join(f"{s} {len(run.bundle.splits[s])} {c}" for s, c in counts.items()))
        for note in run.bundle.notes:
            log.info(f"data: {note}")

    def on_epoch_end(self, run: Run, state: EpochState, row: dict[str, Any], improved: bool) -> None:
        auc = "n/a" if row["val_auc"] != row["val_auc"] else f"{row['val_auc']:.4f}"
        qwk = f" qwk {row['val_qwk']:.4f}" if "val_qwk" in row else ""
        line = (f"epoch {row['epoch']:>3}/{run.cfg.train.epochs}  train loss {row['train_loss']:.4f} acc "
                f"{row['train_acc']:.4f} │ val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} auc {auc}{qwk} │ lr "
                f"{row['lr']:.2e} │ {row['seconds']:.1f}s{'  ★ best' if improved else ''}")
        log.info(line)


class EarlyStopping(Callback):
    """Stop after ``train.patience`` epochs without improvement; rank 0 decides for every rank."""

    def on_epoch_end(self, run: Run, state: EpochState, row: dict[str, Any], improved: bool) -> None:
        patience = run.cfg.train.patience
        stop = bool(patience and state.since_best >= patience)
        if broadcast_flag(stop, run.device):
            state.stop = True
            log.info(f"early stopping: no {run.cfg.train.monitor} improvement for {patience} epochs")

