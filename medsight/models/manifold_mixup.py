"""Manifold mixup (Verma et al., ICML 2019): mix the hidden states of two images at a randomly chosen layer
and their labels by the same λ ~ Beta(α, α). timm's ``Mixup`` mixes input images only, hence this module.

The eligible layers are the input and the output of every backbone stage but the last (timm's
``feature_info``; the paper's k ∈ {0, 1, 2} on a pre-activation ResNet). Images are paired with the batch
reversed (timm's Mixup pairs the same way). The chosen layer and λ hold for the whole optimizer step — both
passes of SAM see the same mixed batch — and only act in training mode with gradients on.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.data.mixup import mixup_target
from torch import nn

from medsight.models.errors import ModelError

__all__ = ["ManifoldMixup", "mixing_layers"]


def mixing_layers(model: nn.Module) -> list[str]:
    """The modules whose outputs may be mixed: every stage but the last ("" stands for the input)."""
    stages = [f["module"] for f in getattr(model, "feature_info", []) if isinstance(f, dict) and "module" in f]
    if not stages:  # a model without timm's feature_info: its top-level blocks, in order, before the head
        head = getattr(model, "get_classifier", lambda: None)()
        stages = [n for n, m in model.named_children() if m is not head and any(True for _ in m.parameters())]
    if len(stages) < 2:
        raise ModelError(f"train.manifold_mixup: {type(model).__name__} has no hidden stages to mix")
    return ["", *stages[:-1]]


class ManifoldMixup:
    """Called like timm's Mixup, ``(images, labels) -> (images, soft targets)``: draws λ and a layer, mixes
    the input itself when the layer is the input, else arms a forward hook that mixes that layer's output."""

    def __init__(self, model: nn.Module, alpha: float, num_classes: int, label_smoothing: float = 0.0,
                 seed: int = 0) -> None:
        self.alpha, self.num_classes, self.smoothing = alpha, num_classes, label_smoothing
        self.layers = mixing_layers(model)
        self.rng = np.random.default_rng(seed)
        self.active: str | None = None
        self.lam = 1.0
        self._hooks = [model.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.layers if name]

    def _hook(self, name: str):
        def mix(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if self.active != name or not module.training or not torch.is_grad_enabled():
                return None
            return self.lam * output + (1 - self.lam) * output.flip(0)
        return mix

    def __call__(self, x: torch.Tensor, y: torch.Tensor, layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.lam = float(self.rng.beta(self.alpha, self.alpha))
        self.active = layer if layer is not None else self.layers[int(self.rng.integers(len(self.layers)))]
        target = mixup_target(y, self.num_classes, lam=self.lam, smoothing=self.smoothing)
        if self.active == "":
            return self.lam * x + (1 - self.lam) * x.flip(0), target
        return x, target

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
