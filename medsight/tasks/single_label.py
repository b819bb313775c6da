"""Single-label classification: one class per image, softmax, argmax (binary: plus a validation threshold)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from sklearn.metrics import balanced_accuracy_score
from torch import nn

from medsight.errors import MedsightError
from medsight.losses import ClassificationLoss, EvidentialLoss, ExpectedNLL, class_weights
from medsight.metrics import auc_score, checklist, choose_threshold, classification_metrics, format_ci
from medsight.models.heads import EvidentialProbabilities, evidential_probabilities
from medsight.tasks.base import GalleryGroup, Task, correct_and_wrong_groups

if TYPE_CHECKING:
    from medsight.config import Config

__all__ = ["SingleLabelTask", "TaskConfigError"]


class TaskConfigError(MedsightError, ValueError):
    """Options that do not fit the task or its data (e.g. focal alphas for another class count)."""


class SingleLabelTask(Task):
    """K mutually exclusive classes. The decision is the most probable class; for two classes the
    Youden-optimal threshold on validation is kept too, and reported as accuracy at that threshold."""

    kind = "single_label"

    @classmethod
    def options_from(cls, cfg: Config) -> dict[str, Any]:
        return {"head": "evidential"} if cfg.train.head == "evidential" else {}

    @property
    def evidential(self) -> bool:
        """A Dirichlet head (train.head=evidential): probabilities α/S, confidence 1 − u (medsight.models.heads)."""
        return self.options.get("head") == "evidential"

    @property
    def threshold(self) -> float | None:
        return self.decision.get("threshold")

    @property
    def calibratable(self) -> bool:
        return not self.evidential  # a temperature would rescale the evidence, and with it u

    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return evidential_probabilities(logits) if self.evidential else torch.softmax(logits.float(), 1)

    def activation_module(self) -> nn.Module:
        return EvidentialProbabilities() if self.evidential else nn.Softmax(dim=1)

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """Max probability; for the evidential head 1 − u = 1 − K·min_k p_k (Sensoy et al.'s uncertainty)."""
        p = np.asarray(probs, dtype=np.float64)
        return 1 - np.clip(p.shape[1] * p.min(1), 0, 1) if self.evidential else p.max(1)

    def make_loss(self, cfg: Config, train_labels: np.ndarray) -> nn.Module:
        t, k = cfg.train, len(self.classes)
        counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=k)
        weight = class_weights(counts, t.class_weight_mode, t.class_weight_beta) if t.class_weights else None
        if self.evidential:
            return EvidentialLoss(k, t.evidential_anneal_epochs, weight)
        alpha = None
        if t.loss == "focal" and t.focal_alpha is not None:
            if len(t.focal_alpha) != k:
                raise TaskConfigError(f"train.focal_alpha has {len(t.focal_alpha)} values but the data has {k} classes")
            alpha = torch.tensor(t.focal_alpha, dtype=torch.float32)
        smoothing = 0.0 if (t.mixup or t.cutmix) else t.label_smoothing  # timm's Mixup smooths mixed targets
        return ClassificationLoss(gamma=t.focal_gamma if t.loss == "focal" else 0.0, weight=weight,
                                  label_smoothing=smoothing, alpha=alpha)

    def eval_loss(self) -> nn.Module:
        return ExpectedNLL() if self.evidential else nn.CrossEntropyLoss()

    def batch_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(1) == labels).sum()

    def fit_decision(self, val_labels: np.ndarray, val_probs: np.ndarray) -> None:
        self.decision.pop("threshold", None)
        if len(self.classes) == 2 and len(np.unique(val_labels)) == 2:
            self.decision["threshold"] = float(choose_threshold(val_labels == 1, val_probs[:, 1]))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        return np.asarray(probs).argmax(1)

    def metrics(self, labels: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        return classification_metrics(labels, probs, self.classes, n_boot=n_boot, seed=seed, threshold=self.threshold)

    def epoch_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        pred = self.decide(probs)
        return {"acc": float((pred == labels).mean()), "accuracy": float((pred == labels).mean()),
                "auc": auc_score(labels, probs), "balanced_accuracy": float(balanced_accuracy_score(labels, pred))}

    def summary(self, m: dict[str, Any]) -> str:
        ci = m.get("ci95", {})
        acc_ci, auc_ci = ci.get("accuracy"), ci.get("auc")
        auc = "n/a" if m["auc"] is None else f"{m['auc']:.4f}" + (f" {format_ci(auc_ci)}" if auc_ci else "")
        line = (f"accuracy {m['accuracy']:.4f}" + (f" {format_ci(acc_ci)}" if acc_ci else "")
                + f" · balanced {m['balanced_accuracy']:.4f} · AUC {auc} · ECE {m['ece']:.4f}")
        if "accuracy_at_threshold" in m:
            line += f"\n  accuracy {m['accuracy_at_threshold']:.4f} at the threshold chosen on val ({m['threshold']:.3f})"
        return line

    def checklist(self, m: dict[str, Any], thresholds: dict[str, float | None]) -> dict[str, Any] | None:
        return checklist(m, **{k: thresholds.get(k) for k in ("min_accuracy", "min_auc", "min_recall", "max_ece")})

    def report_tables(self, metrics: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
        test, val = metrics["test"], metrics.get("val", {})
        rows = []
        for key in ("accuracy", "balanced_accuracy", "auc", "ece", "accuracy_at_threshold"):
            if key in test:
                ci = test.get("ci95", {}).get(key)
                rows.append([key, val.get(key), test[key], format_ci(ci)])
        per_class = [[c] + [m[k] for k in ("precision", "recall", "specificity", "f1", "support")]
                     for c, m in test["per_class"].items()]
        return [("Metrics", ["metric", "val", "test", "95% CI"], rows),
                ("Per class (test)", ["class", "precision", "recall", "specificity", "F1", "support"], per_class)]

    def gallery_groups(self, labels: np.ndarray, probs: np.ndarray, per_group: int,
                       rng: np.random.Generator) -> list[GalleryGroup]:
        return correct_and_wrong_groups(self.classes, labels, self.decide(probs), per_group, rng, "misclassified",
                                        "{name}")

    def record(self, probs: np.ndarray) -> dict[str, Any]:
        label = int(self.decide(probs[None])[0])
        rec = {"label": self.classes[label], "probability": float(probs[label]),
               "probabilities": {c: float(v) for c, v in zip(self.classes, probs)}}
        if self.evidential:
            rec["uncertainty"] = float(1 - self.confidence(np.asarray(probs)[None])[0])
        return rec

    @staticmethod
    def cam_target(index: int) -> ClassifierOutputTarget:
        return ClassifierOutputTarget(index)
