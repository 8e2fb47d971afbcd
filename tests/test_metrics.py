"""Known-case tests of the reconstruction, generative and anatomical metrics and of the registry."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from monai.metrics.fid import get_fid_score

from brainlatent.metrics import anatomical, generative, reconstruction
from brainlatent.metrics.registry import METRIC_DIRECTIONS, METRICS, compute_metrics, is_better, metric_direction
from brainlatent.models.featurenet import AttributePredictions

SHAPE = (16, 16, 16)


@pytest.fixture(autouse=True)
def _few_threads():
    # Other test files run beside these on a 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def blobs(n: int, seed: int, shape=SHAPE) -> torch.Tensor:
    """(n, 1, *shape) smooth random volumes in [0, 1]: one Gaussian blob each at a random place and size."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    out = []
    for _ in range(n):
        c = rng.uniform(4, np.asarray(shape) - 4)
        width = rng.uniform(2.0, 4.0)
        d2 = ((grid - c[:, None, None, None]) ** 2).sum(0)
        out.append(np.exp(-d2 / (2 * width**2)))
    return torch.tensor(np.stack(out)[:, None], dtype=torch.float32)


def features(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim))


# ------------------------------------------------------------------------------------- reconstruction
def test_identical_volumes_have_zero_error_infinite_psnr_unit_ssim():
    x = blobs(3, 0)
    per = reconstruction.reconstruction_per_volume(x, x)
    assert per["mse"].shape == (3,)
    np.testing.assert_allclose(per["mse"], 0.0)
    assert np.all(np.isinf(per["psnr"])) and np.all(per["psnr"] > 0)
    np.testing.assert_allclose(per["ssim"], 1.0, atol=1e-6)
    assert reconstruction.mse(x, x) == {"mse": 0.0}
    assert reconstruction.ssim(x, x)["ssim"] == pytest.approx(1.0, abs=1e-6)


def test_noise_lowers_psnr_and_ssim_monotonically():
    x = blobs(3, 1)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    results = [reconstruction.reconstruction_per_volume((x + sd * noise).clamp(0, 1), x) for sd in (0.01, 0.05, 0.2)]
    psnr = [r["psnr"].mean() for r in results]
    ssim = [r["ssim"].mean() for r in results]
    mse = [r["mse"].mean() for r in results]
    assert psnr[0] > psnr[1] > psnr[2]
    assert 1.0 > ssim[0] > ssim[1] > ssim[2]
    assert 0.0 < mse[0] < mse[1] < mse[2]
    # PSNR is 10 log10(1 / MSE) per volume (data_range 1).
    np.testing.assert_allclose(results[1]["psnr"], -10 * np.log10(results[1]["mse"]), rtol=1e-4)


def test_reconstruction_rejects_bad_shapes():
    x = blobs(2, 0)
    with pytest.raises(ValueError, match="same shape"):
        reconstruction.mse(x, x[:1])
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y, Z\)"):
        reconstruction.psnr(x[:, 0], x[:, 0])
    with pytest.raises(ValueError, match="too small"):
        reconstruction.ssim(torch.zeros(1, 1, 5, 5, 5), torch.zeros(1, 1, 5, 5, 5))


# ------------------------------------------------------------------------------------------ FID / KID / MMD
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # MONAI passes scipy's deprecated disp=
def test_fid_matches_monai_on_well_conditioned_features():
    a, b = features(300, seed=0), features(300, seed=1) * 1.3 + 0.2
    ours = generative.fid(a, b)["fid"]
    assert ours == pytest.approx(float(get_fid_score(torch.tensor(a), torch.tensor(b))), rel=1e-6)


def test_fid_is_zero_for_identical_sets_and_stable_when_rank_deficient():
    a = features(20, dim=32)  # fewer vectors than dimensions: singular covariances
    assert generative.fid(a, a)["fid"] == pytest.approx(0.0, abs=1e-8)
    assert np.isfinite(generative.fid(a, features(20, dim=32, seed=5))["fid"])


def test_fid_of_a_pure_mean_shift_is_the_squared_shift():
    a = features(50)
    delta = np.full(a.shape[1], 0.5)
    assert generative.fid(a + delta, a)["fid"] == pytest.approx(float(delta @ delta), rel=1e-6)


@pytest.mark.parametrize("metric,key", [("kid", "kid_mean"), ("mmd", "mmd_rbf"), ("fid", "fid")])
def test_distances_grow_monotonically_with_the_shift(metric, key):
    real = features(60, seed=0)
    sample = features(60, seed=1)  # same distribution, independent draw
    direction = np.ones(real.shape[1]) / np.sqrt(real.shape[1])
    values = [
        compute_metrics([metric], sample_features=sample + t * direction, real_features=real, seed=0)[key]
        for t in (0.0, 0.5, 1.0, 2.0, 4.0)
    ]
    assert all(lo < hi for lo, hi in zip(values, values[1:])), values
    # A same-distribution draw scores near zero next to a clearly shifted one.
    assert abs(values[0]) < 0.2 * values[3]


def test_kid_and_mmd_are_near_zero_for_identical_sets():
    a = features(40)
    k = generative.kid(a, a, n_subsets=10, subset_size=30, seed=0)
    shifted = generative.kid(a + 1.0, a, n_subsets=10, subset_size=30, seed=0)
    # Subsets of one set share points, which biases the unbiased estimator slightly negative.
    assert -0.1 * shifted["kid_mean"] < k["kid_mean"] <= 0.0
    assert k["kid_std"] >= 0
    m = generative.mmd_rbf(a, a)
    # For identical sets the unbiased estimate is -2 (1 - mean k) / (m - 1): O(1/m) and <= 0 (k <= 1).
    assert -2.0 / (len(a) - 1) <= m["mmd_rbf"] <= 0.0
    assert abs(m["mmd_rbf"]) < 0.1 * generative.mmd_rbf(a + 1.0, a)["mmd_rbf"]
    # Bandwidth: the median pairwise distance among the real features.
    from scipy.spatial.distance import pdist

    assert m["mmd_rbf_bandwidth"] == pytest.approx(float(np.median(pdist(a))))


def test_kid_is_deterministic_given_the_seed():
    a, b = features(50, seed=0), features(50, seed=1) + 0.3
    assert generative.kid(a, b, n_subsets=5, subset_size=20, seed=3) == generative.kid(
        a, b, n_subsets=5, subset_size=20, seed=3
    )
    assert generative.kid(a, b, n_subsets=5, subset_size=20, seed=3) != generative.kid(
        a, b, n_subsets=5, subset_size=20, seed=4
    )


def test_feature_metrics_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="same feature dimension"):
        generative.fid(features(10, 8), features(10, 4))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        generative.kid(np.zeros(10), features(10))
    with pytest.raises(ValueError, match="at least 2"):
        generative.mmd_rbf(features(1), features(10))


# -------------------------------------------------------------------------------------------- MS-SSIM
def test_ms_ssim_of_a_volume_with_itself_is_one_and_identical_samples_have_zero_diversity():
    x = blobs(4, 2)
    np.testing.assert_allclose(generative.ms_ssim(x, x).numpy(), 1.0, atol=1e-6)
    same = x[:1].repeat(5, 1, 1, 1, 1)
    out = generative.ms_ssim_diversity(same, x)
    assert out["ms_ssim_diversity_samples"] == pytest.approx(0.0, abs=1e-6)
    assert out["ms_ssim_diversity_real"] > 0.05
    assert out["ms_ssim_diversity_gap"] == pytest.approx(out["ms_ssim_diversity_real"], abs=1e-6)


def test_ms_ssim_diversity_is_higher_for_more_varied_sets():
    base = blobs(1, 3).repeat(6, 1, 1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    slightly = (base + 0.02 * torch.randn(base.shape, generator=gen)).clamp(0, 1)
    varied = blobs(6, 4)
    assert generative.ms_ssim_diversity_of(slightly) < generative.ms_ssim_diversity_of(varied)


@pytest.mark.parametrize(
    "shape,scales,kernel",
    [((16, 16, 16), 2, 7), ((32, 40, 32), 3, 7), ((64, 80, 64), 4, 7), ((128, 128, 128), 5, 7), ((176,) * 3, 5, 11)],
)
def test_ms_ssim_settings_fit_the_volume(shape, scales, kernel):
    s = generative.ms_ssim_settings(shape)
    assert (s.n_scales, s.kernel_size) == (scales, kernel)
    assert sum(s.weights) == pytest.approx(1.0)
    # The coarsest scale still holds a whole window, so MONAI can compute it.
    assert min(shape) // 2 ** (scales - 1) >= kernel


def test_ms_ssim_on_anisotropic_default_shape_runs():
    x = blobs(2, 5, shape=(32, 40, 32))
    assert generative.ms_ssim(x, x).numpy() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert 0.0 < generative.ms_ssim_diversity_of(x) <= 1.0


def test_ms_ssim_rejects_tiny_volumes():
    with pytest.raises(ValueError, match="too small"):
        generative.ms_ssim_settings((4, 40, 32))
    # Down to one scale (plain SSIM) before giving up.
    assert generative.ms_ssim_settings((8, 8, 8)).n_scales == 1


# ----------------------------------------------------------------------------------------- anatomical
def _measures(n: int, seed: int, scale: float = 1.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "brain_volume_mm3": rng.normal(1.2e6, 1e5, n) * scale,
            "ventricle_volume_mm3": rng.normal(2e4, 4e3, n) * scale,
        }
    )


def test_measure_distances_known_cases():
    real = _measures(200, 0)
    same = anatomical.measure_distances(real, real)
    assert same["anat_brain_volume_mm3_w1_norm"] == 0.0 and same["anat_brain_volume_mm3_ks"] == 0.0
    assert same["anat_ventricle_volume_mm3_mean_ratio"] == 1.0
    near = anatomical.measure_distances(_measures(200, 1), real)
    far = anatomical.measure_distances(_measures(200, 1, scale=1.2), real)
    assert near["anat_w1_norm_mean"] < far["anat_w1_norm_mean"]
    assert near["anat_ks_mean"] < far["anat_ks_mean"]
    assert far["anat_brain_volume_mm3_mean_ratio"] == pytest.approx(1.2, rel=0.03)
    # W1 of a pure shift is the shift; normalised by the real SD.
    shifted = real.assign(brain_volume_mm3=real["brain_volume_mm3"] + 5e4)
    expected = 5e4 / real["brain_volume_mm3"].std(ddof=1)
    assert anatomical.measure_distances(shifted, real)["anat_brain_volume_mm3_w1_norm"] == pytest.approx(expected)


def test_measure_distances_errors_name_the_column():
    real = _measures(10, 0)
    with pytest.raises(ValueError, match="ventricle_volume_mm3"):
        anatomical.measure_distances(real[["brain_volume_mm3"]], real)
    with pytest.raises(ValueError, match="constant"):
        anatomical.measure_distances(real, real.assign(brain_volume_mm3=1.0))


def test_anatomical_plausibility_with_a_measure_function():
    def total_intensity(volumes, grid):
        v = np.asarray(volumes, dtype=np.float64)
        return pd.DataFrame({"mass": v.reshape(len(v), -1).sum(1) * grid})

    reals = blobs(12, 6).numpy()
    out = anatomical.anatomical_plausibility(reals, reals, grid=2.0, measure_fn=total_intensity)
    assert out["anat_mass_w1_norm"] == 0.0
    brighter = anatomical.anatomical_plausibility(reals * 0.5, reals, grid=2.0, measure_fn=total_intensity)
    assert brighter["anat_mass_mean_ratio"] == pytest.approx(0.5)


def test_anatomical_plausibility_defaults_to_brainlatent_anatomy():
    pytest.importorskip("brainlatent.anatomy")
    from brainlatent.grid import Grid

    grid = Grid.box((16, 20, 16), (160.0, 200.0, 160.0), (0.0, -18.0, 18.0))
    reals = blobs(4, 9, shape=grid.shape)  # (N, 1, X, Y, Z) tensors, as the models produce
    same = anatomical.anatomical_plausibility(reals, reals, grid)
    assert {"anat_brain_volume_mm3_w1_norm", "anat_ventricle_volume_mm3_ks", "anat_w1_norm_mean"} <= set(same)
    assert same["anat_brain_volume_mm3_w1_norm"] == 0.0
    assert anatomical.anatomical_plausibility(reals * 0.5, reals, grid)["anat_brain_volume_mm3_w1_norm"] > 0


def test_attribute_distances():
    real = AttributePredictions(
        p_male=np.array([0.9, 0.2, 0.8, 0.1]), age_probs=np.eye(4)[[0, 1, 2, 3]] * 0.7 + 0.075
    )
    same = anatomical.attribute_distances(real, real)
    assert same["frac_male_real"] == 0.5 and same["frac_male_abs_diff"] == 0.0 and same["age_group_tv"] == 0.0
    assert same["mean_age_group_real"] == pytest.approx(1.5)
    all_male_young = AttributePredictions(p_male=np.full(4, 0.99), age_probs=np.tile([0.9, 0.1, 0.0, 0.0], (4, 1)))
    out = anatomical.attribute_distances(all_male_young, real)
    assert out["frac_male_samples"] == 1.0 and out["frac_male_abs_diff"] == 0.5
    assert out["mean_age_group_samples"] == 0.0
    assert out["age_group_tv"] == pytest.approx(0.75)  # histograms [1,0,0,0] vs [.25,.25,.25,.25]


# ------------------------------------------------------------------------------------------- registry
def test_every_registered_metric_runs_and_every_direction_is_produced():
    x = blobs(8, 7)  # the sample-quality metrics need >= quality.MIN_VOLUMES volumes per set
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        reconstructions=(x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1),
        targets=x,
        sample_features=features(30, seed=1),
        real_features=features(30, seed=2),
        samples=blobs(8, 8),
        reals=x,
        sample_measures=_measures(30, 1),
        real_measures=_measures(30, 2),
        sample_predictions=AttributePredictions(np.linspace(0, 1, 6), np.full((6, 4), 0.25)),
        real_predictions=AttributePredictions(np.linspace(1, 0, 6), np.eye(4)[[0, 1, 2, 3, 0, 1]]),
        seed=0,
        n_subsets=5,
    )
    out = compute_metrics(METRICS, **inputs)
    assert set(METRIC_DIRECTIONS) <= set(out)
    assert all(isinstance(v, float) for v in out.values())
    for key in out:
        if key.endswith(("_w1_norm", "_ks")):
            assert metric_direction(key) == "min"


def test_compute_metrics_reports_missing_and_stray_inputs():
    with pytest.raises(ValueError, match="needs input"):
        compute_metrics(["fid"], sample_features=features(5))
    with pytest.raises(ValueError, match="not used by any metric"):
        compute_metrics(["fid"], sample_features=features(5), real_features=features(5), sead=1)
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["fdi"])


def test_directions_and_is_better():
    assert metric_direction("fid") == "min" and metric_direction("psnr") == "max"
    assert is_better("fid", 1.0, 2.0) and not is_better("fid", 2.0, 1.0)
    assert is_better("ssim", 0.9, 0.8) and not is_better("ssim", 0.8, 0.8)
    assert is_better("fid", 3.0, None) and is_better("fid", 3.0, math.nan) and not is_better("fid", math.nan, 3.0)
    with pytest.raises(ValueError, match="no direction"):
        metric_direction("kid_std")
