"""Metrics from predicted probabilities (scikit-learn underneath), with bootstrap intervals: the one home of
medsight's statistics (one bootstrap, one set of binary rates, one ECE, one threshold chooser)."""

from medsight.metrics.bootstrap import bootstrap_cis, format_ci, percentile_ci
from medsight.metrics.classification import (auc_score, bootstrap_ci, checklist, classification_metrics,
                                             expected_calibration_error)
from medsight.metrics.multilabel import (finding_thresholds, mean_auc, multilabel_epoch_metrics,
                                         multilabel_metrics)
from medsight.metrics.ordinal import (apply_cutpoints, fast_auc, fit_cutpoints, ordinal_checklist, ordinal_metrics,
                                      quadratic_kappa, referable, weighted_kappa)
from medsight.metrics.operating_points import choose_threshold
from medsight.metrics.rates import binary_rates

__all__ = ["classification_metrics", "checklist", "expected_calibration_error", "auc_score", "bootstrap_ci",
           "bootstrap_cis", "percentile_ci", "format_ci", "binary_rates", "choose_threshold", "ordinal_metrics", "ordinal_checklist", "quadratic_kappa", "weighted_kappa", "fast_auc",
           "referable", "fit_cutpoints", "apply_cutpoints", "multilabel_metrics",
           "multilabel_epoch_metrics", "finding_thresholds", "mean_auc"]
