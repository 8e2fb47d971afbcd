"""Traversals through tiny linear decoders: difference maps, measured effects, re-encoding, figures."""

from __future__ import annotations

import functools

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import torch

from brainlatent.directions import (
    Direction, ProbeSettings, effect_agreement, effect_maps, ground_truth_metrics, group_difference_map,
    make_probe, map_correlation, symmetric_steps, traversal_effects, traverse,
)
from brainlatent.grid import Grid
from brainlatent.viz.traversal import save_difference_map, save_traversal_gif, save_traversal_strip

SHAPE = (8, 10, 6)
DIM = 5


class LinearDecoder:
    """x = 0.5 + pattern * (v . z) + R (I - v v^T) z: only the v-component of z drives ``pattern``."""

    def __init__(self, v: np.ndarray, seed: int = 0):
        rng = np.random.default_rng(seed)
        n_vox = int(np.prod(SHAPE))
        pattern = np.zeros(SHAPE)
        pattern[2:5, 3:7, 1:4] = 0.02  # a "ventricle" that grows along +v
        pattern[5:7, 0:3, 3:6] = -0.01
        self.pattern = pattern
        other = 0.005 * rng.normal(size=(n_vox, DIM)) @ (np.eye(DIM) - np.outer(v, v))
        self.W = torch.tensor(np.outer(pattern.ravel(), v) + other, dtype=torch.float32)  # (V, L)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (0.5 + z @ self.W.T).reshape(len(z), 1, *SHAPE)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.lstsq(self.W, (x.reshape(len(x), -1) - 0.5).T).solution.T


def _direction(seed: int = 0) -> Direction:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=DIM)
    return Direction("age_old", v / np.linalg.norm(v), step_sd=2.0, center=0.0, positive="older")


def _latents(n: int, seed: int = 1) -> np.ndarray:
    return 0.5 * np.random.default_rng(seed).normal(size=(n, DIM))


def ventricle_measure(volumes: np.ndarray, region: np.ndarray) -> pd.DataFrame:
    """A measure linear in the intensities: summed intensity of a region (stand-in for anatomy.measure_volumes)."""
    return pd.DataFrame({"ventricle_volume_mm3": volumes[:, region].sum(axis=1),
                         "constant": np.ones(len(volumes))})


def test_effect_maps_separate_planted_effects_of_correlated_labels():
    """Volumes = base + sex * local + size * global + age * age_map + noise, with sex and size correlated (as
    in a cohort): each coefficient map is its own planted map, the one of sex free of the size effect."""
    rng = np.random.default_rng(0)
    n = 120
    planted = {k: rng.normal(size=SHAPE) for k in ("sex", "size", "age")}
    sex = rng.integers(0, 2, n).astype(float)
    design = pd.DataFrame({"sex": sex, "size": 1.5 * sex + rng.normal(size=n), "age": rng.integers(0, 4, n)})
    volumes = 0.5 + rng.normal(scale=0.05, size=(n, *SHAPE))
    for k, m in planted.items():
        volumes += design[k].to_numpy()[:, None, None, None] * 0.1 * m
    maps = effect_maps(volumes, design)
    assert set(maps) == {"sex", "size", "age"}
    for k, m in planted.items():
        assert maps[k].shape == SHAPE
        assert map_correlation(maps[k], m) > 0.95
    # Without size in the model, the sex map absorbs the size effect: why the benchmark controls for it.
    assert map_correlation(effect_maps(volumes, design[["sex", "age"]])["sex"], planted["size"]) > 0.5


def test_effect_maps_reject_bad_designs():
    volumes = np.zeros((6, *SHAPE))
    with pytest.raises(ValueError, match="N = 5 design rows"):
        effect_maps(volumes, pd.DataFrame({"sex": [0, 1, 0, 1, 0]}))
    with pytest.raises(ValueError, match="collinear"):
        effect_maps(volumes, pd.DataFrame({"sex": [0, 1, 0, 1, 0, 1], "male": [0, 2, 0, 2, 0, 2]}))
    with pytest.raises(ValueError, match="finite"):
        effect_maps(volumes, pd.DataFrame({"sex": [0, 1, np.nan, 1, 0, 1]}))


def test_difference_map_of_a_linear_decoder_is_its_image_of_the_direction():
    d = _direction()
    dec = LinearDecoder(d.vector)
    steps = symmetric_steps(3.0, 7)
    trav = traverse(_latents(4), d, steps, dec.decode, batch_size=5)  # 28 codes: batches do not divide evenly
    assert trav.shape == (4, 7, *SHAPE) and trav.dtype == np.float32
    dm = group_difference_map(trav, 0, -1)
    # decode(z + t sd v) - decode(z - t sd v) = W v * (span * sd), with W v = pattern.
    expected = dec.pattern * (steps[-1] - steps[0]) * d.step_sd
    np.testing.assert_allclose(dm.mean_difference, expected, atol=1e-5)
    assert dm.n_subjects == 4 and (dm.step_lo, dm.step_hi) == (0, 6)
    assert np.all(dm.t_statistic == 0)  # identical change in every subject: no spread, t undefined -> 0
    assert map_correlation(dm.mean_difference, dec.pattern) == pytest.approx(1.0, abs=1e-6)
    mask = dec.pattern != 0
    assert map_correlation(-dm.mean_difference, dec.pattern, mask) == pytest.approx(-1.0, abs=1e-6)
    grid = Grid.box(SHAPE, (16.0, 20.0, 12.0), (0.0, -10.0, 5.0))
    images = dm.to_nifti(grid)
    assert images["t_statistic"].shape == SHAPE
    np.testing.assert_array_equal(images["mean_difference"].affine, grid.affine)


def test_paired_t_map_follows_subject_consistent_changes():
    rng = np.random.default_rng(2)
    trav = rng.normal(0.5, 0.01, size=(6, 3, *SHAPE))
    trav[:, 2, :2] += 0.2  # every subject brighter at the last step in one slab
    trav[:, :, 5:] = 0.3  # constant background
    dm = group_difference_map(trav, step_lo=0, step_hi=2)
    assert dm.t_statistic[:2].min() > 5
    assert np.all(dm.t_statistic[5:] == 0)  # undefined t (no variance) is written as 0, never NaN
    with pytest.raises(ValueError, match=">= 2 subjects"):
        group_difference_map(trav[:1])
    with pytest.raises(ValueError, match="two different indices"):
        group_difference_map(trav, 1, 1)


def test_effects_monotonicity_reencoding_and_predictions():
    d = _direction()
    dec = LinearDecoder(d.vector)
    steps = symmetric_steps(2.0, 5)
    z = _latents(30, seed=3)
    # A probe whose label depends on the direction: re-encoded traversals must raise P(older) monotonically.
    y = (z @ d.vector + 0.1 * np.random.default_rng(4).normal(size=30) > 0).astype(np.int64)
    probe = make_probe("binary", "latent", ProbeSettings(C=1.0)).fit(z, y)
    region = dec.pattern > 0
    effects = traversal_effects(
        traverse(z[:3], d, steps, dec.decode), steps,
        measure=functools.partial(ventricle_measure, region=region),
        encode=dec.encode, probe=probe,
        predict=lambda x: x[:, 0][:, torch.from_numpy(region)].mean(1),
        subject_ids=["a", "b", "c"],
    )
    table = effects.per_step
    assert len(table) == 15 and list(table["subject"][:5]) == ["a"] * 5
    np.testing.assert_allclose(table["step_sd"][:5], steps)
    summary = effects.summary
    assert summary.loc["ventricle_volume_mm3", "mean_spearman"] == pytest.approx(1.0)
    # Linear in the step: slope = summed pattern * step_sd per SD.
    assert summary.loc["ventricle_volume_mm3", "change_per_sd"] == pytest.approx(
        dec.pattern[region].sum() * d.step_sd, rel=1e-4)
    assert summary.loc["probe_output", "mean_spearman"] == pytest.approx(1.0)
    assert summary.loc["predicted", "mean_spearman"] == pytest.approx(1.0)
    assert summary.loc["constant", "n_constant"] == 3 and np.isnan(summary.loc["constant", "mean_spearman"])

    gt = ground_truth_metrics(summary=summary, expected_signs={"ventricle_volume_mm3": +1})
    assert gt["ventricle_volume_mm3.sign_correct"] == 1.0
    assert gt["ventricle_volume_mm3.monotonicity"] == pytest.approx(1.0)
    assert gt["ventricle_volume_mm3.change_per_sd"] == summary.loc["ventricle_volume_mm3", "change_per_sd"]
    wrong = effect_agreement(summary, "ventricle_volume_mm3", expected_sign=-1)
    assert wrong["sign_correct"] == 0.0 and wrong["monotonicity"] == pytest.approx(-1.0)
    metrics = effects.flat_metrics("age_old")
    assert metrics["age_old.probe_output.monotonicity"] == pytest.approx(1.0)


def test_bad_decoder_output_is_reported():
    d = _direction()
    with pytest.raises(ValueError, match=r"decode must return \(B, 1, X, Y, Z\)"):
        traverse(_latents(2), d, symmetric_steps(1.0, 3), lambda z: torch.zeros(len(z), *SHAPE))


def test_figures_are_written(tmp_path):
    d = _direction()
    dec = LinearDecoder(d.vector)
    steps = symmetric_steps(3.0, 5)
    trav = traverse(_latents(2), d, steps, dec.decode)
    strip = save_traversal_strip(trav[0], steps, tmp_path / "strip.png", title="age_old", voxel_mm=(2, 2, 2))
    gif = save_traversal_gif(trav[0], steps, tmp_path / "anim" / "age_old.gif", title="age_old")
    diff = save_difference_map(group_difference_map(trav).mean_difference, tmp_path / "diff.png",
                               background=trav[:, 2].mean(0), title="older - younger")
    for path in (strip, gif, diff):
        assert path.is_file() and path.stat().st_size > 1000
    frames = iio.imread(gif, index=None)
    assert frames.shape[0] == 2 * len(steps) - 2  # forwards and back, ends not repeated
    assert iio.imread(strip).ndim == 3
    with pytest.raises(ValueError, match="steps: expected 5 values"):
        save_traversal_strip(trav[0], steps[:3], tmp_path / "bad.png")
