"""Compare finished runs: a table, overlaid ROC curves, recall bars and diversity, with an HTML page."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.checkpoint import load_model
from medsight.evaluation.runs import EnsembleError, RunData, check_compatible, load_run
from medsight.reporting.html import html_table, img_tag, page
from medsight.reporting.plots import plot_recall_bars, plot_roc
from medsight.utils.files import write_text_atomic

__all__ = ["compare", "diversity", "diversity_html"]


def diversity(runs: list[RunData]) -> dict[str, Any]:
    """Pairwise disagreement, error correlation and Yule's Q-statistic on test, and the best run per class.

    Kuncheva & Whitaker, "Measures of Diversity in Classifier Ensembles", Machine Learning 51 (2003).
    """
    preds = {r.name: r.task.decide(r.test_probs) for r in runs}
    correct = {r.name: r.task.readout.correct(r.test_labels, r.test_probs) for r in runs}
    pairs = []
    for a, b in itertools.combinations(runs, 2):
        ca, cb = correct[a.name], correct[b.name]
        n11, n00 = float(np.sum(ca & cb)), float(np.sum(~ca & ~cb))
        n10, n01 = float(np.sum(ca & ~cb)), float(np.sum(~ca & cb))
        denom = n11 * n00 + n01 * n10
        ea, eb = (~ca).astype(float), (~cb).astype(float)
        corr = float(np.corrcoef(ea, eb)[0, 1]) if ea.std() > 0 and eb.std() > 0 else None
        pairs.append({"a": a.name, "b": b.name,
                      "disagreement": float(np.mean(preds[a.name] != preds[b.name])),
                      "error_correlation": corr,
                      "q_statistic": (n11 * n00 - n01 * n10) / denom if denom else None})
    best = {}
    for i, cls in enumerate(runs[0].classes):
        recalls = {r.name: r.metrics["test"]["per_class"][cls]["recall"] for r in runs}
        recalls = {n: v for n, v in recalls.items() if v is not None}  # a finding without test positives: none
        if recalls:
            best[cls] = max(recalls, key=recalls.get)
    return {"pairs": pairs, "best_per_class": best}



def _images_per_second(run: RunData, n: int = 64) -> float:
    model, ckpt = load_model(run.path / "best.pt", "cpu")
    x = torch.randn(n, 3, ckpt["image_size"], ckpt["image_size"])
    with torch.inference_mode():
        model(x[:8])
        t0 = time.perf_counter()
        model(x)
    return n / (time.perf_counter() - t0)


def compare(run_paths: list[str | Path], out: str | Path, speed: bool = True) -> dict[str, Any]:
    """Table, overlaid ROC curves, per-class recall bars and diversity of several runs, with an HTML page."""
    runs = [load_run(p) for p in run_paths]
    if len(runs) < 2:
        raise EnsembleError("compare needs at least two runs")
    check_compatible(runs)
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # sibling folders of different parents may share a name
        for r in runs:
            r.name = f"{r.path.parent.name}/{r.name}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in runs:
        t = r.metrics["test"]
        rows.append({"run": r.name, "model": r.model, "parameters": r.metrics.get("parameters"),
                     "auc": t["auc"], "accuracy": t["accuracy"], "balanced_accuracy": t["balanced_accuracy"],
                     "ece": t["ece"], "recall": {c: v["recall"] for c, v in t["per_class"].items()},
                     "images_per_s": round(_images_per_second(r), 1) if speed else None,
                     "sharpness": (r.metrics.get("sharpness") or {}).get("ascent")})
    plot_roc({r.name: (r.test_labels, r.test_probs) for r in runs}, runs[0].classes, out / "roc.png")
    plot_recall_bars({r.name: rows[i]["recall"] for i, r in enumerate(runs)}, out / "recall.png")
    result = {"runs": rows, "diversity": diversity(runs), "classes": runs[0].classes}
    write_text_atomic(json.dumps(result, indent=2), out / "compare.json")
    _write_compare_html(out, result)
    return result


def diversity_html(div: dict[str, Any]) -> str:
    pairs = html_table(["run A", "run B", "disagreement", "error correlation", "Q-statistic"],
                   [[p["a"], p["b"], p["disagreement"], p["error_correlation"], p["q_statistic"]] for p in div["pairs"]])
    best = html_table(["class", "highest recall"], [[c, r] for c, r in div["best_per_class"].items()])
    return f"<h2>Diversity (test)</h2>{pairs}<p>Q near 1: the pair errs on the same images; near 0 or below: " \
           f"they err differently, which an ensemble can use.</p>{best}"



def _write_compare_html(out: Path, result: dict[str, Any]) -> None:
    classes = result["classes"]
    table = html_table(["run", "model", "parameters", "AUC", "accuracy", "balanced acc.", "ECE", "images/s (CPU)",
                    "sharpness"] + [f"recall {c}" for c in classes],
                   [[r["run"], r["model"], r["parameters"], r["auc"], r["accuracy"], r["balanced_accuracy"], r["ece"],
                     r["images_per_s"], r["sharpness"]] + [r["recall"][c] for c in classes] for r in result["runs"]])
    body = (f"<h2>Test metrics</h2>{table}<h2>ROC curves and recall per class</h2>{img_tag(out / 'roc.png')} "
            f"{img_tag(out / 'recall.png')}{diversity_html(result['diversity'])}")
    write_text_atomic(page("medsight compare", body), out / "compare.html")
