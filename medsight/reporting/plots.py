"""Figures of a run: training curves, confusion matrix, ROC curves, Grad-CAM gallery and overlays."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

__all__ = ["plot_curves", "plot_confusion", "plot_roc", "plot_roc_grid", "plot_recall_bars", "plot_faithfulness",
           "plot_gallery", "plot_explanation", "plot_reliability", "plot_risk_coverage", "plot_robustness"]


def _save(fig: plt.Figure, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(history: Sequence[dict[str, float]], path: str | Path, best_epoch: int | None = None) -> None:
    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [r["train_loss"] for r in history], "o-", label="train")
    axes[0].plot(ep, [r["val_loss"] for r in history], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(ep, [r["train_acc"] for r in history], "o-", label="train acc")
    axes[1].plot(ep, [r["val_acc"] for r in history], "o-", label="val acc")
    axes[1].plot(ep, [r["val_auc"] for r in history], "s--", label="val AUC")
    if all("val_qwk" in r for r in history):  # graded labels: validation kappa
        axes[1].plot(ep, [r["val_qwk"] for r in history], "^-.", label="val QWK")
    axes[1].set_title("accuracy / AUC" + (" / QWK" if history and "val_qwk" in history[0] else ""))
    axes[2].plot(ep, [r["lr"] for r in history], "o-")
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", ls=":", lw=1)
        for prev, row in zip(history, history[1:]):
            if row.get("phase", 1) != prev.get("phase", 1):  # progressive fine-tuning: phase boundaries
                ax.axvline(prev["epoch"] + 0.5, color="tab:red", ls="--", lw=1)
                ax.text(prev["epoch"] + 0.55, 0.98, f"phase {row['phase']}", transform=ax.get_xaxis_transform(),
                        fontsize=7, color="tab:red", va="top")
    axes[0].legend()
    axes[1].legend()
    _save(fig, path)


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str | Path, title: str = "") -> None:
    cm = np.asarray(cm)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(2.2 + 0.7 * k, 1.8 + 0.7 * k))
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(k), classes, rotation=30, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (test)")
    _save(fig, path)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], classes: Sequence[str], path: str | Path) -> None:
    """``curves``: name -> (labels, probs); binary plots the positive class, multi-class one curve per class."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, (labels, probs) in curves.items():
        if probs.shape[1] == 2:
            if len(np.unique(labels)) > 1:
                fpr, tpr, _ = roc_curve(labels, probs[:, 1])
                ax.plot(fpr, tpr, label=name)
        else:
            for c in range(probs.shape[1]):
                y = (labels == c).astype(int)
                if 0 < y.sum() < len(y):
                    fpr, tpr, _ = roc_curve(y, probs[:, c])
                    ax.plot(fpr, tpr, label=f"{name}: {classes[c]}")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_roc_grid(curves: dict[str, tuple[np.ndarray, np.ndarray]], classes: Sequence[str], path: str | Path,
                  thresholds: Sequence[float] | None = None) -> None:
    """Multi-label: one ROC panel per finding, a curve per split (labels (N, K) with -1 masked, probs (N, K)),
    and where given the point of each finding's threshold on the last split."""
    k = len(classes)
    cols = min(5, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[k:]:
        ax.axis("off")
    for j, (ax, name) in enumerate(zip(axes.ravel(), classes)):
        drawn = False
        for split, (labels, probs) in curves.items():
            keep = labels[:, j] >= 0
            y, p = labels[keep, j], probs[keep, j]
            if 0 < y.sum() < len(y):
                fpr, tpr, _ = roc_curve(y, p)
                ax.plot(fpr, tpr, label=split)
                drawn = True
                if thresholds is not None and split == list(curves)[-1]:
                    pred = p >= thresholds[j]
                    ax.plot([pred[y == 0].mean()], [pred[y == 1].mean()], "ko", ms=3)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(name if drawn else f"{name} (not scoreable)", fontsize=8)
        ax.tick_params(labelsize=6)
        if j == 0 and drawn:
            ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("ROC per finding (dot: the threshold chosen on validation)", fontsize=9)
    _save(fig, path)


def plot_recall_bars(recalls: dict[str, dict[str, float]], path: str | Path) -> None:
    """Grouped bars: per-class recall (sensitivity) of each run."""
    names = list(recalls)
    classes = list(next(iter(recalls.values())))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(4.8, 1.2 * len(classes) * len(names) * 0.6), 3.8))
    for i, name in enumerate(names):
        xs = np.arange(len(classes)) + i * width
        ax.bar(xs, [recalls[name][c] for c in classes], width, label=name)
    ax.set_xticks(np.arange(len(classes)) + width * (len(names) - 1) / 2, classes)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall (test)")
    ax.set_title("recall per class")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def plot_faithfulness(faith: dict[str, Any], path: str | Path) -> None:
    """Mean deletion and insertion curves per explanation method (and the random map)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, v in faith["methods"].items():
        xs = np.linspace(0, 1, len(v["deletion_curve"]))
        style = {"color": "0.5", "ls": "--"} if name == "random" else {}
        axes[0].plot(xs, v["deletion_curve"], label=f"{name} ({v['deletion_auc']:.3f})", **style)
        axes[1].plot(xs, v["insertion_curve"], label=f"{name} ({v['insertion_auc']:.3f})", **style)
    for ax, title in zip(axes, ("deletion (lower is better)", "insertion (higher is better)")):
        ax.set_xlabel("share of pixels, hottest first")
        ax.set_ylabel("probability of explained class")
        ax.set_title(title)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_gallery(rows: list[dict[str, Any]], path: str | Path) -> None:
    """``rows``: each {"title": str, "items": [{"image": HxWx3, "overlay": HxWx3, "caption": str}]}."""
    n_cols = max(1, max((len(r["items"]) for r in rows), default=1)) * 2
    n_rows = max(1, len(rows))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.9 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, row in enumerate(rows):
        axes[r, 0].set_title(row["title"], fontsize=8, loc="left")
        for i, item in enumerate(row["items"]):
            axes[r, 2 * i].imshow(item["image"])
            axes[r, 2 * i + 1].imshow(item["overlay"])
            axes[r, 2 * i + 1].set_title(item["caption"], fontsize=7)
        if not row["items"]:
            axes[r, 0].text(0, 0.5, "(none)", fontsize=8)
    _save(fig, path)


def plot_explanation(image: np.ndarray, overlays: dict[str, np.ndarray], title: str, path: str | Path,
                     box: Sequence[float] | None = None) -> None:
    """The original beside one overlay per method; ``box`` (x0, y0, x1, y1 in the image's pixels) is drawn on
    every panel (a radiologist's box, for localization)."""
    n = 1 + len(overlays)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.5), squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=9)
    for ax, (name, ov) in zip(axes[0, 1:], overlays.items()):
        ax.imshow(ov)
        ax.set_title(name, fontsize=9)
    for ax in axes.ravel():
        if box is not None:  # pixel edges: a pixel index i spans [i - 0.5, i + 0.5] in imshow's frame
            ax.add_patch(matplotlib.patches.Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1],
                                                      fill=False, edgecolor="lime", linewidth=1.5))
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_reliability(bins: dict[str, dict[str, Any]], path: str | Path, title: str = "reliability (test)") -> None:
    """Reliability diagram: observed accuracy against stated confidence per bin, one line per version
    (e.g. before and after temperature scaling), with each version's ECE in the legend."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
    for name, b in bins.items():
        pts = [(c, f) for c, f in zip(b["confidence"], b["frequency"]) if c is not None and f is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-", ms=4, label=f"{name} (ECE {b['ece']:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("observed accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_risk_coverage(curves: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Risk–coverage curves (error among the answered images against the share answered), AURC in the legend."""
    fig, ax = plt.subplots(figsize=(4.8, 4.0))
    for name, c in curves.items():
        if c.get("coverage"):
            ax.plot(c["coverage"], c["selective_risk"], "-", label=f"{name} (AURC {c['aurc']:.4f})")
    ax.set_xlabel("coverage (share answered)")
    ax.set_ylabel("selective risk (error rate)")
    ax.set_xlim(0, 1)
    ax.set_title("risk–coverage (test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_robustness(result: dict[str, Any], path: str | Path) -> None:
    """The metric under each corruption against severity, the clean value as a dashed line."""
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    metric = result["metric"]
    for name, rows in result["corruptions"].items():
        ax.plot([0] + [r["severity"] for r in rows], [result["clean"]] + [r[metric] for r in rows], "o-",
                ms=4, label=name)
    ax.axhline(result["clean"], color="grey", ls="--", lw=1)
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel(f"test {metric}")
    ax.set_xticks(range(0, 1 + max((len(r) for r in result["corruptions"].values()), default=0)))
    ax.set_title(f"robustness: mean {metric} drop {result['mean_drop']:.3f}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
