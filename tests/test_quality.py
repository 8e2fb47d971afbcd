"""Sample-quality metrics (C2ST, in-head intensity distance, tissue fractions, density / coverage) on the
project's synthetic cohort at a small size: deliberately bad generators rank below held-out real scans on
every rankable number, in two contrasts, and real-vs-real sits near the ideal."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from scipy import ndimage

from brainlatent.config import SynthConfig
from brainlatent.data import synthetic
from brainlatent.data.preprocess import preprocess_image
from brainlatent.metrics import quality
from brainlatent.metrics.registry import compute_metrics, is_better, metric_direction

# The default processing grid (24 x 32 x 24 voxels of ~7 mm) on a small cohort rendered at 6 mm.
SHAPE, FOV = (24, 32, 24), (176.0, 224.0, 176.0)
N_REF = N_SET = 20
RANKED = ("c2st_auc", "intensity_w1", "tissue_tv", "density_gap", "coverage")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> np.ndarray:
    """(40, 24, 32, 24) processed volumes of synthetic subjects, every nuisance switched on."""
    cfg = SynthConfig(n_subjects=2 * N_REF, voxel_mm=6.0, workers=1, seed=11)
    root = synthetic.synthesize(cfg, tmp_path_factory.mktemp("quality") / "cohort", progress=False)
    subjects = pd.read_csv(root / "ground_truth.csv").Subject
    image = "T1w/T1w_acpc_dc_restore_brain.nii.gz"
    return np.stack([preprocess_image(root / str(s) / image, SHAPE, FOV)[0] for s in subjects]).astype(np.float32)


def _contrast(volumes: np.ndarray, kind: str) -> np.ndarray:
    """The cohort as scanned with another T1 contrast: a power law that darkens grey matter against white
    matter, times a smooth left-right bias field. Nothing in the metrics may assume the template's levels."""
    if kind == "template":
        return volumes
    bias = np.linspace(0.85, 1.1, volumes.shape[1])[None, :, None, None]
    return np.clip(volumes**1.8 * bias, 0.0, 1.0).astype(np.float32)


def _bad_generators(good: np.ndarray, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = good.shape[1:]
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    blobs = np.zeros((n, *shape), np.float32)
    for i in range(n):  # GAN-like failure: a few saturated white blobs inside the box
        for _ in range(3):
            centre = rng.uniform(0.3, 0.7, 3) * np.asarray(shape)
            radius = rng.uniform(3.0, 7.0)
            blobs[i] = np.maximum(blobs[i], (((grid - centre[:, None, None, None]) ** 2).sum(0) < radius**2))
    return {
        "noise": rng.random((n, *shape), dtype=np.float32),
        "saturated blobs": blobs,
        "one scan blurred, repeated": np.repeat(ndimage.gaussian_filter(good[0], 1.5)[None], n, axis=0),
    }


@pytest.fixture(scope="module", params=["template", "other contrast"])
def scored(request, cohort) -> dict[str, dict[str, float]]:
    volumes = _contrast(cohort, request.param)
    reals, good = volumes[:N_REF], volumes[N_REF:]
    ref = quality.QualityReference(reals)
    sets = {"held-out real scans": good, **_bad_generators(good, N_SET, seed=0)}
    return {name: ref.score(v, seed=0) for name, v in sets.items()}


@pytest.mark.parametrize("bad", ["noise", "saturated blobs", "one scan blurred, repeated"])
def test_every_bad_generator_ranks_below_real_scans_on_every_number(scored, bad):
    good = scored["held-out real scans"]
    for key in RANKED:
        assert is_better(key, good[key], scored[bad][key]), (bad, key, good[key], scored[bad][key])
    # Not merely ranked: the classifier tells them apart almost always, and none covers real scans.
    assert scored[bad]["c2st_auc"] > 0.9
    assert scored[bad]["coverage"] <= 0.3


def test_real_versus_real_sits_near_the_ideal(scored):
    good = scored["held-out real scans"]
    # Tolerances from the real-vs-real spread over 25 random splits of the embedded cohort's 160 scans into
    # groups of 16 (benchmarks/bench_quality.py): C2ST AUC 0.51 +- 0.13, intensity_w1 0.015 +- 0.009,
    # tissue_tv 0.029 +- 0.018, coverage 0.97 +- 0.08, density 1.03 +- 0.23. About 2.5 SD each; every bad
    # generator above lies far outside (AUC > 0.9, coverage <= 0.3).
    assert abs(good["c2st_auc"] - 0.5) < 0.33
    assert good["intensity_w1"] < 0.04  # in [0, 1] intensity units
    assert good["tissue_tv"] < 0.075
    assert good["coverage"] >= 0.75
    assert 0.45 < good["density"] < 1.6


# ------------------------------------------------------------------------------------------- pieces
def test_c2st_sees_a_variance_difference_a_linear_model_cannot():
    rng = np.random.default_rng(0)
    reals = rng.normal(size=(40, 5))
    collapsed = rng.normal(scale=0.05, size=(40, 5))  # same mean, almost no spread: mode collapse
    once = dict(n_repeats=1)  # one 4-fold cross-validation is enough for these clear cases
    assert quality.c2st(collapsed, reals, seed=0, **once)["c2st_auc"] > 0.85
    same = rng.normal(size=(40, 5))
    assert abs(quality.c2st(same, reals, seed=0, **once)["c2st_auc"] - 0.5) < 0.2
    assert quality.c2st(same + 1.5, reals, seed=0, **once)["c2st_auc"] > 0.9
    assert quality.c2st(same, reals, seed=0, **once) == quality.c2st(same, reals, seed=0, **once)
    assert quality.c2st(same, reals, seed=1, **once) != quality.c2st(same, reals, seed=0, **once)  # seed used


def test_density_and_coverage_on_known_points():
    reals = np.arange(10, dtype=float)[:, None]  # 0..9 on a line: with k=2 the end balls have radius 2,
    near = np.array([[0.0], [0.0], [9.0], [4.5]])  # the others radius 1
    out = quality.density_coverage(near, reals, k=2)
    # 0 lies in the balls of 0 and 1 (not 2: distance 2 > 1); 9 in those of 8 and 9; 4.5 in those of 4 and 5.
    assert out["coverage"] == pytest.approx(6 / 10)
    assert out["density"] == pytest.approx((2 + 2 + 2 + 2) / 4 / 2)
    assert quality.density_coverage(np.full((4, 1), 100.0), reals, k=2) == {"density": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError, match="more than 5 real scans"):
        quality.density_coverage(reals, reals[:5], k=5)


def test_intensity_w1_matches_scipy_on_pooled_voxels(cohort):
    reals, samples = cohort[:10], np.clip(cohort[10:20] * 1.1, 0, 1)
    mask = quality.head_mask(reals)
    expected = scipy.stats.wasserstein_distance(samples[:, mask].ravel(), reals[:, mask].ravel())
    assert quality.intensity_w1(samples, reals, mask) == pytest.approx(expected, rel=0.02, abs=1e-4)


def test_head_mask_holds_the_dark_ventricles_and_excludes_the_background(cohort):
    mask = quality.head_mask(cohort[:N_REF])
    centre = tuple(s // 2 for s in SHAPE)
    assert mask[centre] and not mask[0, 0, 0] and not mask[-1, -1, -1]
    assert not ndimage.binary_fill_holes(mask)[~mask].any()  # no holes left
    assert 0.2 < mask.mean() < 0.7


@pytest.mark.parametrize("kind", ["template", "other contrast"])
def test_tissue_classes_follow_the_cohorts_own_intensities(cohort, kind):
    reals = _contrast(cohort[:N_REF], kind)
    mask = quality.head_mask(reals)
    low, high = quality.tissue_thresholds(reals, mask)
    fractions = quality.tissue_fractions(reals, mask, np.array([low, high]))
    np.testing.assert_allclose(fractions.sum(1), 1.0)
    assert (fractions > 0.02).all()  # three populated classes in every scan
    # Thresholds sit between the dark and bright tails of this contrast, not at fixed template levels.
    inside = reals[:, mask]
    assert np.percentile(inside, 5) < low < high < np.percentile(inside, 95)


def test_inputs_layouts_determinism_and_errors(cohort):
    reals, samples = cohort[:8], cohort[8:16]
    a = quality.sample_quality(samples, reals, seed=3)
    assert set(RANKED) <= set(a) and all(np.isfinite(v) for v in a.values())
    # The registry's entry takes the evaluation's (N, 1, X, Y, Z) tensors and gives the same numbers.
    as_tensors = dict(samples=torch.from_numpy(samples)[:, None], reals=torch.from_numpy(reals)[:, None])
    assert compute_metrics(["quality"], **as_tensors, seed=3) == a
    with pytest.raises(ValueError, match="reals: need at least 8 volumes"):
        quality.sample_quality(samples, reals[:7], seed=0)
    with pytest.raises(ValueError, match="samples: need at least 8 volumes"):
        quality.sample_quality(samples[:7], reals, seed=0)
    with pytest.raises(ValueError, match=r"samples: expected volumes of shape \(N, X, Y, Z\)"):
        quality.sample_quality(samples[:, None, None], reals, seed=0)
    with pytest.raises(ValueError, match="differs from the reals'"):
        quality.sample_quality(samples[:, :-1], reals, seed=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        quality.sample_quality(np.where(samples > 0.5, np.nan, samples), reals, seed=0)


def test_registry_ranks_the_new_keys():
    assert [metric_direction(k) for k in RANKED] == ["min", "min", "min", "min", "max"]
    for key in ("c2st_auc_std", "density", "tissue_dark_frac"):
        with pytest.raises(ValueError, match="no direction"):
            metric_direction(key)
