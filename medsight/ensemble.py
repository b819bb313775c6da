"""Compare trained runs and combine them: tables, overlaid ROC curves, diversity, and ensembles.

Every run folder keeps its validation and test probabilities in ``predictions.npz``; comparing and
ensembling work from those, so no model is re-run except to time it. An ensemble is written as a
run-like folder (metrics.json, report.html, plots) plus ``ensemble.json``: the member checkpoints, the
method, and the combiner as plain numbers (weights or meta-learner coefficients) — data, not a pickle.
``medsight predict``/``explain``/``serve`` accept that file like a checkpoint.
"""

from __future__ import annotations

import html
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.checkpoint import load_checkpoint, write_text_atomic
from medsight.metrics import checklist, classification_metrics

__all__ = ["RunData", "load_run", "compare", "ensemble", "EnsemblePredictor", "diversity", "METHODS",
           "EnsembleError"]

METHODS = ("soft", "weighted", "stacking", "ovo")


class EnsembleError(ValueError):
    """Runs that cannot be compared or combined (different classes or test sets, too few runs...)."""


@dataclass
class RunData:
    path: Path
    name: str
    model: str
    classes: list[str]
    val_probs: np.ndarray
    val_labels: np.ndarray
    test_probs: np.ndarray
    test_labels: np.ndarray
    metrics: dict[str, Any]


def load_run(run: str | Path) -> RunData:
    """A run folder's predictions and metrics (``best.pt`` may be given instead of the folder)."""
    p = Path(run)
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise EnsembleError(f"run folder not found: {p}")
    pred_file, metrics_file = p / "predictions.npz", p / "metrics.json"
    for f in (pred_file, metrics_file, p / "best.pt"):
        if not f.is_file():
            raise EnsembleError(f"{p} is not a finished medsight run: {f.name} is missing")
    with np.load(pred_file, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    metrics = json.loads(metrics_file.read_text())
    cfg = load_checkpoint(p / "best.pt")["config"]
    return RunData(path=p, name=p.name, model=cfg["model"]["name"], classes=[str(c) for c in data["classes"]],
                   val_probs=data["val_probs"], val_labels=data["val_labels"], test_probs=data["test_probs"],
                   test_labels=data["test_labels"], metrics=metrics)


def _check_compatible(runs: list[RunData]) -> None:
    first = runs[0]
    for r in runs[1:]:
        if r.classes != first.classes:
            raise EnsembleError(f"{r.path} has classes {r.classes} but {first.path} has {first.classes}")
        for split in ("val", "test"):
            a, b = getattr(first, f"{split}_labels"), getattr(r, f"{split}_labels")
            if len(a) != len(b) or not np.array_equal(a, b):
                raise EnsembleError(f"{r.path} and {first.path} were evaluated on different {split} sets "
                                    f"({len(b)} vs {len(a)} images, labels {'equal' if np.array_equal(a, b) else 'differ'})")


# ------------------------------------------------------------------------------------------- diversity

def diversity(runs: list[RunData]) -> dict[str, Any]:
    """Pairwise disagreement, error correlation and Yule's Q-statistic on test, and the best run per class.

    Kuncheva & Whitaker, "Measures of Diversity in Classifier Ensembles", Machine Learning 51 (2003).
    """
    correct = {r.name: r.test_probs.argmax(1) == r.test_labels for r in runs}
    preds = {r.name: r.test_probs.argmax(1) for r in runs}
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
        best[cls] = max(recalls, key=recalls.get)
    return {"pairs": pairs, "best_per_class": best}


# --------------------------------------------------------------------------------------------- compare

def _images_per_second(run: RunData, n: int = 64) -> float:
    from medsight.checkpoint import load_model

    model, ckpt = load_model(run.path / "best.pt", "cpu")
    x = torch.randn(n, 3, ckpt["image_size"], ckpt["image_size"])
    with torch.inference_mode():
        model(x[:8])
        t0 = time.perf_counter()
        model(x)
    return n / (time.perf_counter() - t0)


def compare(run_paths: list[str | Path], out: str | Path, speed: bool = True) -> dict[str, Any]:
    """Table, overlaid ROC curves, per-class recall bars and diversity of several runs, with an HTML page."""
    from medsight.plots import plot_recall_bars, plot_roc

    runs = [load_run(p) for p in run_paths]
    if len(runs) < 2:
        raise EnsembleError("compare needs at least two runs")
    _check_compatible(runs)
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


def _table(header: list[str], rows: list[list[Any]]) -> str:
    from medsight.report import fmt_cell

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _diversity_html(div: dict[str, Any]) -> str:
    pairs = _table(["run A", "run B", "disagreement", "error correlation", "Q-statistic"],
                   [[p["a"], p["b"], p["disagreement"], p["error_correlation"], p["q_statistic"]] for p in div["pairs"]])
    best = _table(["class", "highest recall"], [[c, r] for c, r in div["best_per_class"].items()])
    return f"<h2>Diversity (test)</h2>{pairs}<p>Q near 1: the pair errs on the same images; near 0 or below: " \
           f"they err differently, which an ensemble can use.</p>{best}"


def _page(title: str, body: str) -> str:
    from medsight.report import STYLE

    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='warn'>Research software: not for clinical use.</p>{body}</body></html>")


def _write_compare_html(out: Path, result: dict[str, Any]) -> None:
    from medsight.report import img_tag

    classes = result["classes"]
    table = _table(["run", "model", "parameters", "AUC", "accuracy", "balanced acc.", "ECE", "images/s (CPU)",
                    "sharpness"] + [f"recall {c}" for c in classes],
                   [[r["run"], r["model"], r["parameters"], r["auc"], r["accuracy"], r["balanced_accuracy"], r["ece"],
                     r["images_per_s"], r["sharpness"]] + [r["recall"][c] for c in classes] for r in result["runs"]])
    body = (f"<h2>Test metrics</h2>{table}<h2>ROC curves and recall per class</h2>{img_tag(out / 'roc.png')} "
            f"{img_tag(out / 'recall.png')}{_diversity_html(result['diversity'])}")
    write_text_atomic(_page("medsight compare", body), out / "compare.html")


# -------------------------------------------------------------------------------------------- combiners

def _features(probs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(probs, axis=1)


def _fit_combiner(method: str, runs: list[RunData], meta: str, seed: int) -> dict[str, Any]:
    """The combiner as plain numbers, fit on validation predictions only."""
    from medsight.metrics import auc_score

    if method == "soft":
        return {"weights": [1.0 / len(runs)] * len(runs)}
    if method == "weighted":
        aucs = [auc_score(r.val_labels, r.val_probs) for r in runs]
        if any(a is None for a in aucs):
            raise EnsembleError("weighted ensembles need a validation AUC for every run (both classes in val)")
        w = np.array(aucs)
        return {"weights": (w / w.sum()).tolist(), "val_auc": aucs}
    x, y = _features([r.val_probs for r in runs]), runs[0].val_labels
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


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def combine(method: str, combiner: dict[str, Any], probs: list[np.ndarray], k: int) -> np.ndarray:
    """Apply a fitted combiner to member probabilities (each N×k); returns N×k probabilities."""
    if method in ("soft", "weighted"):
        return sum(w * p for w, p in zip(combiner["weights"], probs))
    x = _features(probs)
    if method == "stacking":
        seen = combiner["classes_seen"]
        if combiner["meta"] == "logistic":
            coef, icpt = np.array(combiner["coef"]), np.array(combiner["intercept"])
            z = x @ coef.T + icpt
            p_seen = np.concatenate([1 / (1 + np.exp(z)), 1 / (1 + np.exp(-z))], 1) if coef.shape[0] == 1 \
                else _softmax(z)
        else:
            h = x
            layers = list(zip(combiner["coefs"], combiner["intercepts"]))
            for i, (w, b) in enumerate(layers):
                h = h @ np.array(w) + np.array(b)
                if i < len(layers) - 1:
                    h = np.maximum(h, 0)  # scikit-learn's default relu
            p_seen = np.concatenate([1 - 1 / (1 + np.exp(-h)), 1 / (1 + np.exp(-h))], 1) if h.shape[1] == 1 \
                else _softmax(h)
        out = np.zeros((len(x), k))
        out[:, seen] = p_seen
        return out
    if method == "ovo":  # pairwise probabilities, summed into votes (Hastie & Tibshirani style soft voting)
        votes = np.zeros((len(x), k))
        for pair in combiner["pairs"]:
            pb = 1 / (1 + np.exp(-(x @ np.array(pair["coef"]) + pair["intercept"])))
            votes[:, pair["a"]] += 1 - pb
            votes[:, pair["b"]] += pb
        return votes / votes.sum(1, keepdims=True)
    raise EnsembleError(f"unknown ensemble method {method!r}")


def ensemble(run_paths: list[str | Path], method: str, out: str | Path, meta: str = "logistic",
             seed: int = 0) -> dict[str, Any]:
    """Fit ``method`` on the runs' validation predictions, evaluate on test, write a run-like folder."""
    from medsight.config import config_from_dict
    from medsight.plots import plot_confusion, plot_roc
    from medsight.report import checklist_html, img_tag, save_predictions

    if method not in METHODS:
        raise EnsembleError(f"unknown ensemble method {method!r}; choose from {', '.join(METHODS)}")
    if meta not in ("logistic", "mlp"):
        raise EnsembleError(f"unknown meta-learner {meta!r}; choose logistic or mlp")
    if len(run_paths) < 2:
        raise EnsembleError("an ensemble needs at least two runs")
    runs = [load_run(p) for p in run_paths]
    _check_compatible(runs)
    classes, k = runs[0].classes, len(runs[0].classes)
    combiner = _fit_combiner(method, runs, meta, seed)
    vp = combine(method, combiner, [r.val_probs for r in runs], k)
    tp = combine(method, combiner, [r.test_probs for r in runs], k)
    vl, tl = runs[0].val_labels, runs[0].test_labels
    val_m = classification_metrics(vl, vp, classes, n_boot=0)
    test_m = classification_metrics(tl, tp, classes, n_boot=1000, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = {"format": "medsight-ensemble-1", "method": method, "classes": classes,
            "members": [str((r.path / "best.pt").resolve()) for r in runs], "combiner": combiner}
    write_text_atomic(json.dumps(spec, indent=2), out / "ensemble.json")
    first_cfg = config_from_dict(load_checkpoint(runs[0].path / "best.pt")["config"])
    check = checklist(test_m, **vars(first_cfg.checklist))
    metrics: dict[str, Any] = {
        "val": val_m, "test": test_m, "classes": classes, "method": method,
        "members": [{"run": str(r.path), "model": r.model, "test_auc": r.metrics["test"]["auc"],
                     "test_accuracy": r.metrics["test"]["accuracy"]} for r in runs],
        "diversity": diversity(runs)}
    if check:
        metrics["checklist"] = check
    write_text_atomic(json.dumps(metrics, indent=2), out / "metrics.json")
    save_predictions(out, vp, vl, tp, tl, classes)
    plot_confusion(test_m["confusion_matrix"], classes, out / "confusion_matrix.png", title=f"{method} ensemble")
    plot_roc({**{r.name: (tl, r.test_probs) for r in runs}, f"ensemble ({method})": (tl, tp)}, classes,
             out / "roc.png")
    members = _table(["member", "model", "test AUC", "test accuracy"],
                     [[m["run"], m["model"], m["test_auc"], m["test_accuracy"]] for m in metrics["members"]])
    ci = test_m["ci95"]
    summary = _table(["", "AUC", "accuracy", "balanced acc.", "ECE"],
                     [["ensemble (test)", test_m["auc"], test_m["accuracy"], test_m["balanced_accuracy"], test_m["ece"]],
                      ["95% CI", str(ci.get("auc")), str(ci.get("accuracy")), None, None]])
    body = (f"<h2>{html.escape(method)} ensemble of {len(runs)} runs</h2>{summary}{checklist_html(metrics.get('checklist'))}"
            f"<h2>Members</h2>{members}<pre>{html.escape(test_m['report'])}</pre>"
            f"{img_tag(out / 'roc.png')} {img_tag(out / 'confusion_matrix.png')}{_diversity_html(metrics['diversity'])}")
    write_text_atomic(_page(f"medsight ensemble: {out.name}", body), out / "report.html")
    return metrics


# ------------------------------------------------------------------------------------------- inference

class EnsemblePredictor:
    """An ``ensemble.json`` used like a checkpoint: combined probabilities, mean of members' heatmaps."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        from medsight.api import Predictor

        p = Path(path)
        try:
            spec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise EnsembleError(f"{p} is not a readable ensemble file: {exc}") from exc
        if spec.get("format") != "medsight-ensemble-1":
            raise EnsembleError(f"{p} is not a medsight ensemble file")
        self.spec = spec
        self.members = [Predictor(m, device) for m in spec["members"]]
        self.classes: list[str] = spec["classes"]
        if any(m.classes != self.classes for m in self.members):
            raise EnsembleError(f"{p}: a member's classes differ from the ensemble's {self.classes}")
        self.image_size = self.members[0].image_size
        self.name = f"{spec['method']} ensemble of {', '.join(m.name for m in self.members)}"

    def probabilities(self, img: torch.Tensor) -> np.ndarray:
        probs = [m.probabilities(img)[None] for m in self.members]
        return combine(self.spec["method"], self.spec["combiner"], probs, len(self.classes))[0]

    def display(self, img: torch.Tensor) -> np.ndarray:
        return self.members[0].display(img)

    def heatmap(self, img: torch.Tensor, method: str = "gradcam", target_layer: str | None = None,
                class_idx: int | None = None) -> np.ndarray:
        """Mean of the members' maps (each resized to the first member's input size) for one class."""
        if class_idx is None:
            class_idx = int(self.probabilities(img).argmax())
        size = (self.image_size, self.image_size)
        maps = []
        for m in self.members:
            h = torch.from_numpy(m.heatmap(img, method, target_layer if m is self.members[0] else None, class_idx))
            maps.append(torch.nn.functional.interpolate(h[None, None], size=size, mode="bilinear",
                                                        align_corners=False)[0, 0])
        mean = torch.stack(maps).mean(0)
        lo, hi = mean.min(), mean.max()
        return ((mean - lo) / (hi - lo) if hi > lo else torch.zeros_like(mean)).numpy()
