"""Does a direction find what we planted? (synthetic cohort only)

The synthetic cohort plants a local sex effect and age effects (ventricles grow with age, cortex thins);
the planted effect maps are put on the processed grid by ``brainlatent.anatomy.load_effect_map``. Two
checks per direction:

  map correlation  Pearson r between the traversal's group-mean difference map and the planted effect map,
                   optionally inside a brain mask (so the empty background does not inflate r)
  beyond size      the same r after regressing both maps, voxelwise, on the map of a pure global rescaling
                   (``partial_map_correlation``): a local enlargement at coarse voxels mostly pushes the brain's
                   outline outward, as a larger brain does, so a global-size map already correlates with a
                   local one and the plain r rewards any global-size component of a direction
  size-free        the direction's whole map against the part of the planted map that the global-rescaling
                   map does not explain (``size_free_map_correlation``, a semipartial r): the planted local
                   effect with its size-like component taken out is what a size-independent direction should
                   render, and any global size the direction still moves lowers the score (the beyond-size
                   r cannot see it: a map ``local + a x size`` scores the same there whatever ``a``)
  effect sign      along the age direction the ventricle volume must rise (planted growth > 0): the
                   measured change per SD must have the planted sign and rise monotonically

``effect_maps`` is the ceiling for the first check: a voxel-wise linear model of a set of volumes (the scans,
or a model's reconstructions of them) on the labels. A direction can only render what the model's
reconstructions keep of an effect (docs/architecture.md, "How long to train the autoencoders").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import pearsonr


def map_correlation(estimated: np.ndarray, planted: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson r between two ``(X, Y, Z)`` maps over the voxels of ``mask`` (all voxels when None)."""
    estimated, planted = np.asarray(estimated, np.float64), np.asarray(planted, np.float64)
    if estimated.shape != planted.shape:
        raise ValueError(f"map_correlation: estimated map {estimated.shape} and planted map {planted.shape} differ")
    if mask is None:
        mask = np.ones(estimated.shape, bool)
    mask = np.asarray(mask, bool)
    if mask.shape != estimated.shape:
        raise ValueError(f"map_correlation: mask {mask.shape} does not match the maps {estimated.shape}")
    a, b = estimated[mask], planted[mask]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        raise ValueError("map_correlation: need >= 3 masked voxels and non-constant maps")
    return float(pearsonr(a, b).statistic)


def _masked_triple(what: str, estimated: np.ndarray, planted: np.ndarray, control: np.ndarray,
                   mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three maps' voxels inside ``mask`` as float64 vectors, ``control`` centred; ValueError (prefixed by
    ``what``) for maps of different shapes, a mask that does not fit, or constant maps."""
    estimated, planted, control = (np.asarray(m, np.float64) for m in (estimated, planted, control))
    if not estimated.shape == planted.shape == control.shape:
        raise ValueError(f"{what}: estimated {estimated.shape}, planted {planted.shape} and control "
                         f"{control.shape} maps differ")
    mask = np.ones(estimated.shape, bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != estimated.shape:
        raise ValueError(f"{what}: mask {mask.shape} does not match the maps {estimated.shape}")
    a, b, c = estimated[mask], planted[mask], control[mask]
    if a.size < 4 or np.ptp(a) == 0 or np.ptp(b) == 0 or np.ptp(c) == 0:
        raise ValueError(f"{what}: need >= 4 masked voxels and non-constant maps")
    return a, b, c - c.mean()


def partial_map_correlation(estimated: np.ndarray, planted: np.ndarray, control: np.ndarray,
                            mask: np.ndarray | None = None) -> float:
    """Partial correlation of two ``(X, Y, Z)`` maps given a third, over the voxels of ``mask``: Pearson r
    between the residuals of ``estimated`` and of ``planted`` after a least-squares fit of each on ``control``
    (with an intercept). What r is left once everything ``control`` explains is taken out of both maps; when
    ``estimated = local + a * control`` it equals the partial r of ``local`` alone, whatever ``a``.

    Raises ValueError like :func:`map_correlation`, and when a map is (numerically) a multiple of ``control``
    (nothing is left of it beyond the control)."""
    a, b, c = _masked_triple("partial_map_correlation", estimated, planted, control, mask)
    residuals = []
    for m in (a, b):
        m = m - m.mean()
        r = m - (m @ c) / (c @ c) * c
        if np.linalg.norm(r) <= 1e-10 * np.linalg.norm(m):
            raise ValueError("partial_map_correlation: a map is a multiple of the control map; nothing is left")
        residuals.append(r)
    ra, rb = residuals
    return float(ra @ rb / (np.linalg.norm(ra) * np.linalg.norm(rb)))


def size_free_map_correlation(estimated: np.ndarray, planted: np.ndarray, control: np.ndarray,
                              mask: np.ndarray | None = None) -> float:
    """Semipartial correlation of two ``(X, Y, Z)`` maps given a third, over the voxels of ``mask``: Pearson r
    between ``estimated`` as it is and the residual of ``planted`` after a least-squares fit on ``control``
    (with an intercept). How well a direction's whole change renders the part of the planted effect that
    ``control`` (a global rescaling) does not explain. Unlike :func:`partial_map_correlation`, a component
    along ``control`` in ``estimated`` is not forgiven: ``local_perp + a * control`` scores
    ``1 / sqrt(1 + a^2 var(control) / var(local_perp))``, highest at ``a = 0``.

    Raises ValueError like :func:`partial_map_correlation`."""
    a, b, c = _masked_triple("size_free_map_correlation", estimated, planted, control, mask)
    a, b = a - a.mean(), b - b.mean()
    rb = b - (b @ c) / (c @ c) * c
    if np.linalg.norm(rb) <= 1e-10 * np.linalg.norm(b):
        raise ValueError("size_free_map_correlation: the planted map is a multiple of the control map; nothing "
                         "is left of it")
    return float(a @ rb / (np.linalg.norm(a) * np.linalg.norm(rb)))


# The map comparisons that take a global-size map as reference, by the suffix of their metric names
# (``<map>_map_r<suffix>``; the plain r, map_correlation, has none). One table for the stage's checks
# (experiment.ground_truth_checks), their refit intervals (refit.py) and the headline keys.
SIZE_REFERENCE_MEASURES = {"_beyond_size": partial_map_correlation, "_size_free": size_free_map_correlation}
MAP_MEASURE_SUFFIXES = ("", *SIZE_REFERENCE_MEASURES)


def effect_maps(volumes: np.ndarray, design: pd.DataFrame) -> dict[str, np.ndarray]:
    """Voxel-wise least-squares coefficient maps of ``volumes (N, X, Y, Z)`` on the columns of ``design``
    (``N`` rows; an intercept is added): ``{column: (X, Y, Z) map}``, each the change per unit of that column
    with the others held fixed (e.g. sex at fixed brain volume and age group)."""
    volumes = np.asarray(volumes, np.float64)
    if volumes.ndim != 4 or len(volumes) != len(design):
        raise ValueError(f"effect_maps: expected volumes (N, X, Y, Z) with N = {len(design)} design rows, "
                         f"got {volumes.shape}")
    x = design.to_numpy(np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"effect_maps: design columns {list(design.columns)} must be finite numbers")
    x = np.column_stack([np.ones(len(x)), x])
    if np.linalg.matrix_rank(x) < x.shape[1]:
        raise ValueError(f"effect_maps: design columns {list(design.columns)} are collinear (or constant)")
    coef = np.linalg.lstsq(x, volumes.reshape(len(volumes), -1), rcond=None)[0]
    return {name: coef[i + 1].reshape(volumes.shape[1:]) for i, name in enumerate(design.columns)}


def effect_agreement(summary: pd.DataFrame, quantity: str, expected_sign: int) -> dict[str, float]:
    """Compare a traversal's measured change of ``quantity`` with the planted sign (+1 grows, -1 shrinks).

    ``summary``: ``TraversalEffects.summary``. Returns ``sign_correct`` (1.0/0.0), ``monotonicity``
    (mean Spearman times the expected sign: +1 is a perfect, correctly signed trend) and ``change_per_sd``.
    """
    if expected_sign not in (-1, 1):
        raise ValueError(f"expected_sign must be +1 or -1, got {expected_sign!r}")
    if quantity not in summary.index:
        raise ValueError(f"traversal summary has no quantity {quantity!r}; have {list(summary.index)}")
    row = summary.loc[quantity]
    change = float(row["change_per_sd"])
    return {
        "sign_correct": float(np.sign(change) == expected_sign),
        "monotonicity": float(row["mean_spearman"]) * expected_sign,
        "change_per_sd": change,
        "relative_change": float(row["relative_change"]),
    }


# The planted effects along the positive end (older) of the age directions (docs/synthetic_cohort.md).
PLANTED_AGE_SIGNS: dict[str, int] = {"ventricle_volume_mm3": +1, "gm_volume_mm3": -1}


def ground_truth_metrics(
    difference_map: np.ndarray | None = None,
    planted_map: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    summary: pd.DataFrame | None = None,
    expected_signs: dict[str, int] | None = None,
) -> dict[str, float]:
    """Flat ground-truth metrics for one direction: ``map_correlation`` and ``<quantity>.<check>``."""
    out: dict[str, float] = {}
    if difference_map is not None and planted_map is not None:
        out["map_correlation"] = map_correlation(difference_map, planted_map, mask)
    if summary is not None:
        for quantity, sign in (expected_signs or {}).items():
            for key, value in effect_agreement(summary, quantity, sign).items():
                out[f"{quantity}.{key}"] = value
    return out
