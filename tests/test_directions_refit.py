"""The refit bootstrap of the raw vs size-controlled map comparison (directions/refit.py), on a linear
"decoder" whose answer is known: one latent is head size (its map a global rescaling), one is the local sex
effect, the rest noise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from brainlatent.config import ConfigError, build_section
from brainlatent.directions.probes import ProbeSettings
from brainlatent.directions.metrics import stratified_bootstrap_indices
from brainlatent.directions.refit import ComparisonMaps, size_control_bootstrap

SHAPE = (10, 12, 10)
N_LATENT = 6


def _maps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A brain-like ball, a shell map (what a global rescaling changes: the outline) and a local map at one
    pole of the outline, which therefore correlates with the shell map as a real local enlargement does."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in SHAPE], indexing="ij"))
    centre = (np.array(SHAPE, float) - 1)[:, None, None, None] / 2
    radius = np.sqrt(((grid - centre) ** 2).sum(0))
    mask = radius < 5.0
    shell = np.exp(-((radius - 4.0) ** 2) / 1.0)
    pole = centre + np.array([0, 4.0, 0])[:, None, None, None]
    local = shell * np.exp(-((grid - pole) ** 2).sum(0) / (2 * 2.0**2))
    return mask, shell, local


def _cohort(n: int, seed: int) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Latents (n, 6): z0 head size (males larger on average, overlapping), z1 the local sex effect, z2-z5 noise;
    the subjects table with sex and a skull-based size covariate that z1 does not move."""
    rng = np.random.default_rng(seed)
    male = rng.integers(0, 2, n)
    size = rng.normal(size=n) + 0.8 * male
    latents = rng.normal(size=(n, N_LATENT))
    latents[:, 0] = size + 0.2 * rng.normal(size=n)
    latents[:, 1] = 1.2 * male + rng.normal(size=n)
    subjects = pd.DataFrame({"subject_id": [f"s{i}" for i in range(n)], "sex": np.where(male == 1, "M", "F"),
                             "etiv_mm3": 1.5e6 * np.exp(0.05 * size + rng.normal(0, 0.002, n))})
    return latents, subjects, male


def _linear_decoder(shell: np.ndarray, local: np.ndarray):
    rng = np.random.default_rng(7)
    basis = np.stack([shell, local, *(0.3 * rng.normal(size=(N_LATENT - 2, *SHAPE)))]).reshape(N_LATENT, -1)
    weights = torch.as_tensor(basis, dtype=torch.float32)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return (z.float() @ weights).reshape(len(z), 1, *SHAPE)

    return decode


@pytest.fixture(scope="module")
def setup():
    mask, shell, local = _maps()
    latents, subjects, _ = _cohort(160, seed=0)
    traversed, _, _ = _cohort(8, seed=1)
    settings = ProbeSettings(C=1.0, size_axis="scaling")
    axis = np.eye(N_LATENT)[0]  # the model's scaling axis: the head-size latent
    maps = ComparisonMaps(local, shell, mask)
    return latents, subjects, traversed, settings, axis, maps, _linear_decoder(shell, local)


def test_refits_say_size_control_renders_the_size_free_local_effect_better(setup):
    """The raw probe uses head size as well as the local effect, so its map is `local + a x shell`; the
    size-controlled one is made orthogonal to the size latent, so its map is the local effect alone. Over
    refits, size control is ahead by the size-free r every time (interval above 0); beyond size the two render
    the same local effect, so that interval straddles 0 (the partial r forgives the size component)."""
    latents, subjects, traversed, settings, axis, maps, decode = setup
    out = size_control_bootstrap("sex", latents, subjects, settings, "etiv_mm3", traversed, (-2.0, 2.0), decode,
                                 maps, n=30, seed=3, size_axis=axis)
    assert out["bootstrap_refits"] == 30
    for suffix in ("", "_beyond_size", "_size_free"):
        assert out[f"size_controlled_minus_raw_r{suffix}_low"] <= out[f"size_controlled_minus_raw_r{suffix}_high"]
        assert 0 <= out[f"size_controlled_better{suffix}_share"] <= 1
    assert out["size_controlled_minus_raw_r_size_free_low"] > 0.05
    assert out["size_controlled_better_size_free_share"] == 1.0
    assert out["size_controlled_minus_raw_r_beyond_size_low"] < 0 < out["size_controlled_minus_raw_r_beyond_size_high"]
    again = size_control_bootstrap("sex", latents, subjects, settings, "etiv_mm3", traversed, (-2.0, 2.0), decode,
                                   maps, n=30, seed=3, size_axis=axis)
    assert again == out  # seeded


def test_without_a_size_component_there_is_nothing_for_size_control_to_win(setup):
    """A label that head size does not predict (the positive control's case): both probes find the local latent
    alone, and the size-free interval holds 0."""
    latents, subjects, traversed, settings, axis, maps, decode = setup
    rng = np.random.default_rng(5)
    planted = rng.integers(0, 2, len(subjects))
    latents = latents.copy()
    latents[:, 0] = rng.normal(size=len(subjects))  # head size no longer tied to the label...
    latents[:, 1] = 1.2 * planted + rng.normal(size=len(subjects))  # ...which moves the local latent only
    subjects = subjects.assign(planted=planted, etiv_mm3=1.5e6 * np.exp(0.05 * latents[:, 0]))
    out = size_control_bootstrap("planted", latents, subjects, settings, "etiv_mm3", traversed, (-2.0, 2.0),
                                 decode, maps, n=30, seed=3, size_axis=axis)
    assert out["size_controlled_minus_raw_r_size_free_low"] < 0.01
    assert out["size_controlled_minus_raw_r_size_free_high"] > -0.01


def test_resampling_keeps_both_classes_and_their_counts():
    # The draw size_control_bootstrap makes of its fitting subjects (metrics.stratified_bootstrap_indices).
    labels = np.array([0] * 5 + [1] * 3)
    rows = np.sort(stratified_bootstrap_indices(labels, 1, np.random.default_rng(0))[0])
    assert len(rows) == 8 and (labels[rows] == 1).sum() == 3 and set(rows[labels[rows] == 1]) <= {5, 6, 7}


def test_bad_refit_requests_are_refused_by_name(setup):
    latents, subjects, traversed, settings, axis, maps, decode = setup
    args = ("sex", latents, subjects)
    with pytest.raises(ValueError, match="n must be >= 2"):
        size_control_bootstrap(*args, settings, "etiv_mm3", traversed, (-2, 2), decode, maps, n=1, size_axis=axis)
    with pytest.raises(ValueError, match=r"C must be fixed.*latent_size_controlled"):
        size_control_bootstrap(*args, settings.replace(C=None), "etiv_mm3", traversed, (-2, 2), decode, maps, n=2,
                               size_axis=axis, C={"latent": 1.0})
    with pytest.raises(ValueError, match=r"traversal latents \(8, 5\) do not match the fitting latents \(160, 6\)"):
        size_control_bootstrap(*args, settings, "etiv_mm3", traversed[:, :5], (-2, 2), decode, maps, n=2,
                               size_axis=axis)


def test_map_bootstrap_option_is_validated_by_name():
    with pytest.raises(ConfigError, match=r"directions\.map_bootstrap"):
        build_section("directions", {"map_bootstrap": -1})
    assert build_section("directions", {}).map_bootstrap == 0  # off unless asked for
