"""Patient-level stratified folds at the scale of a chest X-ray archive.

:func:`stratified_group_fold` gives the same folds as scikit-learn's ``StratifiedGroupKFold(shuffle=True)``
(the same shuffle, order and greedy assignment, tested equal), rewritten because scikit-learn scores each
group against each fold with a dozen small numpy calls: on a 250,000-row manifest of 62,500 patients that
took minutes. Here each group's candidate folds are scored in one broadcast expression.
"""

from __future__ import annotations

import numpy as np

__all__ = ["stratified_group_fold"]


def _isclose(a: float, b: float) -> bool:
    """``np.isclose`` on two floats (rtol 1e-5, atol 1e-8; never true against infinity)."""
    return bool(np.isfinite(b)) and abs(a - b) <= 1e-8 + 1e-5 * abs(b)


def stratified_group_fold(labels: np.ndarray, groups: np.ndarray | list[str], n_splits: int,
                          seed: int) -> np.ndarray:
    """The fold (0 .. n_splits-1) of every sample: groups whole, class proportions balanced across folds.

    Greedy, as scikit-learn's ``StratifiedGroupKFold`` (after a Kaggle kernel by J. Wasikowski): groups in a
    shuffled order, those with the most uneven class counts first, each to the fold where the mean over
    classes of the standard deviation of the per-fold class shares is smallest (ties: the smaller fold).
    """
    labels = np.asarray(labels)
    _, y_inv, y_cnt = np.unique(labels, return_inverse=True, return_counts=True)
    _, g_inv, g_cnt = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    n_groups, n_classes = len(g_cnt), len(y_cnt)
    if n_splits > n_groups:
        raise ValueError(f"cannot make {n_splits} folds of {n_groups} groups")
    per_group = np.zeros((n_groups, n_classes))
    np.add.at(per_group, (g_inv, y_inv), 1)
    perm = np.arange(n_groups)
    np.random.RandomState(seed).shuffle(perm)
    per_group = per_group[perm]
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(n_groups)
    g_inv = inv_perm[g_inv]
    order = np.argsort(-np.std(per_group, axis=1), kind="stable")
    per_fold = np.zeros((n_splits, n_classes))
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    eye = np.eye(n_splits)[:, :, None]  # candidate i adds the group to fold i
    totals = y_cnt.reshape(1, 1, -1)
    for g in order:
        counts = per_group[g]
        trial = (per_fold[None] + eye * counts) / totals  # (candidate, fold, class)
        dev = trial - trial.sum(axis=1, keepdims=True) / n_splits  # np.std's own steps, without its overhead
        evals = np.sqrt((dev * dev).sum(axis=1) / n_splits).sum(axis=1)
        evals = (evals / n_classes).tolist()
        sizes = per_fold.sum(axis=1).tolist()
        best, best_eval, best_size = 0, np.inf, np.inf
        for i in range(n_splits):
            if evals[i] < best_eval or (_isclose(evals[i], best_eval) and sizes[i] < best_size):
                best, best_eval, best_size = i, evals[i], sizes[i]
        per_fold[best] += counts
        fold_of_group[g] = best
    return fold_of_group[g_inv]
