"""An ``ensemble.json`` used like a checkpoint: the members' probabilities through the fitted combiner."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsight.errors import MedsightError
from medsight.inference.predictor import BasePredictor, Predictor
from medsight.tasks import fresh_task, task_from_state

__all__ = ["EnsemblePredictor", "combine", "features", "EnsembleFileError"]


class EnsembleFileError(MedsightError, ValueError):
    """An ensemble file that cannot be used."""


def features(probs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(probs, axis=1)



def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def combine(method: str, combiner: dict[str, Any], probs: list[np.ndarray], k: int) -> np.ndarray:
    """Apply a fitted combiner to member probabilities (each N×k); returns N×k probabilities."""
    if method in ("soft", "weighted"):
        return sum(w * p for w, p in zip(combiner["weights"], probs))
    if method == "stacking" and combiner.get("meta") == "logistic_per_finding":  # multi-label, per finding
        out = np.mean(probs, axis=0)
        for j, (w, b) in enumerate(zip(combiner["coef"], combiner["intercept"])):
            if w is not None:
                z = np.stack([p[:, j] for p in probs], 1) @ np.array(w) + b
                out[:, j] = 1 / (1 + np.exp(-z))
        return out
    x = features(probs)
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
    raise EnsembleFileError(f"unknown ensemble method {method!r}")


def _check_spec(spec: Any, p: Path) -> None:
    """The entries every command reads, with their types: a hand-edited file fails here, by name."""
    if not isinstance(spec, dict):
        raise EnsembleFileError(f"{p} is not a medsight ensemble file: it holds a JSON {type(spec).__name__}, "
                                f"not a mapping with format, method, members, classes and combiner")
    if spec.get("format") != "medsight-ensemble-1":
        raise EnsembleFileError(f"{p} is not a medsight ensemble file (no 'format': 'medsight-ensemble-1')")
    members = spec.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) and m for m in members):
        raise EnsembleFileError(f"{p}: 'members' must be a non-empty list of checkpoint paths, got {members!r}")
    classes = spec.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise EnsembleFileError(f"{p}: 'classes' must be a list of at least two class names, got {classes!r}")
    if not isinstance(spec.get("method"), str):
        raise EnsembleFileError(f"{p} lacks the ensemble 'method' (soft, weighted, stacking or ovo)")
    if not isinstance(spec.get("combiner"), dict):
        raise EnsembleFileError(f"{p}: 'combiner' must be a mapping of the fitted weights or coefficients")


class EnsemblePredictor(BasePredictor):
    """An ``ensemble.json`` used like a checkpoint: combined probabilities, mean of members' heatmaps."""

    def __init__(self, path: str | Path, device: str = "auto") -> None:
        p = Path(path)
        try:
            spec = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EnsembleFileError(f"{p} is not a readable ensemble file (JSON): {exc}") from None
        _check_spec(spec, p)
        self.spec = spec
        self.members = [Predictor(m, device) for m in spec["members"]]
        self.classes: list[str] = spec["classes"]
        if any(m.classes != self.classes for m in self.members):
            raise EnsembleFileError(f"{p}: a member's classes differ from the ensemble's {self.classes}")
        self.task = task_from_state(spec["task"]) if isinstance(spec.get("task"), dict) else \
            fresh_task(self.members[0].task)
        self.image_size = self.members[0].image_size
        self.name = f"{spec['method']} ensemble of {', '.join(m.name for m in self.members)}"

    def prepare(self, img: torch.Tensor) -> list[torch.Tensor]:
        return [m.prepare(img) for m in self.members]  # members may differ in input size and preprocessing

    def probabilities_batch(self, prepared: Sequence[list[torch.Tensor]]) -> np.ndarray:
        probs = [m.probabilities_batch([p[i] for p in prepared]) for i, m in enumerate(self.members)]
        return combine(self.spec["method"], self.spec["combiner"], probs, len(self.classes))

    def display(self, img: torch.Tensor) -> np.ndarray:
        return self.members[0].display(img)

    def heatmap(self, img: torch.Tensor, method: str = "gradcam", target_layer: str | None = None,
                class_idx: int | None = None) -> np.ndarray:
        """Mean of the members' maps (each resized to the first member's input size) for one class."""
        if class_idx is None:
            class_idx = self.task.readout.explained_output(self.probabilities(img))
        size = (self.image_size, self.image_size)
        maps = []
        for m in self.members:
            h = torch.from_numpy(m.heatmap(img, method, target_layer if m is self.members[0] else None, class_idx))
            maps.append(torch.nn.functional.interpolate(h[None, None], size=size, mode="bilinear",
                                                        align_corners=False)[0, 0])
        mean = torch.stack(maps).mean(0)
        lo, hi = mean.min(), mean.max()
        return ((mean - lo) / (hi - lo) if hi > lo else torch.zeros_like(mean)).numpy()
