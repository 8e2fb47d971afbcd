"""Anatomical plausibility: do generated brains have the sizes and the sex / age mix of real ones?

Two families, both comparing the distribution over generated volumes with that over real scans:

* :func:`measure_distances` on anatomical measures (one row per volume, one column per measure, e.g.
  ``brain_volume_mm3``, ``ventricle_volume_mm3``, ``gm_volume_mm3`` from ``brainlatent.anatomy``):
  Wasserstein-1 distance in units of the real standard deviation, two-sample KS statistic, mean ratio.
* :func:`attribute_distances` on the feature net's sex / age-group predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import ks_2samp, wasserstein_distance

from brainlatent.data.cohort import AGE_GROUPS
from brainlatent.models.featurenet import AttributePredictions

MeasureFn = Callable[[Any, Any], pd.DataFrame]


def _column(df: pd.DataFrame, col: str, name: str) -> np.ndarray:
    if col not in df.columns:
        raise ValueError(f"{name}: no column {col!r}; has {list(df.columns)}")
    values = pd.to_numeric(df[col], errors="coerce").to_numpy(np.float64)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        raise ValueError(f"{name}[{col!r}]: need at least 2 finite values, got {len(values)}")
    return values


def measure_distances(
    sample_measures: pd.DataFrame, real_measures: pd.DataFrame, columns: Sequence[str] | None = None
) -> dict[str, float]:
    """Per measure ``m``: ``anat_{m}_w1_norm`` (W1 distance / real SD), ``anat_{m}_ks`` (KS statistic) and
    ``anat_{m}_mean_ratio`` (sample mean / real mean); plus ``anat_w1_norm_mean`` and ``anat_ks_mean``
    over measures. Non-finite values (a measure that failed on a broken sample) are dropped.

    Args:
        sample_measures: (N, measures) for generated volumes.
        real_measures: (M, measures) for real scans.
        columns: measures to compare; default: every numeric column of ``real_measures``.
    """
    if columns is None:
        columns = [c for c in real_measures.columns if pd.api.types.is_numeric_dtype(real_measures[c])]
    if not columns:
        raise ValueError("measure_distances: no numeric measure columns to compare")
    out: dict[str, float] = {}
    for col in columns:
        s = _column(sample_measures, col, "sample_measures")
        r = _column(real_measures, col, "real_measures")
        sd = float(np.std(r, ddof=1))
        if sd <= 0:
            raise ValueError(f"real_measures[{col!r}]: constant over real scans; cannot normalise the W1 distance")
        out[f"anat_{col}_w1_norm"] = float(wasserstein_distance(s, r)) / sd
        out[f"anat_{col}_ks"] = float(ks_2samp(s, r).statistic)
        out[f"anat_{col}_mean_ratio"] = float(np.mean(s) / np.mean(r)) if np.mean(r) != 0 else float("nan")
    out["anat_w1_norm_mean"] = float(np.mean([out[f"anat_{c}_w1_norm"] for c in columns]))
    out["anat_ks_mean"] = float(np.mean([out[f"anat_{c}_ks"] for c in columns]))
    return out


def anatomical_plausibility(
    samples: Any, reals: Any, grid: Any, measure_fn: MeasureFn | None = None, columns: Sequence[str] | None = None
) -> dict[str, float]:
    """Measure generated and real volumes with ``measure_fn(volumes, grid) -> DataFrame`` (default
    ``brainlatent.anatomy.measure_volumes``) and compare them with :func:`measure_distances`.

    ``samples`` / ``reals``: (N, 1, X, Y, Z) tensors or arrays, or (N, X, Y, Z) arrays; ``measure_fn`` gets
    (N, X, Y, Z) numpy arrays.
    """
    if measure_fn is None:
        from brainlatent.anatomy import measure_volumes  # lazy: anatomy loads and resamples the template

        measure_fn = measure_volumes
    return measure_distances(measure_fn(_as_array4(samples), grid), measure_fn(_as_array4(reals), grid), columns)


def _as_array4(volumes: Any) -> np.ndarray:
    """(N, 1, X, Y, Z) tensor/array or (N, X, Y, Z) array -> (N, X, Y, Z) numpy (no copy for arrays)."""
    if isinstance(volumes, torch.Tensor):
        volumes = volumes.detach().cpu().numpy()
    volumes = np.asarray(volumes)
    if volumes.ndim == 5 and volumes.shape[1] == 1:
        return volumes[:, 0]
    if volumes.ndim != 4:
        raise ValueError(f"volumes: expected (N, 1, X, Y, Z) or (N, X, Y, Z), got shape {volumes.shape}")
    return volumes


def attribute_distances(
    sample_predictions: AttributePredictions, real_predictions: AttributePredictions
) -> dict[str, float]:
    """Compare the feature net's hard predictions on generated vs real volumes.

    Returns:
        ``frac_male_samples``, ``frac_male_real``, ``frac_male_abs_diff``; ``mean_age_group_samples``,
        ``mean_age_group_real`` (mean predicted group index, 0 = "22-25"); ``age_group_tv``, the total
        variation distance between the predicted age-group histograms (0 = same mix, 1 = disjoint).
    """
    out: dict[str, float] = {}
    hist = {}
    for name, pred in (("samples", sample_predictions), ("real", real_predictions)):
        if len(pred.p_male) == 0:
            raise ValueError(f"{name} predictions are empty")
        out[f"frac_male_{name}"] = float(np.mean(pred.predicted_male))
        groups = pred.predicted_age_group
        out[f"mean_age_group_{name}"] = float(np.mean(groups))
        hist[name] = np.bincount(groups, minlength=len(AGE_GROUPS)) / len(groups)
    out["frac_male_abs_diff"] = abs(out["frac_male_samples"] - out["frac_male_real"])
    out["age_group_tv"] = float(0.5 * np.abs(hist["samples"] - hist["real"]).sum())
    return out
