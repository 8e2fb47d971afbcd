"""The metric registry: stable names -> functions returning ``dict[str, float]``, and which way is better.

Each metric function takes keyword inputs with standard names; :func:`compute_metrics` hands every chosen
metric the inputs its signature asks for:

==================  ===========================================  =============================================
metric              inputs                                       keys (direction)
==================  ===========================================  =============================================
mse, psnr, ssim     reconstructions, targets (B, 1, X, Y, Z)     mse (min), psnr (max), ssim (max)
fid                 sample_features, real_features (N, F)        fid (min)
kid                 sample_features, real_features [, seed]      kid_mean (min), kid_std
mmd                 sample_features, real_features [, bandwidth] mmd_rbf (min), mmd_rbf_bandwidth
ms_ssim_diversity   samples, reals (N, 1, X, Y, Z) [, seed]      ms_ssim_diversity_gap (min), _samples, _real
anatomy             sample_measures, real_measures (DataFrames)  anat_<m>_w1_norm, anat_<m>_ks,
                                                                 anat_w1_norm_mean, anat_ks_mean (min);
                                                                 anat_<m>_mean_ratio
attributes          sample_predictions, real_predictions         frac_male_abs_diff, age_group_tv (min); ...
quality             samples, reals (N[, 1], X, Y, Z), seed       c2st_auc, intensity_w1, tissue_tv,
                                                                 density_gap (min), coverage (max); c2st_auc_std,
                                                                 density, tissue_<class>_frac[_real]
==================  ===========================================  =============================================

Keys without a direction are descriptive (spreads, bandwidths, per-set values) and cannot rank models.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

from brainlatent.metrics import anatomical, generative, quality, reconstruction

Direction = Literal["min", "max"]

METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "mse": reconstruction.mse,
    "psnr": reconstruction.psnr,
    "ssim": reconstruction.ssim,
    "fid": generative.fid,
    "kid": generative.kid,
    "mmd": generative.mmd_rbf,
    "ms_ssim_diversity": generative.ms_ssim_diversity,
    "anatomy": anatomical.measure_distances,
    "attributes": anatomical.attribute_distances,
    "quality": quality.sample_quality,
}

METRIC_DIRECTIONS: dict[str, Direction] = {
    "mse": "min",
    "psnr": "max",
    "ssim": "max",
    "fid": "min",
    "kid_mean": "min",
    "mmd_rbf": "min",
    "ms_ssim_diversity_gap": "min",
    "anat_w1_norm_mean": "min",
    "anat_ks_mean": "min",
    "frac_male_abs_diff": "min",
    "age_group_tv": "min",
    # Sample quality (metrics/quality.py). c2st_auc: 0.5 = indistinguishable from the reals; below 0.5 is
    # chance, so lower is better throughout. density_gap = |density - 1|, density's ideal being 1.
    "c2st_auc": "min",
    "intensity_w1": "min",
    "tissue_tv": "min",
    "density_gap": "min",
    "coverage": "max",
}
# Per-measure anatomy keys (anat_<measure>_w1_norm / _ks) depend on the measure names.
_ANAT_SUFFIX_DIRECTIONS: dict[str, Direction] = {"_w1_norm": "min", "_ks": "min"}


def metric_direction(key: str) -> Direction:
    """``"min"`` or ``"max"`` for a rankable output key; ValueError for unknown or descriptive keys."""
    if key in METRIC_DIRECTIONS:
        return METRIC_DIRECTIONS[key]
    if key.startswith("anat_"):
        for suffix, direction in _ANAT_SUFFIX_DIRECTIONS.items():
            if key.endswith(suffix):
                return direction
    raise ValueError(
        f"metric key {key!r} has no direction (unknown or descriptive); rankable keys: "
        f"{sorted(METRIC_DIRECTIONS)} and anat_<measure>_w1_norm / anat_<measure>_ks"
    )


def is_better(key: str, candidate: float, incumbent: float | None) -> bool:
    """Whether ``candidate`` beats ``incumbent`` on ``key`` (strictly). NaN never wins; anything finite beats
    a missing or NaN incumbent."""
    direction = metric_direction(key)
    if candidate is None or math.isnan(candidate):
        return False
    if incumbent is None or math.isnan(incumbent):
        return True
    return candidate < incumbent if direction == "min" else candidate > incumbent


def _parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def compute_metrics(names: Iterable[str], **inputs: Any) -> dict[str, float]:
    """Compute the chosen metrics and merge their outputs.

    Each metric receives the entries of ``inputs`` that its signature names (e.g. ``compute_metrics(["fid",
    "kid"], sample_features=fs, real_features=fr, seed=0)``). An input no registered metric accepts is a
    ValueError (catches typos), as is a metric whose required inputs are missing.
    """
    names = list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; available: {sorted(METRICS)}")
    accepted = {p for fn in METRICS.values() for p in _parameters(fn)}
    stray = sorted(set(inputs) - accepted)
    if stray:
        raise ValueError(
            f"compute_metrics: input(s) {stray} are not used by any metric; known inputs: {sorted(accepted)}"
        )
    out: dict[str, float] = {}
    for name in names:
        params = _parameters(METRICS[name])
        required = [p for p, spec in params.items() if spec.default is inspect.Parameter.empty]
        missing = [p for p in required if p not in inputs]
        if missing:
            raise ValueError(f"metric {name!r} needs input(s) {missing}; got {sorted(inputs)}")
        values = METRICS[name](**{p: inputs[p] for p in params if p in inputs})
        clash = set(values) & set(out)
        assert not clash, f"metric output keys collide: {sorted(clash)}"
        out.update({k: float(v) for k, v in values.items()})
    return out
