"""The user-level functions behind the CLI and the web app: evaluate, predict, explain files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsight.checkpoint import load_model, write_text_atomic
from medsight.data import (ImageDataset, load_eval_data, make_loader, make_transform, to_three_channels)
from medsight.explain import EXPLAINERS, border_score, explain, overlay
from medsight.imageio import IMAGE_EXTS, ImageReadError, read_image
from medsight.metrics import classification_metrics
from medsight.plots import plot_confusion, plot_explanation, plot_roc
from medsight.train import predict_proba, resolve_device

__all__ = ["Predictor", "load_predictor", "evaluate", "predict", "explain_files", "collect_images", "checkpoint_sharpness"]


def eval_transform(ckpt: dict[str, Any]) -> Any:
    """A checkpoint's inference preprocessing: its input size, normalization and data options (e.g. CLAHE)."""
    from medsight.config import config_from_dict

    return make_transform(int(ckpt["image_size"]), ckpt["mean"], ckpt["std"], train=False,
                          cfg=config_from_dict(ckpt["config"]).data)


class Predictor:
    """A loaded checkpoint ready for single images: preprocessing, probabilities and heatmaps."""

    def __init__(self, checkpoint: str | Path, device: str = "auto") -> None:
        self.device = resolve_device(device)
        self.model, self.ckpt = load_model(checkpoint, self.device)
        self.classes: list[str] = list(self.ckpt["classes"])
        self.image_size: int = int(self.ckpt["image_size"])
        self.transform = eval_transform(self.ckpt)
        self.name = self.ckpt["config"]["model"]["name"]

    def preprocess(self, img: torch.Tensor) -> torch.Tensor:
        """float [C, H, W] in [0, 1] -> normalized (1, 3, S, S) on the model's device."""
        return self.transform(to_three_channels(img))[None].to(self.device)

    def display(self, img: torch.Tensor) -> np.ndarray:
        """The image as the model sees it (resized), for drawing: H×W×3 in [0, 1]."""
        x = torch.nn.functional.interpolate(to_three_channels(img)[None], size=(self.image_size,) * 2,
                                            mode="bilinear", antialias=True, align_corners=False)[0]
        return x.permute(1, 2, 0).clamp(0, 1).cpu().numpy()

    @torch.no_grad()
    def probabilities(self, img: torch.Tensor) -> np.ndarray:
        return torch.softmax(self.model(self.preprocess(img)).float(), 1)[0].cpu().numpy()

    def heatmap(self, img: torch.Tensor, method: str = "gradcam", target_layer: str | None = None,
                class_idx: int | None = None) -> np.ndarray:
        return explain(self.model, self.preprocess(img), method=method, target_layer=target_layer,
                       class_idx=class_idx)[0].cpu().numpy()


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into image paths; a missing path is an error."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p}")
    if not paths:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


def load_predictor(checkpoint: str | Path, device: str = "auto", onnx: bool | None = None) -> Any:
    """A :class:`Predictor` for a checkpoint, an onnxruntime predictor for an exported ``.onnx`` file, or
    an :class:`~medsight.ensemble.EnsemblePredictor` for an ``ensemble.json``."""
    if onnx or (onnx is None and str(checkpoint).endswith(".onnx")):
        from medsight.export import OnnxPredictor

        return OnnxPredictor(checkpoint)
    if str(checkpoint).endswith(".json"):
        from medsight.ensemble import EnsemblePredictor

        return EnsemblePredictor(checkpoint, device)
    return Predictor(checkpoint, device)


def predict(checkpoint: str | Path, inputs: Sequence[str | Path], device: str = "auto",
            onnx: bool | None = None) -> list[dict[str, Any]]:
    """Class probabilities per image; unreadable files get an ``error`` entry instead.

    ``onnx`` runs an exported model in onnxruntime (default: when the file name ends in ``.onnx``).
    """
    pred = load_predictor(checkpoint, device, onnx)
    results = []
    for path in collect_images(inputs):
        try:
            p = pred.probabilities(read_image(path))
        except ImageReadError as exc:
            results.append({"file": str(path), "error": str(exc)})
            continue
        results.append({"file": str(path), "label": pred.classes[int(p.argmax())],
                        "probabilities": {c: float(v) for c, v in zip(pred.classes, p)}})
    return results


def evaluate(checkpoint: str | Path, data: str, out: str | Path | None = None, device: str = "auto",
             batch_size: int = 128) -> dict[str, Any]:
    """Re-evaluate a trained model on another data set (its test split, or every image if unsplit)."""
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    classes = list(ckpt["classes"])
    split, source = load_eval_data(data, classes)
    ds = ImageDataset(split, eval_transform(ckpt))
    probs, labels, _, skipped = predict_proba(model, make_loader(ds, batch_size, False, 0), dev, desc="evaluate")
    threshold = ckpt.get("threshold")
    metrics = classification_metrics(labels, probs, classes, n_boot=1000, threshold=threshold)
    result = {"checkpoint": str(checkpoint), "data": source, "test": metrics, "skipped_files": skipped}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json.dumps(result, indent=2), out / "metrics.json")
        plot_confusion(metrics["confusion_matrix"], classes, out / "confusion_matrix.png", title=f"confusion ({source})")
        plot_roc({Path(source).name: (labels, probs)}, classes, out / "roc.png")
    return result


def explain_files(checkpoint: str | Path, inputs: Sequence[str | Path], out: str | Path, method: str = "gradcam",
                  target_layer: str | None = None, class_idx: int | None = None, compare: bool = False,
                  device: str = "auto") -> list[dict[str, Any]]:
    """Per image: an overlay PNG (original beside heatmap, predicted class and probability in the title)
    and one JSON line in ``out/explanations.jsonl``. ``compare`` draws every method side by side."""
    pred = load_predictor(checkpoint, device, onnx=False)
    if class_idx is not None and not 0 <= class_idx < len(pred.classes):
        raise ValueError(f"class index {class_idx} is out of range: the model has {len(pred.classes)} classes "
                         f"({', '.join(f'{i}={c}' for i, c in enumerate(pred.classes))})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(EXPLAINERS) if compare else [method]
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
        label = int(probs.argmax())
        disp = pred.display(img)
        overlays, borders = {}, {}
        for m in methods:
            heat = pred.heatmap(img, m, target_layer, class_idx)
            overlays[m] = overlay(disp, heat)
            b = float(border_score(torch.from_numpy(heat)[None])[0])
            borders[m] = None if np.isnan(b) else b  # None: an empty map
        target = pred.classes[class_idx] if class_idx is not None else pred.classes[label]
        png = out / f"{path.stem}_{'compare' if compare else method.replace('+', 'p')}.png"
        plot_explanation(disp, overlays, f"{path.name}: predicted {pred.classes[label]} ({probs[label]:.3f})"
                         f" · explaining '{target}'", png)
        rec = {"file": str(path), "label": pred.classes[label], "probability": float(probs[label]),
               "probabilities": {c: float(v) for c, v in zip(pred.classes, probs)}, "explained_class": target,
               "methods": methods, "border_score": borders, "overlay": str(png)}
        results.append(rec)
        lines.append(json.dumps(rec))
    write_text_atomic("\n".join(lines) + "\n", out / "explanations.jsonl")
    return results


def checkpoint_sharpness(checkpoint: str | Path, data: str | None = None, rho: float = 0.05, n_batches: int = 4,
                         device: str = "auto", seed: int = 0, write: bool = True) -> dict[str, Any]:
    """ρ-sharpness of a checkpoint on fixed batches of its training images (or of ``data``).

    With ``write``, the result is added under ``"sharpness"`` to the metrics.json beside the checkpoint.
    """
    from medsight.config import config_from_dict
    from medsight.data import load_data
    from medsight.sharpness import fixed_batches, sharpness

    if not rho > 0:
        raise ValueError(f"--rho must be > 0, got {rho}")
    if n_batches < 1:
        raise ValueError(f"--batches must be >= 1, got {n_batches}")
    dev = resolve_device(device)
    model, ckpt = load_model(checkpoint, dev)
    classes = list(ckpt["classes"])
    if data is None:
        cfg = config_from_dict(ckpt["config"])
        bundle = load_data(cfg.data)
        split, source = bundle.splits["train"], bundle.source
    else:
        split, source = load_eval_data(data, classes, prefer=("train", "all", "val", "test"))
    ds = ImageDataset(split, eval_transform(ckpt))
    result = sharpness(model, fixed_batches(ds, n_batches, seed=seed), rho=rho, seed=seed)
    result["data"] = source
    metrics_path = Path(checkpoint).parent / "metrics.json"
    if write and metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        metrics["sharpness"] = {k: v for k, v in result.items() if k != "written"}
        write_text_atomic(json.dumps(metrics, indent=2), metrics_path)
        result["written"] = str(metrics_path)
    return result
