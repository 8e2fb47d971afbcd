"""Ranking and classification metrics vectorised over leading axes, and a stratified subject bootstrap.

The confidence intervals resample subjects B times and re-score R cross-validation repeats each time, i.e.
B x R metric evaluations per probe. scikit-learn's metrics score one vector per call; these score arrays
of shape ``(..., N)`` in one rank computation (``scipy.stats.rankdata``), which keeps the bootstrap in the
millisecond range. ``tests/test_probes.py`` checks them against scikit-learn / scipy.

Every function takes labels ``y`` broadcastable to scores ``s`` of shape ``(..., N)`` and returns ``(...)``.
Undefined values (a single class in a resample, constant scores for Spearman) are NaN.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata


def auc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ROC AUC of scores ``s`` for binary labels ``y`` in {0, 1} (Mann-Whitney U / (n1 n0), ties averaged)."""
    s = np.asarray(s, float)
    y = np.broadcast_to(np.asarray(y), s.shape).astype(bool)
    ranks = rankdata(s, axis=-1)
    n1 = y.sum(-1)
    n0 = y.shape[-1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(y, ranks, 0.0).sum(-1) - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def ordinal_auc(y: np.ndarray, s: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean AUC over the ``n_classes - 1`` cumulative splits ``y >= k`` (k = 1..n_classes-1).

    The natural AUC for one ordinal score: each split asks whether older groups score higher than younger.
    """
    y = np.asarray(y)
    per_split = np.stack([auc(y >= k, s) for k in range(1, n_classes)])
    # A split with one side empty (a group missing from a small test set) is skipped, not fatal.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all splits undefined: NaN, as documented
        return np.nanmean(per_split, axis=0)


def balanced_accuracy(y: np.ndarray, y_hat: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean per-class recall over the classes present in ``y`` (as ``sklearn.metrics.balanced_accuracy_score``)."""
    y_hat = np.asarray(y_hat)
    y = np.broadcast_to(np.asarray(y), y_hat.shape)
    recalls = []
    for c in range(n_classes):
        in_c = y == c
        n_c = in_c.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(n_c > 0, (in_c & (y_hat == c)).sum(-1) / n_c, np.nan))
    return np.nanmean(np.stack(recalls), axis=0)


def spearman(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis (Pearson correlation of average ranks)."""
    s = np.asarray(s, float)
    y = np.broadcast_to(np.asarray(y, float), s.shape)
    ry = rankdata(y, axis=-1)
    rs = rankdata(s, axis=-1)
    ry = ry - ry.mean(-1, keepdims=True)
    rs = rs - rs.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ry * rs).sum(-1) / np.sqrt((ry**2).sum(-1) * (rs**2).sum(-1))


def stratified_bootstrap_indices(y: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_bootstrap, N)`` subject indices resampled with replacement *within* each label value.

    Stratifying keeps every class in every resample (so AUC is always defined) and keeps the class
    balance of the cohort, as the cross-validation does.
    """
    y = np.asarray(y)
    blocks = [rng.choice(np.flatnonzero(y == c), size=(n_bootstrap, int((y == c).sum()))) for c in np.unique(y)]
    return np.concatenate(blocks, axis=1)


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """Two-sided percentile interval of bootstrap ``samples`` (NaNs ignored)."""
    alpha = (1.0 - level) / 2.0
    lo, hi = np.nanquantile(np.asarray(samples, float), [alpha, 1.0 - alpha])
    return float(lo), float(hi)
