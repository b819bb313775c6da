"""After training: evaluate best.pt on validation and test, explain, measure, and write the run's report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from medsight.checkpoint import load_model
from medsight.config import DEFAULT_DATA, config_to_dict
from medsight.engine.build import Run
from medsight.engine.loop import EpochState
from medsight.evaluation.runs import save_predictions
from medsight.evaluation.sharpness import fixed_batches, sharpness
from medsight.explainers.cam import BORDER_WARN
from medsight.explainers.faithfulness import faithfulness
from medsight.explainers.gallery import gradcam_gallery
from medsight.evaluation.robustness import robustness
from medsight.evaluation.trust import decision_probs, fit_on_validation, measure
from medsight.inference.predictor import predict_logits
from medsight.models import cam_target
from medsight.reporting.figures import task_figures
from medsight.reporting.html import baseline_table, write_report
from medsight.reporting.model_card import model_card_sections, to_html, to_markdown
from medsight.reporting.plots import plot_curves, plot_faithfulness, plot_gallery, plot_robustness
from medsight.reporting.run_report import RunReport
from medsight.reporting.tables import summary_line, task_checklist
from medsight.utils.files import make_private, save_atomic, write_text_atomic

__all__ = ["finish_run", "StepTimer", "run_timing"]

log = logging.getLogger(__name__)


class StepTimer:
    """Wall seconds of each end-of-run step, so that their cost can be set against training's (timing.json)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def run_timing(history: list[dict[str, Any]], steps: dict[str, float]) -> dict[str, Any]:
    """Training, validation and end-of-run seconds of a run, and the end-of-run share of the three."""
    train = sum(float(r["train_seconds"]) for r in history)
    val = sum(float(r["seconds"]) - float(r["train_seconds"]) for r in history)
    end = sum(steps.values())
    return {"train_seconds": round(train, 3), "validation_seconds": round(val, 3),
            "end_of_run_seconds": round(end, 3), "end_of_run_steps": {k: round(v, 3) for k, v in steps.items()},
            "end_of_run_share": round(end / (train + val + end), 4) if train + val + end > 0 else None}


def _explain(run: Run, model: torch.nn.Module, tp: Any, tl: Any, timer: StepTimer) -> dict[str, Any]:
    """Grad-CAM gallery, border (shortcut) scores and faithfulness curves on test images."""
    cfg, out, e = run.cfg, run.out, run.cfg.explain
    with timer("gallery"):
        layer = cam_target(model, e.target_layer, img_size=cfg.data.image_size).name
        rows, border = gradcam_gallery(model, run.datasets["test"], tp, tl, run.task, run.device, e.method,
                                       e.target_layer, e.gallery_per_class, seed=cfg.train.seed)
        plot_gallery(rows, out / "gradcam_gallery.png")
    result: dict[str, Any] = {"explain": {"method": e.method, "target_layer": layer, **border}}
    if e.faithfulness_images:
        with timer("faithfulness"):
            sample = fixed_batches(run.datasets["test"], 1, batch_size=e.faithfulness_images, seed=cfg.train.seed)
            if sample:
                faith = faithfulness(model, sample[0][0].to(run.device), e.faithfulness_methods, e.target_layer,
                                     seed=cfg.train.seed, activation=run.task.head.activation)
                result["faithfulness"] = faith
                plot_faithfulness(faith, out / "faithfulness.png")
    return result


def _scored_meta(data: Any, skipped: list[str]) -> dict[str, list[str]] | None:
    """The test split's metadata (sex, age, ...) for the images that were scored: unreadable ones are left out
    of the predictions, so their rows are left out here too (else the subgroup table misaligns)."""
    if not data.meta:
        return None
    bad = set(skipped)
    keep = [i for i in range(len(data)) if data.describe(i) not in bad]
    return {k: [v[i] for i in keep] for k, v in data.meta.items()}


def _optional(metrics: dict[str, Any], step: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an optional end-of-run step; one that fails is skipped with its reason (in metrics.json and the
    log) so that the run still ends with its metrics and report."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of an optional step: said, never fatal to the run
        log.warning("%s skipped: %s: %s", step, type(exc).__name__, exc)
        metrics.setdefault("steps_skipped", []).append({"step": step, "reason": f"{type(exc).__name__}: {exc}"})
        return None


def finish_run(run: Run, state: EpochState) -> dict[str, Any]:
    """Reload best.pt, fit the task's decision rule and the trust rules (temperature, operating points,
    conformal sets, abstention) on validation, evaluate on test, explain, measure sharpness (and robustness
    when asked), and write figures, predictions.npz, metrics.json, model_card.md and report.html, and the
    seconds of each step with training's and validation's in timing.json. Optional steps that fail are skipped
    with their reason, so that a run always ends with its metrics and report."""
    cfg, out, task, device = run.cfg, run.out, run.task, run.device
    timer = StepTimer()
    with timer("predict"):
        model, ckpt = load_model(out / "best.pt", device)
        model = model.to(memory_format=torch.channels_last)
        vlog, vl, val_skipped = predict_logits(model, run.loaders["val"], device, tta=cfg.eval.tta)
        tlog, tl, test_skipped = predict_logits(model, run.loaders["test"], device, tta=True)  # TTA always measured
    with timer("metrics"):
        # temperature, decision rule, operating points, conformal sets, abstention: fitted on validation only
        # and kept with the model for every later command
        vp = fit_on_validation(task, cfg.eval, vlog, vl)
        tp = decision_probs(task, tlog)
        save_atomic({**ckpt, "task": task.state()}, out / "best.pt")
        val_m = task.metrics(vl, vp, n_boot=0)
        test_m = task.metrics(tl, tp, n_boot=1000, seed=cfg.train.seed)
        metrics: dict[str, Any] = {}
        _optional(metrics, "curves", plot_curves, state.history, out / "curves.png", state.best_epoch)
        figures = _optional(metrics, "figures", task_figures, task, out, {"val": (vl, vp), "test": (tl, tp)},
                            test_m) or []
    metrics.update({
        "val": val_m, "test": test_m, "task": task.kind, "classes": task.classes, "best_epoch": state.best_epoch,
        "epochs_run": len(state.history), "monitor": cfg.train.monitor, "parameters": run.n_params,
        "data": run.bundle.source, "train_seconds": float(sum(r["seconds"] for r in state.history)),
        "figures": figures, "skipped_files": sorted(set(state.skipped) | set(val_skipped) | set(test_skipped)
                                                    | set(run.bundle.skipped))})
    with timer("trust"):
        _trust(run, metrics, tlog, tl, test_skipped)
    if cfg.eval.robustness:
        with timer("robustness"):
            _robustness(run, model, metrics)
    metrics.update(_optional(metrics, "explain", _explain, run, model, tp, tl, timer) or {})
    check = task_checklist(task, test_m, cfg.checklist.model_dump())
    if check:
        metrics["checklist"] = check
    if cfg.train.sharpness_batches:
        with timer("sharpness"):
            batches = fixed_batches(run.datasets["train_eval"], cfg.train.sharpness_batches, batch_size=64,
                                    seed=cfg.train.seed)
            metrics["sharpness"] = sharpness(model, batches, rho=cfg.optim.rho, loss_fn=task.head.eval_loss(),
                                             seed=cfg.train.seed)
    if Path(run.bundle.source) == DEFAULT_DATA:
        metrics["baselines"] = baseline_table(cfg.model.name, test_m["auc"], test_m["accuracy"])
    with timer("report"):
        save_predictions(out, vp, vl, tp, tl, task.classes)
        _write_reports(run, metrics)
    write_text_atomic(json.dumps(run_timing(state.history, timer.seconds), indent=2), out / "timing.json")
    make_private(out)
    _log_summary(run, metrics)
    return metrics


def _robustness(run: Run, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
    """The test metric under corruptions (eval.robustness), and its figure."""
    test = run.datasets["test"]
    rob = _optional(metrics, "robustness", robustness, model, run.task, test.data, test.transform, run.device,
                    seed=run.cfg.train.seed, num_workers=run.loader.num_workers if run.loader else 0)
    if rob is not None:
        metrics["robustness"] = rob
        plot_robustness(metrics["robustness"], run.out / "robustness.png")
        metrics["figures"].append("robustness.png")


def _trust(run: Run, metrics: dict[str, Any], tlog: Any, tl: Any, test_skipped: list[str]) -> None:
    """The trust measurements on test; without the subgroup table if that is the part that fails."""
    cfg, task = run.cfg, run.task
    meta = _scored_meta(run.datasets["test"].data, test_skipped)
    trust = _optional(metrics, "trust", measure, task, cfg.eval, tlog, tl, meta=meta, out=run.out, seed=cfg.train.seed)
    if trust is None and meta:  # the subgroup table is the part that depends on the data's metadata
        trust = _optional(metrics, "trust without subgroups", measure, task, cfg.eval, tlog, tl, meta=None,
                          out=run.out, seed=cfg.train.seed)
    if trust is not None:
        metrics["trust"] = trust
        metrics["figures"] += metrics["trust"].pop("figures")


def _write_reports(run: Run, metrics: dict[str, Any]) -> None:
    """metrics.json first (it never depends on a plot), then the model card and report.html."""
    out = run.out
    report = RunReport.of(metrics)
    report.write(out / "metrics.json")
    try:
        card = model_card_sections(report, config_to_dict(run.cfg), run.bundle.summary())
        write_text_atomic(to_markdown(card, out.name), out / "model_card.md")
        write_report(out, run.cfg, report, run.task, title=f"medsight run: {out.name}", card=to_html(card))
    finally:
        make_private(out)  # the gallery and the report show patient images: owner-only, like every run file


def _log_summary(run: Run, metrics: dict[str, Any]) -> None:
    log.info(f"test: {summary_line(run.task, metrics['test'])}")
    if "checklist" in metrics:
        failed = [f"{c['check']} {c['threshold']:g}" for c in metrics["checklist"]["checks"] if not c["pass"]]
        log.info(f"checklist: {'PASS' if not failed else 'FAIL (' + '; '.join(failed) + ')'}")
    if "sharpness" in metrics:
        sh = metrics["sharpness"]
        log.info(f"sharpness (rho {sh['rho']:g}, {sh['images']} training images): ascent {sh['ascent']:.4f} · "
                 f"random {sh['random']:.4f} · loss {sh['loss']:.4f}")
    border = metrics.get("explain")
    if border and border["border_warning"]:
        per = ", ".join(f"{c} {v:.3f}" for c, v in border["border_score_per_class"].items()) or "n/a"
        log.warning(f"Grad-CAM border score {border['border_score_max_class']:.3f} > {BORDER_WARN} (highest class "
                    f"mean; per class {per}): the model may rely on image borders/corners (shortcut); see "
                    f"{run.out / 'report.html'}")
    if "baselines" in metrics:
        log.info(metrics["baselines"])
    log.info(f"run folder: {run.out}  (report: {run.out / 'report.html'})")
