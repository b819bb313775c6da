"""Combine finished runs into an ensemble, fit on validation predictions only.

An ensemble is written as a run-like folder (metrics.json, report.html, plots) plus ``ensemble.json``: the
member checkpoints, the method, and the combiner as plain numbers (weights or meta-learner coefficients)
— data, not a pickle. ``medsight predict``/``explain``/``serve`` accept that file like a checkpoint
(:class:`medsight.inference.EnsemblePredictor`).
"""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medsight.checkpoint import load_checkpoint
from medsight.config import choices, config_from_dict
from medsight.evaluation.compare import diversity, diversity_html
from medsight.evaluation.runs import EnsembleError, RunData, check_compatible, load_run, save_predictions
from medsight.inference.ensemble import combine, features
from medsight.tasks import fresh_task
from medsight.reporting.figures import task_figures
from medsight.reporting.html import checklist_html, html_table, img_tag, page
from medsight.reporting.run_report import RunReport
from medsight.reporting.tables import metric_tables, task_checklist
from medsight.utils.files import PRIVATE_DIR, make_private, write_text_atomic

__all__ = ["ensemble", "EnsembleMethod", "METHODS", "EnsembleError"]

EnsembleMethod = Literal["soft", "weighted", "stacking", "ovo"]
METHODS = choices(EnsembleMethod)


def _fit_combiner(method: str, runs: list[RunData], meta: str, seed: int) -> dict[str, Any]:
    """The combiner as plain numbers, fit on validation predictions only."""
    if method == "soft":
        return {"weights": [1.0 / len(runs)] * len(runs)}
    if method == "weighted":
        aucs = [r.task.epoch_metrics(r.val_labels, r.val_probs)["auc"] for r in runs]
        if any(a is None for a in aucs):
            raise EnsembleError("weighted ensembles need a validation AUC for every run (both classes in val)")
        w = np.array(aucs)
        return {"weights": (w / w.sum()).tolist(), "val_auc": aucs}
    if runs[0].task.kind == "multilabel":
        return _fit_per_finding(method, runs)
    x, y = features([r.val_probs for r in runs]), runs[0].val_labels
    if len(np.unique(y)) < 2:
        raise EnsembleError("stacking needs validation predictions with at least two classes")
    k = len(runs[0].classes)
    if method == "stacking":
        if meta == "mlp":
            from sklearn.neural_network import MLPClassifier

            clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=seed).fit(x, y)
            return {"meta": "mlp", "coefs": [c.tolist() for c in clf.coefs_],
                    "intercepts": [b.tolist() for b in clf.intercepts_], "classes_seen": clf.classes_.tolist()}
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(max_iter=2000).fit(x, y)
        return {"meta": "logistic", "coef": clf.coef_.tolist(), "intercept": clf.intercept_.tolist(),
                "classes_seen": clf.classes_.tolist()}
    if method == "ovo":
        if k < 3:
            raise EnsembleError("ovo (one-vs-one) needs at least three classes; use stacking for two")
        from sklearn.linear_model import LogisticRegression

        pairs = []
        for a, b in itertools.combinations(range(k), 2):
            mask = (y == a) | (y == b)
            if len(np.unique(y[mask])) < 2:
                raise EnsembleError(f"ovo: validation data lacks class {a if (y[mask] == b).all() else b}")
            clf = LogisticRegression(max_iter=2000).fit(x[mask], (y[mask] == b).astype(int))
            pairs.append({"a": a, "b": b, "coef": clf.coef_[0].tolist(), "intercept": float(clf.intercept_[0])})
        return {"pairs": pairs}
    raise EnsembleError(f"unknown ensemble method {method!r}; choose from {', '.join(METHODS)}")



def _fit_per_finding(method: str, runs: list[RunData]) -> dict[str, Any]:
    """Multi-label stacking: per finding, a logistic regression on the members' probabilities of that finding
    (validation images whose label is not masked). A finding without both labels in validation keeps the
    members' mean, and the combiner says so."""
    if method != "stacking":
        raise EnsembleError(f"{method} combines one class per image; multi-label runs take soft, weighted or stacking")
    from sklearn.linear_model import LogisticRegression

    y_all = runs[0].val_labels
    coef, icpt, mean_only = [], [], []
    for k, name in enumerate(runs[0].classes):
        keep = y_all[:, k] >= 0
        x = np.stack([r.val_probs[keep, k] for r in runs], 1)
        y = (y_all[keep, k] == 1).astype(int)
        if len(np.unique(y)) < 2:
            coef.append(None)
            icpt.append(None)
            mean_only.append(name)
            continue
        clf = LogisticRegression(max_iter=2000).fit(x, y)
        coef.append(clf.coef_[0].tolist())
        icpt.append(float(clf.intercept_[0]))
    return {"meta": "logistic_per_finding", "coef": coef, "intercept": icpt, "mean_only": mean_only}


def ensemble(run_paths: list[str | Path], method: str, out: str | Path, meta: str = "logistic",
             seed: int = 0) -> dict[str, Any]:
    """Fit ``method`` on the runs' validation predictions, evaluate on test, write a run-like folder."""
    if method not in METHODS:
        raise EnsembleError(f"unknown ensemble method {method!r}; choose from {', '.join(METHODS)}")
    if meta not in ("logistic", "mlp"):
        raise EnsembleError(f"unknown meta-learner {meta!r}; choose logistic or mlp")
    if len(run_paths) < 2:
        raise EnsembleError("an ensemble needs at least two runs")
    runs = [load_run(p) for p in run_paths]
    check_compatible(runs)
    classes, k = runs[0].classes, len(runs[0].classes)
    combiner = _fit_combiner(method, runs, meta, seed)
    vp = combine(method, combiner, [r.val_probs for r in runs], k)
    tp = combine(method, combiner, [r.test_probs for r in runs], k)
    vl, tl = runs[0].val_labels, runs[0].test_labels
    task = fresh_task(runs[0].task)
    task.fit_decision(vl, vp)  # the ensemble's own decision rule, on validation predictions only
    val_m = task.metrics(vl, vp, n_boot=0)
    test_m = task.metrics(tl, tp, n_boot=1000, seed=seed)
    out = Path(out)
    out.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    spec = {"format": "medsight-ensemble-1", "method": method, "classes": classes, "task": task.state(),
            "members": [str((r.path / "best.pt").resolve()) for r in runs], "combiner": combiner}
    write_text_atomic(json.dumps(spec, indent=2), out / "ensemble.json")
    first_cfg = config_from_dict(load_checkpoint(runs[0].path / "best.pt")["config"])
    check = task_checklist(task, test_m, first_cfg.checklist.model_dump())
    metrics: dict[str, Any] = {
        "val": val_m, "test": test_m, "classes": classes, "method": method, "task": task.kind,
        "members": [{"run": str(r.path), "model": r.model, "test_auc": r.metrics["test"]["auc"],
                     "test_accuracy": r.metrics["test"]["accuracy"]} for r in runs],
        "diversity": diversity(runs)}
    if check:
        metrics["checklist"] = check
    save_predictions(out, vp, vl, tp, tl, classes)
    metrics["figures"] = task_figures(task, out, {**{r.name: (tl, r.test_probs) for r in runs}, f"ensemble ({method})": (tl, tp)},
                                      test_m, title=f"{method} ensemble")
    RunReport.of(metrics).write(out / "metrics.json")
    members = html_table(["member", "model", "test AUC", "test accuracy"],
                         [[m["run"], m["model"], m["test_auc"], m["test_accuracy"]] for m in metrics["members"]])
    tables = "".join(f"<h3>{html.escape(name)}</h3>{html_table(header, rows)}"
                     for name, header, rows in metric_tables(task, metrics))
    figures = " ".join(img_tag(out / f) for f in metrics["figures"])
    body = (f"<h2>{html.escape(method)} ensemble of {len(runs)} runs</h2>{tables}{checklist_html(metrics.get('checklist'))}"
            f"<h2>Members</h2>{members}<pre>{html.escape(test_m.get('report', ''))}</pre>"
            f"{figures}{diversity_html(metrics['diversity'])}")
    write_text_atomic(page(f"medsight ensemble: {out.name}", body), out / "report.html")
    make_private(out, only=["ensemble.json", "metrics.json", "report.html", "predictions.npz", *metrics["figures"]])
    return metrics
