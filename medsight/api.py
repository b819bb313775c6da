"""The user-level functions behind the CLI and the web app: evaluate, predict, explain files, sharpness.

Each composes the layers below (data, inference, explainers, reporting, evaluation) and writes files
only where the user asked.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.checkpoint import load_model
from medsight.config import CamMethod, choices, config_from_dict
from medsight.data import (ImageDataset, ImageReadError, label_policy, load_data, load_eval_data, make_loader,
                           read_image)
from medsight.evaluation.sharpness import fixed_batches, sharpness
from medsight.explainers.cam import overlay
from medsight.inference import collect_images, eval_transform, load_predictor, predict_loader
from medsight.reporting.plots import plot_explanation
from medsight.tasks import task_from_checkpoint
from medsight.utils.device import resolve_device
from medsight.utils.files import PRIVATE_DIR, make_private, write_text_atomic

__all__ = ["evaluate", "predict", "explain_files", "checkpoint_sharpness", "OutputExistsError"]


class OutputExistsError(FileExistsError):
    """An output folder that holds results medsight must not overwrite."""


def predict(checkpoint: str | Path, inputs: Sequence[str | Path], device: str = "auto",
            onnx: bool | None = None) -> list[dict[str, Any]]:
    """The task's answer per image (label and probabilities); unreadable files get an ``error`` entry.

    ``onnx`` runs an exported model in onnxruntime (default: when the file name ends in ``.onnx``).
    """
    pred = load_predictor(checkpoint, device, onnx)
    results = []
    for path in collect_images(inputs):
        try:
            rec = pred.predict(read_image(path))
        except ImageReadError as exc:
            results.append({"file": str(path), "error": str(exc)})
            continue
        rec.pop("probability", None)
        results.append({"file": str(path), **rec})
    return results


def _eval_data(ckpt: dict[str, Any], data: str, classes: list[str], kind: str,
               prefer: Sequence[str] = ("test", "all")) -> Any:
    """Images of ``data`` for a checkpoint, read with the run's own multi-label policies."""
    return load_eval_data(data, classes, prefer, multilabel=kind == "multilabel",
                          label_policy=label_policy(config_from_dict(ckpt["config"]).data))


def _check_eval_out(out: Path) -> None:
    if (out / "best.pt").exists() or (out / "last.pt").exists():
        raise OutputExistsError(f"{out} is a run folder; evaluating into it would replace the run's own metrics.json "
                                f"and plots. Give a new folder, e.g. --out {out / 'external'}")
    if (out / "metrics.json").exists():
        raise OutputExistsError(f"{out} already holds a metrics.json; give another --out")


def evaluate(checkpoint: str | Path, data: str, out: str | Path | None = None, device: str = "auto",
             batch_size: int = 128) -> dict[str, Any]:
    """Re-evaluate a trained model on another data set (its test split, or every image if unsplit); the
    decision rule stays the one fitted on the model's own validation data."""
    if out is not None:
        _check_eval_out(Path(out))
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    task = task_from_checkpoint(ckpt)
    split, source = _eval_data(ckpt, data, task.classes, task.kind)
    ds = ImageDataset(split, eval_transform(ckpt))
    probs, labels, _, skipped = predict_loader(model, make_loader(ds, batch_size, False, 0), dev, task, desc="evaluate")
    metrics = task.metrics(labels, probs, n_boot=1000)
    result = {"checkpoint": str(checkpoint), "data": source, "task": task.kind, "test": metrics, "skipped_files": skipped}
    if out is not None:
        out = Path(out)
        out.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        result["figures"] = task.figures(out, {Path(source).name: (labels, probs)}, metrics, title=f"{source}")
        write_text_atomic(json.dumps(result, indent=2), out / "metrics.json")
        make_private(out, only=["metrics.json", *result["figures"]])  # like run files: owner-only
    return result


def explain_files(checkpoint: str | Path, inputs: Sequence[str | Path], out: str | Path, method: str = "gradcam",
                  target_layer: str | None = None, class_idx: int | None = None, compare: bool = False,
                  device: str = "auto") -> list[dict[str, Any]]:
    """Per image: an overlay PNG (original beside heatmap, decision and probability in the title) and one
    JSON line in ``out/explanations.jsonl``. ``compare`` draws every method side by side."""
    pred = load_predictor(checkpoint, device, onnx=False)
    if class_idx is not None and not 0 <= class_idx < len(pred.classes):
        raise ValueError(f"class index {class_idx} is out of range: the model has {len(pred.classes)} classes "
                         f"({', '.join(f'{i}={c}' for i, c in enumerate(pred.classes))})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(choices(CamMethod)) if compare else [method]
    lines, results = [], []
    for path in collect_images(inputs):
        try:
            img = read_image(path)
        except ImageReadError as exc:
            rec = {"file": str(path), "error": str(exc)}
            results.append(rec)
            lines.append(json.dumps(rec))
            continue
        probs = pred.probabilities(img)
        record = pred.task.record(probs)
        target = class_idx if class_idx is not None else pred.task.explained_output(probs)
        disp = pred.display(img)
        overlays, borders = {}, {}
        for m in methods:
            heat = pred.heatmap(img, m, target_layer, target)
            overlays[m] = overlay(disp, heat)
            borders[m] = pred.border(heat)  # None: an empty map; inside the field of view for fundus images
        png = out / f"{path.stem}_{'compare' if compare else method.replace('+', 'p')}.png"
        plot_explanation(disp, overlays, f"{path.name}: predicted {record['label']} ({record['probability']:.3f})"
                         f" · explaining '{pred.classes[target]}'", png)
        rec = {"file": str(path), **record, "explained_class": pred.classes[target], "methods": methods,
               "border_score": borders, "overlay": str(png)}
        results.append(rec)
        lines.append(json.dumps(rec))
    write_text_atomic("\n".join(lines) + "\n", out / "explanations.jsonl")
    return results


def checkpoint_sharpness(checkpoint: str | Path, data: str | None = None, rho: float = 0.05, n_batches: int = 4,
                         device: str = "auto", seed: int = 0, write: bool = True) -> dict[str, Any]:
    """ρ-sharpness of a checkpoint on fixed batches of its training images (or of ``data``).

    With ``write``, the result is added under ``"sharpness"`` to the metrics.json beside the checkpoint.
    """
    if not rho > 0:
        raise ValueError(f"--rho must be > 0, got {rho}")
    if n_batches < 1:
        raise ValueError(f"--batches must be >= 1, got {n_batches}")
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    task = task_from_checkpoint(ckpt)
    if data is None:
        bundle = load_data(config_from_dict(ckpt["config"]).data)
        split, source = bundle.splits["train"], bundle.source
    else:
        split, source = _eval_data(ckpt, data, task.classes, task.kind, prefer=("train", "all", "val", "test"))
    ds = ImageDataset(split, eval_transform(ckpt))
    result = sharpness(model, fixed_batches(ds, n_batches, seed=seed), rho=rho, loss_fn=task.eval_loss(), seed=seed)
    result["data"] = source
    metrics_path = Path(checkpoint).parent / "metrics.json"
    if write and metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        metrics["sharpness"] = {k: v for k, v in result.items() if k != "written"}
        write_text_atomic(json.dumps(metrics, indent=2), metrics_path)
        result["written"] = str(metrics_path)
    return result
