"""The rates of a yes/no call against the truth: sensitivity, specificity, positive and negative predictive
value. The one place they are computed, for operating points, a finding's threshold, the referable grades and
the subgroup audit. A rate whose denominator is empty is None (undefined), never 0."""

from __future__ import annotations

import numpy as np

__all__ = ["binary_rates", "RATES"]

RATES = ("sensitivity", "specificity", "ppv", "npv")


def binary_rates(y_true: np.ndarray, called: np.ndarray) -> dict[str, float | None]:
    """Sensitivity TP/(TP+FN), specificity TN/(TN+FP), PPV TP/(TP+FP) and NPV TN/(TN+FN) of the boolean
    ``called`` against the boolean ``y_true``."""
    y = np.asarray(y_true, dtype=bool)
    c = np.asarray(called, dtype=bool)
    tp = float((c & y).sum())
    fp = float((c & ~y).sum())
    fn = float((~c & y).sum())
    tn = float((~c & ~y).sum())

    def ratio(a: float, b: float) -> float | None:
        return a / (a + b) if a + b else None

    return {"sensitivity": ratio(tp, fn), "specificity": ratio(tn, fp), "ppv": ratio(tp, fp), "npv": ratio(tn, fn)}
