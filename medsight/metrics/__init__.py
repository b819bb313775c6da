"""Metrics from predicted probabilities (scikit-learn underneath), with bootstrap intervals."""

from medsight.metrics.classification import (auc_score, best_threshold, bootstrap_ci, checklist,
                                             classification_metrics, expected_calibration_error)

__all__ = ["classification_metrics", "checklist", "expected_calibration_error", "auc_score", "bootstrap_ci",
           "best_threshold"]
