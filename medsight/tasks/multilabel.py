"""Multi-label findings: any number of K findings per image (effusion *and* cardiomegaly; none = "No Finding").

A sigmoid per finding. Loss (``train.loss``): ``bce`` (also what ``ce`` means here) with per-finding
positive weights when ``train.class_weights``, ``focal`` in its binary form, or ``asl`` (asymmetric loss,
Ridnik et al. 2021). Labels are (N, K) with -1 where masked (uncertain or blank under the "ignore"
policy): masked labels are left out of the loss and of that finding's metrics.

The decision: a finding is present when its probability reaches its own threshold, chosen on validation
data (Youden's J, or the highest threshold reaching ``train.target_sensitivity``); a finding that cannot
be scored on validation keeps 0.5, and says so. Grad-CAM explains one finding's logit at a time.

Trust, per finding: one temperature per finding (fitted on that finding's labelled validation images; 1.0
where validation holds only one answer) — after undoing the positive weights' shift when the model was
trained with them: BCE with ``pos_weight`` w is minimized by logit(p) + log w, not logit(p) (the prior
correction of King & Zeng 2001; logit adjustment, Menon et al. 2021), so a temperature alone cannot bring a
rare finding's inflated probabilities down and log w is subtracted first. Then operating points, calibration and subgroup gaps on each finding's
binary view (masked labels left out), and split conformal sets per finding ({absent}, {present}, or both:
uncertain). An image's confidence is its least sure finding's, measured from that finding's threshold; its
error is the share of its labelled findings decided wrong (Hamming loss: at per-finding Youden thresholds
nearly every image has some finding wrong, so "any finding wrong" would rank nothing); it is referred to a
clinician when its confidence is below the abstention threshold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medsight.losses import AsymmetricLoss, BinaryFocal, MaskedBCE, positive_weights
from medsight.metrics import (checklist, finding_thresholds, format_ci, multilabel_epoch_metrics,
                              multilabel_metrics)
from medsight.metrics.calibration import fit_temperature, reliability_bins
from medsight.metrics.conformal import binary_set_metrics, binary_sets, fit_binary_conformal
from medsight.tasks.base import BinaryView, GalleryGroup, Task
from medsight.tasks.single_label import TaskConfigError

if TYPE_CHECKING:
    from medsight.config import Config

__all__ = ["MultiLabelTask"]


def _f(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


class MultiLabelTask(Task):
    """K findings, each present or absent; see the module docstring."""

    kind = "multilabel"

    def __init__(self, classes: list[str], decision: dict[str, Any] | None = None,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(classes, decision, options)
        self.options.setdefault("threshold_rule", "youden")
        self.options.setdefault("target_sensitivity", 0.9)
        if len(self.classes) < 1:
            raise TaskConfigError("a multi-label task needs at least one finding")

    @classmethod
    def options_from(cls, cfg: Config) -> dict[str, Any]:
        return {"threshold_rule": cfg.train.threshold_rule, "target_sensitivity": cfg.train.target_sensitivity}

    @property
    def thresholds(self) -> list[float]:
        return list(self.decision.get("thresholds") or [0.5] * len(self.classes))

    # ---------------------------------------------------------------------------------------- head
    def activation(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def activation_module(self) -> nn.Module:
        return nn.Sigmoid()

    # ------------------------------------------------------------------------------------ training
    def make_loss(self, cfg: Config, train_labels: np.ndarray) -> nn.Module:
        t = cfg.train
        labels = np.asarray(train_labels)
        if labels.ndim != 2 or labels.shape[1] != len(self.classes):
            raise TaskConfigError(f"data.task=multilabel needs one label column per finding ({len(self.classes)}); "
                                  f"the training labels have shape {labels.shape}")
        smoothing = t.label_smoothing
        if t.loss == "asl":
            return AsymmetricLoss(t.asl_gamma_neg, t.asl_gamma_pos, t.asl_clip, label_smoothing=smoothing)
        if t.loss == "focal":
            alpha = None
            if t.focal_alpha is not None:
                if len(t.focal_alpha) != 1 or not 0 < t.focal_alpha[0] < 1:
                    raise TaskConfigError("multi-label focal loss takes one train.focal_alpha in (0, 1): the weight "
                                          "of positives (e.g. [0.25])")
                alpha = float(t.focal_alpha[0])
            return BinaryFocal(t.focal_gamma, alpha, label_smoothing=smoothing)
        weights = positive_weights(labels) if t.class_weights else None
        # the shift those weights put into the logits, undone by calibration (fit_temperature, calibrate)
        self.decision["loss_logit_offset"] = None if weights is None else weights.log().tolist()
        return MaskedBCE(weights, label_smoothing=smoothing)

    def eval_loss(self) -> nn.Module:
        return MaskedBCE()

    def batch_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images whose every unmasked finding is decided right at 0.5 (exact match)."""
        decided = (logits.detach() >= 0).to(labels.dtype)
        return ((decided == labels) | (labels < 0)).all(1).sum()

    # ------------------------------------------------------------------------------------ decision
    def fit_decision(self, val_labels: np.ndarray, val_probs: np.ndarray) -> None:
        """Per-finding thresholds; the rest of the decision (temperatures, trust rules) is kept."""
        t, why = finding_thresholds(np.asarray(val_labels), np.asarray(val_probs), self.options["threshold_rule"],
                                    float(self.options["target_sensitivity"]))
        self.decision.update({"thresholds": t, "rule": self.options["threshold_rule"],
                              "not_fitted": {c: w for c, w in zip(self.classes, why) if w is not None}})

    def decide(self, probs: np.ndarray) -> np.ndarray:
        return (np.asarray(probs) >= np.asarray(self.thresholds)[None, :]).astype(np.int64)

    def explained_output(self, probs: np.ndarray) -> int:
        """The most probable finding."""
        return int(np.argmax(probs))

    def border_outputs(self, labels: np.ndarray, probs: np.ndarray) -> list[int]:
        """Each finding the image carries (its own border score), else the most probable finding."""
        carried = [int(k) for k in np.flatnonzero(np.asarray(labels) == 1)]
        return carried or [self.explained_output(probs)]

    def per_image_correct(self, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels)
        return ((self.decide(probs) == labels) | (labels < 0)).all(1)

    # --------------------------------------------------------------------------------- calibration
    def fit_temperature(self, val_logits: np.ndarray, val_labels: np.ndarray) -> None:
        """One temperature per finding (Guo et al. 2017 on each sigmoid), on its labelled validation images; a
        finding whose validation labels hold one answer only keeps 1.0 (its NLL would push T to the bound)."""
        self.decision.pop("temperature", None)
        z, y = np.asarray(val_logits, dtype=np.float64), np.asarray(val_labels)
        if self.logit_offset is not None:
            z = z - np.asarray(self.logit_offset, dtype=np.float64)[None, :]
        temps, skipped = [], []
        for k, name in enumerate(self.classes):
            keep = y[:, k] >= 0
            if len(np.unique(y[keep, k])) < 2:
                temps.append(1.0)
                skipped.append(name)
            else:
                temps.append(fit_temperature(z[keep, k], y[keep, k].astype(np.float64), _bce))
        self.decision["temperature"] = temps
        self.decision["temperature_not_fitted"] = skipped

    def reliability(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
        """Every labelled (image, finding) probability against whether the finding is present."""
        y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
        keep = y >= 0
        return reliability_bins(p[keep], y[keep])

    # ---------------------------------------------------------------------------------------- trust
    def binary_views(self, labels: np.ndarray, probs: np.ndarray) -> list[BinaryView]:
        """One view per finding, its masked labels left out."""
        y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
        return [(c, y[y[:, k] >= 0, k].astype(int), p[y[:, k] >= 0, k]) for k, c in enumerate(self.classes)]

    def view_labelled(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels) >= 0

    def margins(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) how far each probability is from its finding's threshold, as a share of the way to 0 or 1."""
        p = np.asarray(probs, dtype=np.float64)
        t = np.asarray(self.thresholds, dtype=np.float64)[None, :]
        return np.where(p >= t, (p - t) / np.maximum(1 - t, 1e-12), (t - p) / np.maximum(t, 1e-12))

    def confidence(self, probs: np.ndarray) -> np.ndarray:
        """The least sure finding's confidence, 0.5 + margin / 2: max(p, 1 − p) when its threshold is 0.5."""
        return 0.5 + 0.5 * self.margins(probs).min(1)

    def errors(self, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Per image, the share of its labelled findings decided wrong at their thresholds (0 when none is
        labelled): selective prediction's risk becomes the Hamming loss among the answered images."""
        y = np.asarray(labels)
        wrong = ((self.decide(probs) != y) & (y >= 0)).sum(1)
        return wrong / np.maximum((y >= 0).sum(1), 1)

    def tta_spread(self, views: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """The largest spread of a finding's probability over the TTA views."""
        return views.std(0).max(1)

    def fit_conformal(self, labels: np.ndarray, probs: np.ndarray, coverage: float, method: str = "lac",
                      class_conditional: bool = False) -> dict[str, Any]:
        """Split conformal sets per finding ({absent}, {present} or both), each calibrated on its own labelled
        validation images; ``class_conditional`` calibrates positives and negatives apart (rare findings)."""
        per = {name: fit_binary_conformal(y, s, coverage, method, class_conditional)
               for name, y, s in self.binary_views(labels, probs)}
        return {"method": method, "coverage": float(coverage), "class_conditional": bool(class_conditional),
                "per_finding": per, "qhat": {n: c["qhat"] for n, c in per.items()}, "n_calibration": int(len(labels))}

    def conformal_metrics(self, labels: np.ndarray, probs: np.ndarray, conformal: dict[str, Any]) -> dict[str, Any]:
        """Per finding: coverage, mean set size (1 or 2 answers), uncertain share; their means over findings; and
        how many images have every labelled finding covered at once (not guaranteed: reported, not targeted)."""
        y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
        per, all_covered = {}, np.ones(len(y), dtype=bool)
        for k, name in enumerate(self.classes):
            keep = y[:, k] >= 0
            per[name] = binary_set_metrics(y[keep, k], p[keep, k], conformal["per_finding"][name])
            sets = binary_sets(p[:, k], conformal["per_finding"][name])
            all_covered &= ~keep | sets[np.arange(len(y)), np.clip(y[:, k], 0, 1).astype(int)]
        keys = ("coverage", "mean_set_size", "singleton_rate", "empty_rate", "uncertain_rate")
        return {**{k: _mean([m[k] for m in per.values()]) for k in keys},
                "all_findings_covered": float(all_covered.mean()) if len(y) else None,
                "coverage_per_class": {n: m["coverage"] for n, m in per.items()},
                "per_finding": {n: {k: m[k] for k in (*keys, "n")} for n, m in per.items()}, "n": int(len(y))}

    def answer(self, probs: np.ndarray) -> dict[str, Any]:
        """:meth:`record`, and with the trust rules fitted: whether to refer to a clinician (and the least sure
        finding, which decided it), and the findings whose conformal set holds both answers."""
        rec = super().answer(probs)
        p = np.asarray(probs, dtype=np.float64)
        if "refer_to_clinician" in rec:
            rec["least_certain_finding"] = self.classes[int(np.argmin(self.margins(p[None])[0]))]
        per = (self.decision.get("conformal") or {}).get("per_finding")
        if per:
            rec["uncertain_findings"] = [c for k, c in enumerate(self.classes)
                                         if c in per and bool(binary_sets(p[[k]], per[c])[0].all())]
        return rec

    # ------------------------------------------------------------------------------------- metrics
    def metrics(self, labels: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        m = multilabel_metrics(labels, probs, self.classes, self.thresholds, n_boot=n_boot, seed=seed)
        m["threshold_rule"] = self.decision.get("rule", "0.5 (not fitted)")
        m["thresholds_not_fitted"] = dict(self.decision.get("not_fitted", {}))
        return m

    def epoch_metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
        return multilabel_epoch_metrics(np.asarray(labels), np.asarray(probs), (np.asarray(probs) >= 0.5).astype(int))

    def summary(self, m: dict[str, Any]) -> str:
        ci = (m.get("ci95") or {}).get("auc")
        line = (f"mean AUC {_f(m['auc'])}" + (f" {format_ci(ci)}" if ci else "")
                + f" over {len(m['scored'])} findings · micro AUC {_f(m['micro_auc'])} · mAP {_f(m['map'])} · "
                  f"exact match {m['exact_match']:.4f} · Hamming {m['hamming_accuracy']:.4f}")
        if m["unscoreable"]:
            line += "\n  not scoreable: " + "; ".join(f"{c} ({w})" for c, w in m["unscoreable"].items())
        return line

    def checklist(self, m: dict[str, Any], thresholds: dict[str, float | None]) -> dict[str, Any] | None:
        scored = {**m, "per_class": {c: v for c, v in m["per_class"].items() if v["recall"] is not None}}
        return checklist(scored, **{k: thresholds.get(k) for k in ("min_accuracy", "min_auc", "min_recall", "max_ece")})

    # ------------------------------------------------------------------------------------- reports
    def report_tables(self, metrics: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
        test, val = metrics["test"], metrics.get("val", {})
        ci = (test.get("ci95") or {}).get("auc")
        rows = [["mean AUC (scoreable findings)", val.get("auc"), test["auc"], format_ci(ci)]]
        for key, label in (("micro_auc", "micro AUC"), ("map", "mAP"), ("exact_match", "exact-match accuracy"),
                           ("hamming_accuracy", "Hamming accuracy"), ("balanced_accuracy", "mean balanced accuracy"),
                           ("ece", "mean ECE")):
            rows.append([label, val.get(key), test.get(key), ""])
        vf, not_fitted = val.get("findings", {}), test.get("thresholds_not_fitted", {})
        per = []
        for c, f in test["findings"].items():
            fc = (f.get("ci95") or {}).get("auc")
            per.append([c, f"{f['positives']} / {f['n']}", f["prevalence"], f["auc"],
                        format_ci(fc, 3), f["ap"], f["threshold"], f["sensitivity"],
                        f["specificity"], f["ece"], (vf.get(c) or {}).get("auc"),
                        test["unscoreable"].get(c) or (f"threshold 0.5 (val: {not_fitted[c]})" if c in not_fitted else "")])
        notes = [[c, w] for c, w in test["unscoreable"].items()]
        tables = [("Metrics", ["metric", "val", "test", "95% CI"], rows),
                  (f"Per finding (test; thresholds by {test.get('threshold_rule')} on validation)",
                   ["finding", "positives / labelled", "prevalence", "AUC", "95% CI", "AP", "threshold", "sensitivity",
                    "specificity", "ECE", "val AUC", "note"], per)]
        if notes:
            tables.append(("Not scoreable on test", ["finding", "why"], notes))
        return tables

    def gallery_groups(self, labels: np.ndarray, probs: np.ndarray, per_group: int,
                       rng: np.random.Generator) -> list[GalleryGroup]:
        """Per finding: test images carrying it, each explained by that finding's logit."""
        groups: list[GalleryGroup] = []
        for k, name in enumerate(self.classes):
            idx = np.flatnonzero(np.asarray(labels)[:, k] == 1)
            pick = [int(i) for i in rng.choice(idx, size=min(per_group, len(idx)), replace=False)] if len(idx) else []
            groups.append((f"{name}: test images carrying it", pick, [k] * len(pick)))
        return groups

    # ----------------------------------------------------------------------------------- inference
    def record(self, probs: np.ndarray) -> dict[str, Any]:
        p = np.asarray(probs, dtype=np.float64)
        found = [c for c, v, t in zip(self.classes, p, self.thresholds) if v >= t]
        top = int(np.argmax(p))
        return {"label": ", ".join(found) if found else "no finding above its threshold", "findings": found,
                "probability": float(p[top]), "explained": self.classes[top],
                "probabilities": {c: float(v) for c, v in zip(self.classes, p)},
                "thresholds": {c: float(t) for c, t in zip(self.classes, self.thresholds)}}
