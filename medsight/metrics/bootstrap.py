"""The one percentile bootstrap of medsight's metrics (Efron & Tibshirani, *An Introduction to the Bootstrap*,
1993): resample the test images with replacement ``n_boot`` times, recompute the statistics on each resample,
and report the 2.5th and 97.5th percentiles.

**When an interval is given.** A statistic can be undefined on a resample (an AUC without positives, a
sensitivity without positives). Its interval is given when at least half of the resamples define it; otherwise
it is None, because the percentiles of the few resamples left would describe a different population. Every
task kind, the operating points and the subgroup audit use this rule.

Written here because scikit-learn has no bootstrap and scipy's ``bootstrap`` resamples one statistic at a time
(each of ours shares its resamples with the others, e.g. a subgroup gap is the difference on the same draws).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

__all__ = ["resamples", "bootstrap_draws", "percentile_ci", "bootstrap_cis", "format_ci", "LEVEL"]

#: The intervals' coverage (95%).
LEVEL = 0.95

Statistics = Callable[[np.ndarray], dict[str, float | None]]


def resamples(n: int, n_boot: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``n_boot`` index arrays of ``n`` images drawn with replacement."""
    for _ in range(n_boot):
        yield rng.integers(0, n, n)


def bootstrap_draws(stats: Statistics, n: int, n_boot: int, rng: np.random.Generator) -> dict[str, list[float | None]]:
    """Per statistic, its value on each resample (None where the resample leaves it undefined), in resample order.
    ``stats`` maps the resample's indices to named values."""
    draws: dict[str, list[float | None]] = {}
    for idx in resamples(n, n_boot, rng):
        for name, v in stats(idx).items():
            draws.setdefault(name, []).append(v)
    return draws


def percentile_ci(draws: Sequence[float | None], n_boot: int, level: float = LEVEL) -> list[float] | None:
    """The percentile interval of one statistic's resample values, or None when fewer than half of the
    ``n_boot`` resamples define it (None and NaN count as undefined)."""
    v = np.array([x for x in draws if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v) or len(v) < n_boot / 2:
        return None
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return [float(np.percentile(v, lo)), float(np.percentile(v, hi))]


def bootstrap_cis(stats: Statistics, n: int, n_boot: int, seed: int = 0,
                  level: float = LEVEL) -> dict[str, list[float] | None]:
    """Percentile intervals of every statistic ``stats`` returns, over ``n_boot`` resamples of ``n`` images."""
    draws = bootstrap_draws(stats, n, n_boot, np.random.default_rng(seed))
    return {name: percentile_ci(v, n_boot, level) for name, v in draws.items()}


def format_ci(ci: Sequence[float] | None, digits: int = 4) -> str:
    """``[lo, hi]`` with ``digits`` decimals, or an empty string when there is no interval."""
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""
