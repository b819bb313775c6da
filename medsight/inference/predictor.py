"""Inference without training or reporting: a checkpoint ready for images, and batch prediction.

Every predictor (PyTorch here, onnxruntime in onnx.py, ensembles in ensemble.py) offers the same
``probabilities(img)``, ``predict(img)`` (the task's record: label and probabilities) and, where a
PyTorch model is behind it, ``heatmap(img, method)``. The CLI, the web app and the REST API use them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from medsight.checkpoint import load_trained
from medsight.config import config_from_dict
from medsight.data.imageio import IMAGE_EXTS
from medsight.data.transforms import display_view, make_transform, to_three_channels
from medsight.errors import MedsightError, InputNotFoundError
from medsight.explainers.cam import border_score, explain
from medsight.inference.tta import tta_views
from medsight.tasks import Task
from medsight.utils.device import resolve_device

__all__ = ["BasePredictor", "Predictor", "collect_images", "eval_transform", "predict_loader", "predict_logits",
           "NoImagesError"]


class NoImagesError(MedsightError, ValueError):
    """Nothing readable to predict on."""


def eval_transform(ckpt: dict[str, Any]) -> Any:
    """A checkpoint's inference preprocessing from its raw dict (a loaded one has :meth:`Trained.transform`)."""
    return make_transform(int(ckpt["image_size"]), ckpt["mean"], ckpt["std"], train=False,
                          cfg=config_from_dict(ckpt["config"]).data)


class BasePredictor:
    """What every predictor shares: the task's record for an image, and batches.

    ``prepare`` is the per-image work (fitting, normalization) and ``probabilities_batch`` runs the model
    once on many prepared images; the server does the first in its request threads and the second in its
    micro-batches. ``probabilities(img)`` is the same two steps for one image, so a batched answer and a
    one-at-a-time answer go through the same code.
    """

    task: Task
    classes: list[str]
    fov: bool = False  # fundus preset: border scores are measured inside the circular field of view

    def prepare(self, img: torch.Tensor) -> Any:
        """One decoded image (float [C, H, W] in [0, 1]) ready to be batched."""
        raise NotImplementedError

    def probabilities_batch(self, prepared: Sequence[Any]) -> np.ndarray:
        """The task's probabilities (N, K) of ``prepared`` images, in one model call."""
        raise NotImplementedError

    def probabilities(self, img: torch.Tensor) -> np.ndarray:
        return self.probabilities_batch([self.prepare(img)])[0]

    def border(self, heatmap: np.ndarray) -> float | None:
        """The heatmap's border (shortcut) score, inside the field of view for fundus images; None when empty."""
        b = float(border_score(torch.from_numpy(np.asarray(heatmap, dtype=np.float32))[None], fov=self.fov)[0])
        return None if np.isnan(b) else b

    def predict(self, img: torch.Tensor) -> dict[str, Any]:
        """The task's answer for one image (label, probabilities, ..., and whether to refer to a clinician when
        the model fitted an abstention threshold)."""
        return self.task.readout.answer(self.probabilities(img))


class Predictor(BasePredictor):
    """A loaded checkpoint ready for single images: preprocessing, probabilities and heatmaps."""

    def __init__(self, checkpoint: str | Path, device: str = "auto") -> None:
        self.device = resolve_device(device)
        trained = load_trained(checkpoint, self.device)
        self.model, self.ckpt, self.task = trained.model, trained.checkpoint, trained.task
        self.classes: list[str] = list(self.task.classes)
        self.image_size: int = trained.image_size
        self.transform = trained.transform()
        self.data_cfg = trained.config.data
        self.fov = self.data_cfg.preset == "fundus"
        self.name = trained.name

    def preprocess(self, img: torch.Tensor) -> torch.Tensor:
        """float [C, H, W] in [0, 1] -> normalized (1, 3, S, S) on the model's device."""
        return self.transform(to_three_channels(img))[None].to(self.device)

    def display(self, img: torch.Tensor, max_side: int = 512) -> np.ndarray:
        """The image framed as the model sees it (fundus crop, pad or crop), at display resolution (up to
        ``max_side``), for drawing: H×W×3 in [0, 1]. ``heatmap`` maps cover it once resized to it."""
        x = display_view(to_three_channels(img), self.image_size, self.data_cfg.resize, self.data_cfg.preset,
                         max_side=max_side)
        return x.permute(1, 2, 0).clamp(0, 1).cpu().numpy()

    def prepare(self, img: torch.Tensor) -> torch.Tensor:
        """float [C, H, W] in [0, 1] -> normalized (3, S, S), on the CPU."""
        return self.transform(to_three_channels(img))

    @torch.no_grad()
    def probabilities_batch(self, prepared: Sequence[torch.Tensor]) -> np.ndarray:
        x = torch.stack(list(prepared)).to(self.device)
        if self.task.rules.tta:  # the run chose test-time augmentation: the mean over its views
            return torch.stack([self.task.probabilities(self.model(v)) for v in tta_views(x)]).mean(0).cpu().numpy()
        return self.task.probabilities(self.model(x)).cpu().numpy()

    def cam_layer(self, target_layer: str | None = None) -> dict[str, Any]:
        """The layer ``heatmap`` reads (``target_layer``, or the default rule's) and how far its maps are
        moved to where its cells look (:func:`medsight.models.cell_offset`, input pixels)."""
        from medsight.models import cam_target, cell_offset

        target = cam_target(self.model, target_layer, img_size=self.image_size)
        x = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
        dy, dx = cell_offset(self.model, target.layer, x)
        return {"target_layer": target.name, "cell_offset_px": [dy, dx]}

    def heatmap(self, img: torch.Tensor, method: str = "gradcam", target_layer: str | None = None,
                class_idx: int | None = None) -> np.ndarray:
        """The map of output ``class_idx`` (default: the task's explained output for this image)."""
        x = self.preprocess(img)
        if class_idx is None:
            with torch.no_grad():
                class_idx = self.task.readout.explained_output(self.task.probabilities(self.model(x))[0].cpu().numpy())
        return explain(self.model, x, method=method, target_layer=target_layer, class_idx=class_idx)[0].cpu().numpy()


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
            raise InputNotFoundError(f"no such image or folder: {p}")
    if not paths:
        raise InputNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


@torch.no_grad()
def predict_loader(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, task: Task,
                   desc: str | None = None, loss_fn: nn.Module | None = None
                   ) -> tuple[np.ndarray, np.ndarray, float, list[str]]:
    """The task's probabilities over a loader: ``(probs, labels, mean loss, skipped files)``."""
    model.eval()
    probs, labels, skipped = [], [], []
    loss_sum, n = 0.0, 0
    for x, y, bad in tqdm(loader, desc=desc, leave=False, disable=desc is None or not sys.stderr.isatty()):
        skipped += bad
        if len(x) == 0:
            continue
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        logits = model(x).float()
        if loss_fn is not None:
            loss_sum += float(loss_fn(logits, y)) * len(y)
        n += len(y)
        probs.append(task.probabilities(logits).cpu().numpy())
        labels.append(y.cpu().numpy())
    if n == 0:
        raise NoImagesError("no readable images to evaluate")
    return np.concatenate(probs), np.concatenate(labels), loss_sum / n, skipped


@torch.no_grad()
def predict_logits(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, tta: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Raw logits over a loader: ``(logits, labels, skipped files)``; logits are (N, K), or (V, N, K) with
    ``tta`` (one slice per view of :data:`medsight.inference.tta.TTA_VIEWS`, the first the plain image).
    Calibration and decisions are fitted from these (see :func:`medsight.evaluation.trust.fit_on_validation`)."""
    model.eval()
    logits, labels, skipped = [], [], []
    for x, y, bad in loader:
        skipped += bad
        if len(x) == 0:
            continue
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        views = tta_views(x) if tta else [x]
        logits.append(torch.stack([model(v).float() for v in views]).cpu().numpy())
        labels.append(y.numpy())
    if not labels:
        raise NoImagesError("no readable images to evaluate")
    out = np.concatenate(logits, axis=1)
    return (out if tta else out[0]), np.concatenate(labels), skipped
