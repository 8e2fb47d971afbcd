"""How sure is "size control recovers the local effect better"? A bootstrap that refits the probes.

The stage compares the raw and the size-controlled direction of a target by how well their traversal maps
match a planted local map (experiment.ground_truth_checks: plain r, r beyond global size, size-free r). One
such comparison is one probe fit on one set of fitting subjects, traversed on one set of test subjects; both
are samples. Here, ``n`` times: resample the fitting subjects (with replacement, within each label so that
both classes stay), refit both probes with the stage's settings (regularisation fixed: the suite's CV is where
C is chosen), make both directions as the suite does (the same latent scaling axis: a property of the model,
not of the fitting subjects), resample the traversed subjects, decode their two end steps along each
direction and score the mean difference maps. The percentile interval of ``size-controlled - raw`` per
measure, and the share of refits in which size control is ahead, say whether a difference is more than the
noise of the fit; they include refit variance, which an interval over fixed fold models would not.

Cost: ``n x 2 x 2 x S`` decodings (``S`` traversed subjects; no encodings or inversions: the traversed
latents are fixed), plus ``2 n`` probe fits on the fitting latents. Off unless ``directions.map_bootstrap``.
Arrays and a ``decode`` callable only; never a model family.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .groundtruth import MAP_MEASURE_SUFFIXES, SIZE_REFERENCE_MEASURES, map_correlation
from .metrics import percentile_interval, stratified_bootstrap_indices
from .probes import ProbeSettings
from .suite import LATENT_FEATURES, fit_latent_direction
from .targets import target_labels
from .traversal import Decode, decode_batched


@dataclass(frozen=True)
class ComparisonMaps:
    """What the map measures compare a direction's traversal map with (``(X, Y, Z)`` arrays)."""

    planted: np.ndarray  # the planted local effect
    size_map: np.ndarray  # the model's rendering of a pure global rescaling (experiment.size_reference_map)
    mask: np.ndarray  # bool, the brain


def map_measures(difference: np.ndarray, maps: ComparisonMaps) -> dict[str, float]:
    """One traversal's mean difference map by every measure the stage compares with (groundtruth.py), keyed by
    the metric suffix of :data:`~.groundtruth.MAP_MEASURE_SUFFIXES`; NaN where a map is constant."""
    out = {"": _or_nan(map_correlation, difference, maps.planted, maps.mask)}
    for suffix, measure in SIZE_REFERENCE_MEASURES.items():
        out[suffix] = _or_nan(measure, difference, maps.planted, maps.size_map, maps.mask)
    return out


def _or_nan(measure, *maps) -> float:
    try:
        return measure(*maps)
    except ValueError:  # a constant map: the decoder ignores this direction (no log: it would repeat per refit)
        return float("nan")


def size_control_bootstrap(
    target: str,
    latents: np.ndarray,
    subjects: pd.DataFrame,
    settings: ProbeSettings,
    size_covariate: str,
    traversal_latents: np.ndarray,
    end_steps: tuple[float, float],
    decode: Decode,
    maps: ComparisonMaps,
    n: int,
    seed: int = 0,
    size_axis: np.ndarray | None = None,
    C: dict[str, float] | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """``n`` refits of ``target``'s raw (``latent``) and size-controlled probes on resampled fitting subjects
    (``latents (N, L)``, ``subjects`` their rows), each direction traversed from resampled ``traversal_latents
    (S, L)`` between ``end_steps`` (in SDs, as the stage's first and last step) and scored against ``maps``.

    Returns, per measure suffix of :data:`~.groundtruth.MAP_MEASURE_SUFFIXES`: ``size_controlled_minus_raw_r<suffix>_low`` / ``_high``
    (percentile interval at ``settings.ci_level``), ``size_controlled_better<suffix>_share`` (share of refits
    with size control ahead), and ``bootstrap_refits`` (refits with every measure finite). ``C``: the inverse
    regularisation per feature set (``{"latent": .., "latent_size_controlled": ..}``, the C the suite chose);
    by default ``settings.C``."""
    if n < 2:
        raise ValueError(f"size_control_bootstrap: n must be >= 2 refits, got {n}")
    features_c = {f: (C or {}).get(f, settings.C) for f in LATENT_FEATURES}
    if any(c is None for c in features_c.values()):
        raise ValueError("size_control_bootstrap: the probes' C must be fixed (directions.probe_C, or the C the "
                         f"suite chose, per feature set {LATENT_FEATURES}); got {features_c}")
    latents = np.asarray(latents, np.float64)
    traversal_latents = np.asarray(traversal_latents, np.float64)
    if traversal_latents.ndim != 2 or traversal_latents.shape[1] != latents.shape[1]:
        raise ValueError(f"size_control_bootstrap: traversal latents {traversal_latents.shape} do not match the "
                         f"fitting latents {latents.shape}")
    labels = target_labels(subjects, target)
    steps = np.asarray(end_steps, np.float64)
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {suffix: [] for suffix in MAP_MEASURE_SUFFIXES}
    for _ in range(n):
        rows = np.sort(stratified_bootstrap_indices(labels, 1, rng)[0])  # sorted: the fit sees subjects in order
        fit_subjects = subjects.iloc[rows].reset_index(drop=True)
        traversed = traversal_latents[rng.integers(0, len(traversal_latents), len(traversal_latents))]
        scores = []
        for features in LATENT_FEATURES:  # raw, then size-controlled
            direction = fit_latent_direction(target, features, latents[rows], fit_subjects,
                                             settings.replace(C=features_c[features]), size_covariate, size_axis)
            codes = traversed[:, None, :] + direction.offsets(steps)[None, :, :]  # (S, 2, L)
            ends = decode_batched(codes.reshape(-1, codes.shape[-1]), decode, batch_size=batch_size,
                                  device=device).reshape(len(traversed), 2, *maps.planted.shape)
            scores.append(map_measures((ends[:, 1].astype(np.float64) - ends[:, 0]).mean(0), maps))
        raw, controlled = scores
        for suffix in MAP_MEASURE_SUFFIXES:
            diffs[suffix].append(controlled[suffix] - raw[suffix])
    table = np.array([diffs[s] for s in MAP_MEASURE_SUFFIXES])  # (measures, n)
    finite = np.all(np.isfinite(table), axis=0)
    if finite.sum() < 2:
        raise ValueError(f"size_control_bootstrap: only {int(finite.sum())} of {n} refits gave finite map "
                         "measures (the decoder ignores the directions?)")
    out: dict[str, float] = {"bootstrap_refits": float(finite.sum())}
    for suffix, values in zip(MAP_MEASURE_SUFFIXES, table[:, finite]):
        low, high = percentile_interval(values, settings.ci_level)
        out[f"size_controlled_minus_raw_r{suffix}_low"] = float(low)
        out[f"size_controlled_minus_raw_r{suffix}_high"] = float(high)
        out[f"size_controlled_better{suffix}_share"] = float(np.mean(values > 0))
    return out
