"""Heads: how one output layer is read and trained. Each is a small strategy object, chosen once from the
task's options, so that no method of a task switches on the head.

A head owns the activation (logits -> probabilities), the training and validation losses, the one decoder
from probabilities to decisions (used on numpy arrays by :meth:`medsight.tasks.Task.decide` and on device
tensors by :meth:`Head.correct` in the training loop), and how a temperature is fitted to it. A new head is a
subclass here (or in its task's module), returned by that task's ``head`` rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medsight.errors import MedsightError
from medsight.losses import (AsymmetricLoss, BinaryFocal, ClassificationLoss, CornLoss, CornProbabilities,
                             DistanceSmoothedCE, EvidentialLoss, ExpectedGradeMSE, ExpectedNLL, MaskedBCE,
                             RegressionProbabilities, class_weights, positive_weights)
from medsight.losses.ordinal import corn_probabilities, regression_probabilities
from medsight.metrics.calibration import fit_temperature
from medsight.metrics.ordinal import fit_cutpoints
from medsight.models.heads import EvidentialProbabilities, evidential_probabilities

if TYPE_CHECKING:
    from medsight.config import Config
    from medsight.tasks.rules import FittedRules

__all__ = ["Head", "Softmax", "Evidential", "Sigmoid", "GradeHead", "OrdinalSoftmax", "DistanceSmoothed", "Corn", "Regression",
           "TaskConfigError"]


class TaskConfigError(MedsightError, ValueError):
    """Options that do not fit the task, its head or its data (e.g. focal alphas for another class count)."""


def _weights(cfg: Config, labels: np.ndarray, k: int) -> torch.Tensor | None:
    """Class weights from the training labels' counts, when ``train.class_weights`` asks for them."""
    t = cfg.train
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)
    return class_weights(counts, t.class_weight_mode, t.class_weight_beta) if t.class_weights else None


def _smoothing(cfg: Config) -> float:
    t = cfg.train
    return 0.0 if (t.mixup or t.cutmix) else t.label_smoothing  # timm's Mixup smooths mixed targets itself


def mean_grade(probs: np.ndarray) -> np.ndarray:
    """The expected grade per image, Σ_k k · p_k (float64)."""
    p = np.asarray(probs, dtype=np.float64)
    return p @ np.arange(p.shape[1], dtype=np.float64)


def _focal_gamma(cfg: Config) -> float:
    return cfg.train.focal_gamma if cfg.train.loss == "focal" else 0.0


class Head:
    """K mutually exclusive outputs read with softmax and decided by the most probable one (the base rule)."""

    name = "softmax"
    #: temperature scaling keeps this head's decisions (CORN's median grade, cut-points and evidence would move)
    calibratable = True

    def __init__(self, k: int) -> None:
        self.k = k

    @property
    def num_outputs(self) -> int:
        """Width of the model's last layer: one output per class, grade or finding."""
        return self.k

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), 1)

    def activation_module(self) -> nn.Module:
        return nn.Softmax(dim=1)

    def loss(self, cfg: Config, train_labels: np.ndarray) -> nn.Module:
        return ClassificationLoss(gamma=_focal_gamma(cfg), weight=_weights(cfg, train_labels, self.k),
                                  label_smoothing=_smoothing(cfg), alpha=self.focal_alpha(cfg))

    def focal_alpha(self, cfg: Config) -> torch.Tensor | None:
        """Per-class focal weights for the loss (none for grades: their classes are ordered, not weighed)."""
        return None

    def eval_loss(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def logit_offset(self, cfg: Config, train_labels: np.ndarray) -> list[float] | None:
        """The shift the training loss puts into the logits, which calibration undoes (None: none)."""
        return None

    def decode(self, probs: torch.Tensor, rules: FittedRules) -> torch.Tensor:
        """Probabilities (N, K) -> decisions: the one decoder, for numpy callers and the training loop alike."""
        return probs.argmax(1)

    def correct(self, logits: torch.Tensor, labels: torch.Tensor, rules: FittedRules) -> torch.Tensor:
        """Correct decisions in a training batch (a device tensor: no host sync)."""
        return (self.decode(self.activation(logits.detach()), rules) == labels).sum()

    def nll(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of the true labels under :meth:`activation` of (scaled) logits."""
        p = self.activation(logits).clamp_min(1e-12)
        return -p.gather(1, labels.long()[:, None]).log().mean()

    def fit_temperature(self, logits: np.ndarray, labels: np.ndarray, classes: list[str],
                        offset: list[float] | None) -> tuple[float | list[float] | None, list[str]]:
        """Temperature scaling (Guo et al. 2017) on validation logits: (temperature or None, outputs not fitted)."""
        if self.calibratable and len(np.unique(labels)) > 1:
            return fit_temperature(logits, labels, self.nll), []
        return None, []


class Softmax(Head):
    """Single-label classes: cross-entropy or focal loss, with per-class focal alphas when given."""

    def focal_alpha(self, cfg: Config) -> torch.Tensor | None:
        t = cfg.train
        if t.loss != "focal" or t.focal_alpha is None:
            return None
        if len(t.focal_alpha) != self.k:
            raise TaskConfigError(f"train.focal_alpha has {len(t.focal_alpha)} values but the data has "
                                  f"{self.k} classes")
        return torch.tensor(t.focal_alpha, dtype=torch.float32)

    def correct(self, logits: torch.Tensor, labels: torch.Tensor, rules: FittedRules) -> torch.Tensor:
        return (logits.argmax(1) == labels).sum()  # the most probable class, without the activation's cost


class Evidential(Softmax):
    """Dirichlet outputs (Sensoy et al. 2018, train.head=evidential): probabilities α/S, evidence loss."""

    name = "evidential"
    calibratable = False  # a temperature would rescale the evidence, and with it the uncertainty u

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return evidential_probabilities(logits)

    def activation_module(self) -> nn.Module:
        return EvidentialProbabilities()

    def loss(self, cfg: Config, train_labels: np.ndarray) -> nn.Module:
        return EvidentialLoss(self.k, cfg.train.evidential_anneal_epochs, _weights(cfg, train_labels, self.k))

    def eval_loss(self) -> nn.Module:
        return ExpectedNLL()


class GradeHead(Head):
    """A head for ordered grades: besides decoding, it scores the screening question (is the grade ≥ the
    referable one?) and may fit decision parameters of its own on validation."""

    name = "ce"  # plain cross-entropy (``train.ordinal=ce``); decision: the most probable grade

    def refer_scores(self, probs: np.ndarray, refer_index: int) -> np.ndarray:
        """P(grade ≥ the referable grade) per image."""
        return np.asarray(probs, dtype=np.float64)[:, refer_index:].sum(1)

    def fit(self, labels: np.ndarray, probs: np.ndarray, rules: FittedRules) -> None:
        """Fit this head's own decision parameters into ``rules`` on validation data (none by default)."""

    def described(self, rules: FittedRules) -> dict[str, Any]:
        """What the metrics report about the head's fitted parameters."""
        return {}


OrdinalSoftmax = GradeHead


class DistanceSmoothed(GradeHead):
    """Grades with distance-aware label smoothing (``train.ordinal=smooth``); the most probable grade."""

    name = "smooth"

    def __init__(self, k: int, smoothing: float) -> None:
        super().__init__(k)
        self.smoothing = smoothing

    def loss(self, cfg: Config, train_labels: np.ndarray) -> nn.Module:
        return DistanceSmoothedCE(self.smoothing, _weights(cfg, train_labels, self.k))


class _Declared(GradeHead):
    """A grade head whose activation function, activation module and (class-weighted) loss are declared."""

    calibratable = False
    probabilities: Callable[[torch.Tensor], torch.Tensor]
    probabilities_module: type[nn.Module]
    loss_type: type[nn.Module]

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return type(self).probabilities(logits)

    def activation_module(self) -> nn.Module:
        return self.probabilities_module()

    def loss(self, cfg: Config, train_labels: np.ndarray) -> nn.Module:
        return self.loss_type(_weights(cfg, train_labels, self.k))

    def eval_loss(self) -> nn.Module:
        return self.loss_type()


class Corn(_Declared):
    """CORN's conditional binary outputs (``train.ordinal=corn``); decision: the median grade."""

    name, loss_type = "corn", CornLoss
    probabilities, probabilities_module = staticmethod(corn_probabilities), CornProbabilities

    def decode(self, probs: torch.Tensor, rules: FittedRules) -> torch.Tensor:
        """The median grade: P(y > j) > 0.5 for every grade j below it."""
        return ((1 - probs.cumsum(1)[:, :-1]) > 0.5).sum(1)


class Regression(_Declared):
    """The expected grade's squared error (``train.ordinal=regression``); decision: the score cut at the
    cut-points fitted on validation (k + 0.5 until then)."""

    name, loss_type = "regression", ExpectedGradeMSE
    probabilities, probabilities_module = staticmethod(regression_probabilities), RegressionProbabilities

    def cutpoints(self, rules: FittedRules) -> list[float]:
        return list(rules.cutpoints or (np.arange(self.k - 1) + 0.5).tolist())

    def refer_scores(self, probs: np.ndarray, refer_index: int) -> np.ndarray:
        """The expected grade / (K − 1): the regression head's one score."""
        return mean_grade(probs) / (self.k - 1)

    def fit(self, labels: np.ndarray, probs: np.ndarray, rules: FittedRules) -> None:
        """Cut-points maximizing validation kappa (the "optimized rounder")."""
        if len(np.unique(labels)) > 1:
            rules.cutpoints = fit_cutpoints(labels, mean_grade(probs), self.k)

    def described(self, rules: FittedRules) -> dict[str, Any]:
        return {"cutpoints": self.cutpoints(rules)}

    def decode(self, probs: torch.Tensor, rules: FittedRules) -> torch.Tensor:
        expected = probs @ torch.arange(self.k, device=probs.device, dtype=probs.dtype)
        cuts = torch.tensor(self.cutpoints(rules), device=probs.device, dtype=probs.dtype)
        return (expected[:, None] > cuts[None, :]).sum(1)


def _bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class Sigmoid(Head):
    """Multi-label findings: a sigmoid per finding, masked labels (-1) left out; decision: each finding's
    threshold (0.5 until fitted). See :mod:`medsight.tasks.multilabel` for the losses and the logit offset."""

    name = "sigmoid"

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def activation_module(self) -> nn.Module:
        return nn.Sigmoid()

    def _check(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.shape[1] != self.k:
            raise TaskConfigError(f"data.task=multilabel needs one label column per finding ({self.k}); "
                                  f"the training labels have shape {labels.shape}")
        return labels

    def loss(self, cfg: Config, train_labels: np.ndarray) -> nn.Module:
        t, labels = cfg.train, self._check(train_labels)
        if t.loss == "asl":
            return AsymmetricLoss(t.asl_gamma_neg, t.asl_gamma_pos, t.asl_clip, label_smoothing=t.label_smoothing)
        if t.loss == "focal":
            alpha = None
            if t.focal_alpha is not None:
                if len(t.focal_alpha) != 1 or not 0 < t.focal_alpha[0] < 1:
                    raise TaskConfigError("multi-label focal loss takes one train.focal_alpha in (0, 1): the weight "
                                          "of positives (e.g. [0.25])")
                alpha = float(t.focal_alpha[0])
            return BinaryFocal(t.focal_gamma, alpha, label_smoothing=t.label_smoothing)
        return MaskedBCE(positive_weights(labels) if t.class_weights else None, label_smoothing=t.label_smoothing)

    def logit_offset(self, cfg: Config, train_labels: np.ndarray) -> list[float] | None:
        """BCE with positive weights w is minimized by logit(p) + log w: calibration subtracts log w first."""
        t = cfg.train
        if t.loss in ("asl", "focal") or not t.class_weights:
            return None
        return positive_weights(self._check(train_labels)).log().tolist()

    def eval_loss(self) -> nn.Module:
        return MaskedBCE()

    def decode(self, probs: torch.Tensor, rules: FittedRules) -> torch.Tensor:
        t = rules.thresholds or [0.5] * self.k
        return (probs >= torch.as_tensor(t, dtype=torch.float64, device=probs.device)[None, :]).to(torch.int64)

    def correct(self, logits: torch.Tensor, labels: torch.Tensor, rules: FittedRules) -> torch.Tensor:
        """Images whose every unmasked finding is decided right at 0.5 (exact match)."""
        decided = (logits.detach() >= 0).to(labels.dtype)
        return ((decided == labels) | (labels < 0)).all(1).sum()

    def fit_temperature(self, logits: np.ndarray, labels: np.ndarray, classes: list[str],
                        offset: list[float] | None) -> tuple[float | list[float] | None, list[str]]:
        """One temperature per finding on its labelled validation images (after subtracting the logit offset); a
        finding whose validation labels hold one answer keeps 1.0 (its NLL would push T to the bound)."""
        z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels)
        if offset is not None:
            z = z - np.asarray(offset, dtype=np.float64)[None, :]
        temps, skipped = [], []
        for k, name in enumerate(classes):
            keep = y[:, k] >= 0
            if len(np.unique(y[keep, k])) < 2:
                temps.append(1.0)
                skipped.append(name)
            else:
                temps.append(fit_temperature(z[keep, k], y[keep, k].astype(np.float64), _bce))
        return temps, skipped
