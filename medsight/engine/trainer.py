"""``train``: build the run, loop over epochs with callbacks, then evaluate, explain and report.

Run folder: config.yaml, best.pt, last.pt, history.csv, metrics.json, figures, predictions.npz and
report.html. Checkpoints and history are written at the end of each epoch, atomically, so an interrupted
run can always be resumed with ``resume=True``.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch

from medsight.checkpoint import load_checkpoint
from medsight.config import Config, ConfigError, explicit_keys, save_config, validate_config, with_values
from medsight.data.readers import check_output_outside
from medsight.engine.budget import epochs_for_budget
from medsight.engine.build import Phases, Run, build_run, default_out
from medsight.engine.callbacks import Callback, CheckpointSaver, ConsoleLogger, EarlyStopping, HistoryWriter
from medsight.engine.distributed import DistInfo, init_distributed, shutdown
from medsight.engine.finish import finish_run
from medsight.engine.loggers import make_loggers
from medsight.engine.loop import EpochState, TrainingError, train_one_epoch, validate
from medsight.planning.planner import MAX_EPOCHS, epoch_dependent
from medsight.utils.files import check_writable, make_private, write_text_atomic

__all__ = ["train", "RunResult", "TrainingError"]

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out: Path
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False


def _cpu_fp16_ok() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return True
    except (RuntimeError, AssertionError):
        return False


def _resolve(cfg: Config, dinfo: DistInfo, device: torch.device) -> Config:
    """The config as this run will use it: its folder named, precision checked for this machine."""
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    if dinfo.enabled:  # every rank uses rank 0's folder name (the default one carries a timestamp)
        names = [str(out)]
        torch.distributed.broadcast_object_list(names, 0)
        out = Path(names[0])
    t, values = cfg.train, {"out": str(out)}
    if t.precision == "fp16" and device.type == "cpu" and not _cpu_fp16_ok():
        raise ConfigError("train.precision fp16 is not supported on this CPU build of torch; use bf16")
    if dinfo.enabled and t.precision == "fp16" and not cfg.optim.sam_sync_first_pass and "sam" in cfg.optim.name:
        # Per-replica ascent gradients could overflow on one rank only; the ranks would then disagree about
        # skipping the step and the loss scale. Synced gradients make the overflow check global.
        warnings.warn("fp16 on many processes: SAM's first pass is synced across ranks so that every rank sees "
                      "the same overflow check", stacklevel=3)
        values["optim.sam_sync_first_pass"] = True
    return with_values(cfg, values)


def _previous(cfg: Config, resume: bool, force: bool) -> dict[str, Any] | None:
    """last.pt to resume from, after checking that the run folder may be written."""
    out = Path(cfg.out)
    check_writable(out)  # a file, or a folder that cannot be written: refused before any data is read
    check_output_outside(out, cfg.data.path, "--out")  # a run inside a class-folder source would become data
    for stale in out.glob(".*.tmp") if out.is_dir() else ():
        stale.unlink(missing_ok=True)  # left by a process killed mid-write; the real files are intact
    if resume:
        state = load_checkpoint(out / "last.pt")
        stored = state["config"].get("model", {}).get("name")
        if "model.name" in explicit_keys(cfg) and stored != cfg.model.name:
            raise TrainingError(f"{out}/last.pt was trained with model {stored!r}, not {cfg.model.name!r}; resume "
                                f"with the run's own config.yaml")
        return state
    if (out / "last.pt").exists():
        raise TrainingError(f"{out} already holds a run (last.pt); pass --resume to continue it or choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TrainingError(f"{out} is not empty; medsight will not write a run over files it did not make. "
                            f"Choose another --out, or pass --force to write into it anyway")
    return None


def _restore(run: Run, state: EpochState, saved: dict[str, Any]) -> int:
    """Continue from last.pt: weights, optimizer, schedule, history, random state; returns the next epoch."""
    run.model.load_state_dict(saved["model"])
    epoch = saved["epoch"]
    if run.phases.of(min(epoch, run.cfg.train.epochs - 1)) != state.phase:
        state.phase = run.phases.of(min(epoch, run.cfg.train.epochs - 1))
        state.optimizer, state.scheduler = run.phases.setup(state.phase)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.history = list(saved["history"])
    state.best, state.best_epoch = saved["best"], saved["best_epoch"]
    state.since_best = len(state.history) - state.best_epoch
    state.skipped = set(saved.get("skipped", []))
    if run.opts.scaler is not None and saved.get("scaler"):
        run.opts.scaler.load_state_dict(saved["scaler"])
    if not run.dinfo.enabled:
        torch.set_rng_state(saved["rng"])
    run.loaders["train"].generator.set_state(saved["loader_rng"])
    log.info(f"resuming {run.out} at epoch {epoch + 1}/{run.cfg.train.epochs}")
    return epoch


def monitor_value(epoch_metrics: dict[str, float | None], val_loss: float, monitor: str) -> float:
    """The value that picks best.pt (higher is better): ``train.monitor``'s validation metric, or −loss."""
    if monitor == "loss":
        return -val_loss
    v = epoch_metrics.get(monitor)
    return float("-inf") if v is None else float(v)


def _epoch(run: Run, state: EpochState, epoch: int, callbacks: list[Callback], progress: bool) -> None:
    t0 = time.time()
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    if run.phases.of(epoch) != state.phase:
        state.phase = run.phases.of(epoch)
        state.optimizer, state.scheduler = run.phases.setup(state.phase)
        log.info(f"phase {state.phase}: " + ("every layer, discriminative learning rates" if state.phase == 2 else
                                             f"every layer at {run.cfg.finetune.final_lr_scale:g}× the learning rate"))
    stats = train_one_epoch(run, state, epoch, progress)
    val, val_loss = validate(run, state)
    row = {"epoch": epoch + 1, **stats, "val_loss": val_loss, "val_acc": val["acc"],
           "val_auc": val["auc"] if val["auc"] is not None else float("nan"),
           "lr": state.optimizer.param_groups[0]["lr"], "seconds": time.time() - t0, "phase": state.phase}
    if "qwk" in val:  # graded labels: the validation kappa, shown each epoch
        row["val_qwk"] = val["qwk"] if val["qwk"] is not None else float("nan")
    state.history.append(row)
    current = monitor_value(val, val_loss, run.cfg.train.monitor)
    improved = current > state.best
    if improved:
        state.best, state.best_epoch, state.since_best = current, epoch + 1, 0
    else:
        state.since_best += 1
    for cb in callbacks:
        cb.on_epoch_end(run, state, row, improved)


def train(cfg: Config, resume: bool = False, progress: bool = True, force: bool = False,
          callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train, select the best epoch on validation data, evaluate it on test, explain, and report.

    Args:
        cfg: the run configuration (validated here before any work starts; never changed).
        resume: continue the run in ``cfg.out`` from its ``last.pt``.
        progress: show tqdm bars (the one-line epoch summaries are logged either way).
        force: write into a non-empty ``cfg.out`` that holds no run.
        callbacks: extra handlers, called after medsight's own (on rank 0 only).
    """
    cfg = validate_config(cfg)
    dinfo, device = init_distributed(cfg.train.device)
    try:
        return _train(_resolve(cfg, dinfo, device), resume, force, progress and dinfo.main, dinfo, device,
                      list(callbacks))
    finally:
        shutdown()


def _fit_budget(run: Run) -> None:
    """Replace the epoch count by what fits ``train.time_budget`` on this machine (and what follows from it,
    where the plan chose it); the saved config then holds the epochs, not the budget, to repeat the run."""
    cfg = run.cfg
    fit = epochs_for_budget(run, cfg.train.time_budget, MAX_EPOCHS)
    values: dict[str, Any] = {"train.epochs": fit.epochs, "train.time_budget": None}
    user = explicit_keys(cfg)
    if "train.epochs" in user:
        log.warning(f"train.time_budget replaces the train.epochs you set ({cfg.train.epochs}) by {fit.epochs}")
    if run.plan is not None:  # warm-up and patience follow the epochs where the plan chose them
        values.update({d.key: d.value for d in epoch_dependent(fit.epochs) if d.key not in user})
    run.cfg = with_values(cfg, values)
    run.phases = Phases(run.cfg, run.model, len(run.loaders["train"]), fused=run.device.type == "cuda")
    run.budget = fit
    log.info(f"time budget {fit.budget:.0f}s: {fit.steps_per_epoch} steps of {fit.step_seconds:.2f}s per epoch "
             f"(+ validation) ≈ {fit.epoch_seconds:.0f}s, evaluation ≈ {fit.finish_seconds:.0f}s -> "
             f"{fit.epochs} epochs")


def _write_plan(run: Run) -> None:
    if run.plan is None and run.budget is None:
        return
    doc = {**(run.plan.as_dict() if run.plan else {}), "time_budget": run.budget.as_dict() if run.budget else None}
    write_text_atomic(json.dumps(doc, indent=2), run.out / "plan.json")


def _train(cfg: Config, resume: bool, force: bool, progress: bool, dinfo: DistInfo, device: torch.device,
           extra: list[Callback]) -> RunResult:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    saved = _previous(cfg, resume, force) if dinfo.main or resume else None
    run = build_run(cfg, Path(cfg.out), dinfo, device)
    if run.plan is not None:
        for line in run.plan.lines():
            log.info(line)
    if run.cfg.train.time_budget and saved is None:
        _fit_budget(run)
    state = EpochState(phase=run.phases.of(0))
    state.optimizer, state.scheduler = run.phases.setup(state.phase)
    start = _restore(run, state, saved) if saved is not None else 0
    own: list[Callback] = [CheckpointSaver(), HistoryWriter(), ConsoleLogger(), *make_loggers(run.cfg.train.loggers)]
    callbacks = (own + extra if dinfo.main else []) + [EarlyStopping()]
    if dinfo.main:
        run.out.mkdir(parents=True, exist_ok=True, mode=0o700)
        save_config(run.cfg, run.out / "config.yaml")
        _write_plan(run)
    for cb in callbacks:
        cb.on_train_start(run, state)
    interrupted = False
    try:
        for epoch in range(start, run.cfg.train.epochs):
            _epoch(run, state, epoch, callbacks, progress)
            if state.stop:
                break
    except KeyboardInterrupt:
        interrupted = True
        log.warning(f"interrupted: {run.out}/last.pt and history.csv hold the last finished epoch "
                    f"({len(state.history)}); continue with `medsight train --resume --out {run.out}`")
    if state.skipped:
        names = sorted(state.skipped)
        log.warning(f"skipped {len(names)} unreadable file(s): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    metrics = None
    if state.history and not interrupted and dinfo.main:  # rank 0 evaluates on test, explains and reports
        metrics = finish_run(run, state)
    for cb in callbacks:
        cb.on_train_end(run, state, metrics)
    if dinfo.main and run.out.is_dir():
        make_private(run.out)  # finished or interrupted: one permission policy for every run file
    return RunResult(out=run.out, metrics=metrics or {}, history=state.history,
                     interrupted=interrupted or not state.history)
