"""Trust for clinical use: what a reviewer asks beyond the AUC, for any task kind, from logits.

* :func:`fit_on_validation` fits, on validation data only, everything that later commands apply: the
  temperature, the task's decision rule (on calibrated probabilities), the operating points for the stated
  target, the conformal quantile and the abstention threshold. All of it is stored in the task's fitted rules,
  so the checkpoint carries it to predict, serve, export and ensembles.
* :func:`measure` reports them on test (or on external data): calibration before and after, operating
  points with intervals, risk–coverage curves (max probability against TTA-based scores), conformal
  coverage and set size, TTA's effect, and per-subgroup gaps when the data carries metadata.

Everything per class or per finding goes through the task's readout (:meth:`~medsight.tasks.Readout.binary_views`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medsight.evaluation.subgroups import detect_columns, group_labels, subgroup_metrics
from medsight.metrics.calibration import binary_ece
from medsight.metrics.operating_points import choose_threshold, describe_target, operating_point
from medsight.metrics.selective import abstention_threshold, risk_coverage
from medsight.reporting.plots import plot_reliability, plot_risk_coverage
from medsight.tasks import Task

if TYPE_CHECKING:
    from medsight.config import EvalConfig

__all__ = ["fit_calibration", "fit_on_validation", "measure", "decision_probs", "CONFORMAL_CAVEAT"]

CONFORMAL_CAVEAT = ("Conformal coverage is guaranteed on average over images exchangeable with the validation "
                    "images it was calibrated on; it does not hold per subgroup, nor under a shift of scanner, "
                    "site or population.")


def _probs(task: Task, logits: np.ndarray, calibrated: bool = True) -> np.ndarray:
    z = torch.as_tensor(logits, dtype=torch.float32)
    f = task.probabilities if calibrated else task.head.activation
    return f(z).numpy().astype(np.float64)


def decision_probs(task: Task, logits: np.ndarray) -> np.ndarray:
    """The probabilities the model answers with: calibrated, and averaged over TTA views when the logits
    carry views (V, N, K) and the task decided to use them."""
    if logits.ndim == 3:
        if task.rules.tta:
            return np.mean([_probs(task, v) for v in logits], axis=0)
        logits = logits[0]
    return _probs(task, logits)


def fit_calibration(task: Task, val_logits: np.ndarray, val_labels: np.ndarray) -> None:
    """Temperature scaling of the task's head (one temperature, or one per finding) into its fitted rules."""
    rules = task.rules
    rules.temperature, rules.temperature_not_fitted = task.head.fit_temperature(val_logits, val_labels, task.classes,
                                                                                rules.logit_offset)


def fit_on_validation(task: Task, ev: EvalConfig, val_logits: np.ndarray, val_labels: np.ndarray) -> np.ndarray:
    """Fit temperature, decision rule, operating points, conformal quantile and abstention threshold on
    validation logits ((N, K), or (V, N, K) with TTA views); returns the validation probabilities used."""
    plain = val_logits[0] if val_logits.ndim == 3 else val_logits
    labels = np.asarray(val_labels, dtype=np.int64)
    rules = task.rules
    rules.clear_trust()
    if ev.calibrate:
        fit_calibration(task, plain, labels)
    if ev.tta and val_logits.ndim == 3:
        rules.tta = True
    probs = decision_probs(task, val_logits)
    task.fit_decision(labels, probs)
    target = describe_target(ev.target_sensitivity, ev.target_specificity)
    views = {}
    for name, y, score in task.readout.binary_views(labels, probs):
        t = choose_threshold(y, score, ev.target_sensitivity, ev.target_specificity)
        if t is not None:
            reached = operating_point(y, score, t, n_boot=0)
            views[name] = {"threshold": t, "val": {k: reached[k] for k in ("sensitivity", "specificity", "ppv", "npv")}}
    rules.operating_points = {"target": target, "views": views}
    rules.conformal = task.readout.fit_conformal(labels, probs, ev.conformal_coverage, ev.conformal_score,
                                                 ev.conformal_class_conditional)
    below = abstention_threshold(task.readout.confidence(probs), ev.abstain_fraction)
    if below is not None:
        rules.abstain_below, rules.abstain_fraction = below, float(ev.abstain_fraction)
    return probs


def _calibration(task: Task, labels: np.ndarray, raw: np.ndarray, cal: np.ndarray) -> dict[str, Any]:
    t, readout = task.rules.temperature, task.readout
    per_view = {name: {"ece_before": binary_ece(y, s), "ece_after": binary_ece(y2, s2)}
                for (name, y, s), (_, y2, s2) in zip(readout.binary_views(labels, raw), readout.binary_views(labels, cal))}
    if isinstance(t, list) and len(t) == len(per_view):  # one temperature per output, and one view per output
        for v, tk in zip(per_view.values(), t):
            v["temperature"] = tk
    before, after = readout.reliability(labels, raw), readout.reliability(labels, cal)
    offset = task.rules.logit_offset if t is not None else None
    return {"temperature": t, "fitted": t is not None, "logit_offset": offset,
            "ece_before": before["ece"], "ece_after": after["ece"], "per_view": per_view,
            "reliability": {"before": before, "after": after}}


def _selective(task: Task, labels: np.ndarray, views: np.ndarray | None, probs: np.ndarray) -> dict[str, Any]:
    readout = task.readout
    errors = readout.errors(labels, probs)
    scores = {"max probability": readout.confidence(probs)}
    if views is not None:  # TTA views: the mean's confidence, and agreement (minus the spread of the decided output)
        scores["TTA mean probability"] = readout.confidence(views.mean(0))
        scores["TTA agreement (−std)"] = -readout.tta_spread(views, probs)
    curves = {name: risk_coverage(errors, s) for name, s in scores.items()}
    best = min(curves, key=lambda n: curves[n]["aurc"])
    out: dict[str, Any] = {"curves": curves, "best": best, "aurc": {n: c["aurc"] for n, c in curves.items()},
                           "risk": float(errors.mean())}
    below = task.rules.abstain_below
    if below is not None:
        answered = readout.confidence(probs) >= below
        out["abstention"] = {"threshold": below, "val_fraction": task.rules.abstain_fraction,
                             "referred": float(1 - answered.mean()),
                             "risk_answered": float(errors[answered].mean()) if answered.any() else None}
    return out


def _operating_points(task: Task, labels: np.ndarray, probs: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    fitted = task.rules.operating_points or {}
    views = fitted.get("views", {})
    out = {}
    for name, y, score in task.readout.binary_views(labels, probs):
        if name in views:
            op = operating_point(y, score, views[name]["threshold"], n_boot=n_boot, seed=seed)
            out[name] = {**op, "val": views[name]["val"]}
    return {"target": fitted.get("target"), "views": out}


def _subgroups(task: Task, labels: np.ndarray, probs: np.ndarray, meta: dict[str, list[str]] | None,
               ev: EvalConfig, n_boot: int, seed: int) -> dict[str, Any]:
    if not meta:
        return {"columns": {}, "note": "the data carries no metadata columns (CSV manifests can: sex, age, site, ...)"}
    wanted = list(ev.subgroups) if ev.subgroups is not None else detect_columns(list(meta))
    out: dict[str, Any] = {"columns": {}, "detected": ev.subgroups is None, "available": sorted(meta)}
    missing = [c for c in wanted if c not in meta]
    if missing:
        out["missing"] = missing
        out["note"] = f"eval.subgroups names column(s) {', '.join(missing)} that the data lacks; it has {', '.join(meta)}"
    views = (task.rules.operating_points or {}).get("views", {})
    labelled = task.readout.view_labelled(labels)  # a view may leave images out (a finding's masked labels)
    for col in (c for c in wanted if c in meta):
        groups = np.asarray(group_labels(col, meta[col]), dtype=object)
        out["columns"][col] = {name: subgroup_metrics(y, s, views.get(name, {}).get("threshold"),
                                                      groups[labelled[:, v]].tolist(), min_size=ev.subgroup_min_size,
                                                      n_boot=n_boot, seed=seed)
                               for v, (name, y, s) in enumerate(task.readout.binary_views(labels, probs))}
    return out


def measure(task: Task, ev: EvalConfig, logits: np.ndarray, labels: np.ndarray, *,
            meta: dict[str, list[str]] | None = None, out: Path | None = None, seed: int = 0,
            prefix: str = "") -> dict[str, Any]:
    """The trust section for ``logits`` ((N, K), or (V, N, K) with TTA views) and ``labels``, with the rules
    fitted on validation; with ``out``, the reliability diagram and the risk–coverage figure are written."""
    labels = np.asarray(labels, dtype=np.int64)
    plain = logits[0] if logits.ndim == 3 else logits
    # calibrated probabilities of every TTA view, once: view 0 is the plain image, and the decision reads the
    # views' mean when the task uses TTA (as decision_probs does)
    views = np.stack([_probs(task, v) for v in logits]) if logits.ndim == 3 else None
    raw, cal = _probs(task, plain, calibrated=False), (views[0] if views is not None else _probs(task, plain))
    probs = views.mean(0) if views is not None and task.rules.tta else cal
    n_boot = ev.bootstrap
    result: dict[str, Any] = {"n": int(len(labels)), "calibration": _calibration(task, labels, raw, cal),
                              "operating_points": _operating_points(task, labels, probs, n_boot, seed),
                              "selective": _selective(task, labels, views, probs)}
    conformal = task.rules.conformal
    if conformal:
        result["conformal"] = {"method": conformal["method"], "target_coverage": conformal["coverage"],
                               "class_conditional": conformal["class_conditional"], "qhat": conformal["qhat"],
                               **task.readout.conformal_metrics(labels, probs, conformal), "caveat": CONFORMAL_CAVEAT}
    if views is not None:
        tta = views.mean(0)
        m0, m1 = task.epoch_metrics(labels, cal), task.epoch_metrics(labels, tta)
        result["tta"] = {"used_for_decisions": bool(task.rules.tta), "views": int(logits.shape[0]),
                         "auc_without": m0.get("auc"), "auc_with": m1.get("auc"),
                         "accuracy_without": m0.get("accuracy"), "accuracy_with": m1.get("accuracy"),
                         "ece_without": result["calibration"]["ece_after"],  # the calibrated plain view's
                         "ece_with": task.readout.reliability(labels, tta)["ece"]}
    result["subgroups"] = _subgroups(task, labels, probs, meta, ev, n_boot, seed)
    if out is not None:
        rel, rc = f"{prefix}reliability.png", f"{prefix}risk_coverage.png"
        plot_reliability({"before temperature": result["calibration"]["reliability"]["before"],
                          "after temperature": result["calibration"]["reliability"]["after"]}, out / rel)
        plot_risk_coverage(result["selective"]["curves"], out / rc)
        result["figures"] = [rel, rc]
    return result
