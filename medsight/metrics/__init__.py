"""Metrics from predicted probabilities (scikit-learn underneath), with bootstrap intervals."""

from medsight.metrics.classification import (auc_score, best_threshold, bootstrap_ci, checklist,
                                             classification_metrics, expected_calibration_error)
from medsight.metrics.multilabel import (finding_thresholds, mean_auc, multilabel_epoch_metrics,
                                         multilabel_metrics)
from medsight.metrics.ordinal import (apply_cutpoints, fast_auc, fit_cutpoints, ordinal_checklist, ordinal_metrics,
                                      quadratic_kappa, refer_threshold, referable, weighted_kappa)

__all__ = ["classification_metrics", "checklist", "expected_calibration_error", "auc_score", "bootstrap_ci",
           "best_threshold", "ordinal_metrics", "ordinal_checklist", "quadratic_kappa", "weighted_kappa", "fast_auc",
           "refer_threshold", "referable", "fit_cutpoints", "apply_cutpoints", "multilabel_metrics",
           "multilabel_epoch_metrics", "finding_thresholds", "mean_auc"]
