"""Does the model work as well for every group? Per-subgroup metrics from a manifest's metadata columns
(sex, age, site, scanner, view), the largest gap in sensitivity and in AUC, and whether the gap's bootstrap
interval excludes zero (the under-diagnosis audit of Seyyed-Kalantari et al., Nature Medicine 2021).

Functions take one binary view ``(y_true_binary, score, threshold)``, so a task runs them per class, for its
referable grades, or per finding. A column with one value, and groups too small for an interval, are
reported as such, never an error.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from medsight.metrics import fast_auc
from medsight.metrics import bootstrap
from medsight.metrics.rates import binary_rates

__all__ = ["detect_columns", "group_labels", "subgroup_metrics", "SUBGROUP_HINTS"]

#: Column names (lower case, any separator) taken as subgroup metadata when ``eval.subgroups`` is not given.
SUBGROUP_HINTS = ("sex", "gender", "patient_sex", "patient_gender", "age", "patient_age", "site", "hospital", "centre",
                  "center", "institution", "scanner", "manufacturer", "device", "view", "view_position", "position",
                  "race", "ethnicity")

#: Age bins in years (lower edges); an age column is binned, every other column used as written.
AGE_EDGES = (0, 18, 40, 60, 80)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z]+", "_", name.strip().lower()).strip("_")


def detect_columns(columns: list[str]) -> list[str]:
    """The metadata columns whose names say they are a subgroup (sex, age, site, scanner, view, ...)."""
    return [c for c in columns if _norm(c) in SUBGROUP_HINTS]


def _age_bin(v: str) -> str:
    try:
        age = float(re.sub(r"[^0-9.]", "", v)) if v.strip() else float("nan")
    except ValueError:
        age = float("nan")
    if not np.isfinite(age):
        return "missing"
    lower = max(e for e in AGE_EDGES if e <= age) if age >= 0 else 0
    upper = next((e for e in AGE_EDGES if e > lower), None)
    return f"{lower}-{upper - 1}" if upper is not None else f"{lower}+"


def group_labels(column: str, values: list[str]) -> list[str]:
    """Each image's group in ``column``: ages binned (0-17, 18-39, 40-59, 60-79, 80+), blanks 'missing'."""
    if "age" in _norm(column).split("_"):
        return [_age_bin(v) for v in values]
    return [v.strip() or "missing" for v in values]


def _rates(y: np.ndarray, s: np.ndarray, t: float | None) -> dict[str, float | None]:
    rates = binary_rates(y, s >= t) if t is not None else {}
    return {"auc": fast_auc(y, s), "sensitivity": rates.get("sensitivity"), "specificity": rates.get("specificity")}


def subgroup_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float | None, groups: list[str], *,
                     min_size: int = 20, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per group: n, positives, AUC, sensitivity and specificity at ``threshold`` with bootstrap intervals
    (groups under ``min_size`` images, or lacking positives or negatives, get none and stay out of the gaps);
    the largest gap in sensitivity and in AUC between eligible groups, its interval (each group resampled on
    its own, the difference between the same two groups each time) and ``flagged`` when it excludes zero."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    g = np.asarray(groups, dtype=object)
    names = sorted(set(groups), key=str)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"groups": {}, "gaps": {}, "min_size": min_size}
    if len(names) < 2:
        out["note"] = f"one value only ({names[0] if names else 'none'}): no comparison possible"
    boots: dict[str, dict[str, list[float]]] = {}
    for name in names:
        idx = np.flatnonzero(g == name)
        yy, ss = y[idx], s[idx]
        row: dict[str, Any] = {"n": int(len(idx)), "n_positive": int(yy.sum()), **_rates(yy, ss, threshold)}
        eligible = len(idx) >= min_size and yy.any() and (~yy).any()
        row["eligible"] = bool(eligible)
        if not eligible:
            row["note"] = (f"fewer than {min_size} images" if len(idx) < min_size
                           else "no positives" if not yy.any() else "no negatives") + ": no interval, not in the gaps"
        elif n_boot:
            draws = bootstrap.bootstrap_draws(lambda b: {k: v for k, v in _rates(yy[b], ss[b], threshold).items()
                                               if k in ("auc", "sensitivity")}, len(idx), n_boot, rng)
            boots[name] = {k: [np.nan if x is None else x for x in v] for k, v in draws.items()}
            row["ci95"] = {k: bootstrap.percentile_ci(v, n_boot) for k, v in draws.items()}
        out["groups"][name] = row
    for metric in ("sensitivity", "auc"):
        ok = [n for n in names if out["groups"][n]["eligible"] and out["groups"][n][metric] is not None]
        if len(ok) < 2:
            out["gaps"][metric] = None
            continue
        best = max(ok, key=lambda n: out["groups"][n][metric])
        worst = min(ok, key=lambda n: out["groups"][n][metric])
        gap: dict[str, Any] = {"best": best, "worst": worst,
                               "gap": float(out["groups"][best][metric] - out["groups"][worst][metric])}
        if n_boot and best in boots and worst in boots:
            diff = np.array(boots[best][metric]) - np.array(boots[worst][metric])
            diff = diff[np.isfinite(diff)]
            ci = bootstrap.percentile_ci(diff.tolist(), n_boot)
            gap["ci95"] = ci
            gap["flagged"] = bool(ci is not None and (ci[0] > 0 or ci[1] < 0))
        out["gaps"][metric] = gap
    return out
