"""Directions: recovering a known latent direction, step scale, sign, size control, JSON artifacts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import special_ortho_group
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline

from brainlatent.config import ConfigError, build_section
from brainlatent.directions import (Direction, ProbeSettings, direction_from_probe, make_probe, raw_gradient,
                                    run_probe_suite)
from brainlatent.directions.direction import covariate_axes
from brainlatent.directions.probes import CovariateResidualizer
from brainlatent.directions.groundtruth import map_correlation, partial_map_correlation, size_free_map_correlation
from brainlatent.directions.sizeaxis import SCALING_FACTOR, global_size_map, rescale, scaling_axis


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


SETTINGS = ProbeSettings(C=1.0)


def _anisotropic_cohort(n: int = 800, dim: int = 16, seed: int = 0):
    """Latents with per-dim scales 0.5..4; P(label 1) = sigmoid(3 * v.z / sd(v.z)) for a known unit v.

    (Much smaller scales would make v's entries there statistically unidentifiable at this n.)
    """
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.5, 4.0, dim)
    z = rng.normal(size=(n, dim)) * scales
    v = rng.normal(size=dim)
    v /= np.linalg.norm(v)
    t = z @ v
    y = (rng.random(n) < 1 / (1 + np.exp(-3 * t / t.std()))).astype(np.int64)
    return z, y, v


def test_raw_space_gradient_recovers_the_planted_filter():
    """Backward model (the label is read off v . z): the probe's raw-space gradient is v."""
    z, y, v = _anisotropic_cohort()
    probe = make_probe("binary", "latent", SETTINGS).fit(z, y)
    d = direction_from_probe(probe, z, name="sex", positive="male", kind="gradient")
    assert cosine(d.vector, v) >= 0.9  # positive: the +direction points to label 1
    # The standardised coefficients alone (the precedent's "raw coefficients") point elsewhere when
    # latent dimensions have different scales: dividing by the scale is what makes the direction right.
    assert cosine(probe[-1].coef_[0], v) < cosine(d.vector, v) - 0.1


def test_nested_cv_direction_also_recovers_it():
    z, y, v = _anisotropic_cohort(seed=1)
    probe = make_probe("binary", "latent", ProbeSettings(inner_splits=3, Cs=(0.01, 0.1, 1.0, 10.0))).fit(z, y)
    assert cosine(direction_from_probe(probe, z, "sex", "male", kind="gradient").vector, v) >= 0.9


def test_pattern_recovers_a_planted_latent_effect():
    """Forward model, what a traversal should reproduce: the label *shifts* the latents along a known unit
    effect a (z = noise * scales + 1.5 * y * a), in anisotropic latent noise. The activation pattern aligns
    with a; the raw gradient (~Cov^-1 a) does not."""
    rng = np.random.default_rng(3)
    n, dim = 800, 16
    a = rng.normal(size=dim)
    a /= np.linalg.norm(a)
    y = rng.integers(0, 2, n)
    z = rng.normal(size=(n, dim)) * np.geomspace(0.5, 4.0, dim) + 1.5 * y[:, None] * a
    probe = make_probe("binary", "latent", SETTINGS).fit(z, y)
    assert cosine(direction_from_probe(probe, z, "sex", "male", kind="pattern").vector, a) >= 0.9
    assert cosine(direction_from_probe(probe, z, "sex", "male").vector, a) < 0.8


def test_step_scale_is_the_sd_of_the_projection():
    z, y, _ = _anisotropic_cohort(n=300, seed=2)
    d = direction_from_probe(make_probe("binary", "latent", SETTINGS).fit(z, y), z, "sex", "male")
    assert np.linalg.norm(d.vector) == pytest.approx(1.0)
    assert d.step_sd == pytest.approx((z @ d.vector).std(ddof=1))
    pos = d.project(z)
    assert pos.mean() == pytest.approx(0.0, abs=1e-9) and pos.std(ddof=1) == pytest.approx(1.0)
    offsets = d.offsets(np.array([-2.0, 0.0, 1.0]))
    assert offsets.shape == (3, z.shape[1])
    # A +1 step moves a subject by exactly one SD along the direction.
    np.testing.assert_allclose(d.project(z[:5] + offsets[2]) - d.project(z[:5]), 1.0)
    assert d.logit_per_sd > 0


def test_ordinal_direction_points_to_older_groups():
    rng = np.random.default_rng(3)
    age = rng.uniform(22, 37, 400)
    z = rng.normal(size=(400, 6)) * [1, 5, 0.2, 1, 1, 3]
    u = np.array([0, 0, 1.0, 0, 0, 0])  # age lives in a low-variance latent dimension
    z += np.outer((age - 29.5) / 15, u)
    group = np.digitize(age, [26, 31, 36])
    d = direction_from_probe(make_probe("ordinal", "latent", SETTINGS).fit(z, group), z, "age_group", "older")
    assert cosine(d.vector, u) >= 0.9
    assert np.corrcoef(d.project(z), age)[0, 1] > 0.5


def test_size_control_recovers_the_local_effect():
    """sex = larger head + a local effect; controlling for brain volume isolates the local one."""
    rng = np.random.default_rng(4)
    n, dim = 600, 10
    male = rng.integers(0, 2, n).astype(float)
    size = 1.5 * male + rng.normal(size=n)  # head size, strongly sex-dependent
    local = 1.0 * male + rng.normal(size=n)  # a local difference beyond size
    factors = np.column_stack([size, local, rng.normal(size=(n, dim - 2)) * np.linspace(0.5, 2, dim - 2)])
    rotation = special_ortho_group.rvs(dim, random_state=5)  # latents mix the factors
    z = factors @ rotation.T
    u_size, u_local = rotation[:, 0], rotation[:, 1]  # raw-space gradients of the size / local factor
    volume = 1.2e6 * (1 + 0.05 * size + 0.005 * rng.normal(size=n))  # measured, with a little noise
    y = male.astype(np.int64)

    raw = direction_from_probe(make_probe("binary", "latent", SETTINGS).fit(z, y), z, "sex", "male")
    X = np.column_stack([z, volume])
    controlled_probe = make_probe("binary", "latent_size_controlled", SETTINGS).fit(X, y)
    with pytest.raises(ValueError, match="needs the fitting covariates"):
        direction_from_probe(controlled_probe, z, "sex_size_controlled", "male")
    controlled = direction_from_probe(controlled_probe, z, "sex_size_controlled", "male", covariates=volume)

    assert cosine(raw.vector, u_size) > 0.5  # the plain probe leans on head size
    assert abs(cosine(controlled.vector, u_size)) < 0.1  # the controlled one does not
    assert cosine(controlled.vector, u_local) >= 0.9
    assert cosine(controlled.vector, u_local) > cosine(raw.vector, u_local) + 0.2


def test_size_control_is_fitted_within_sex_so_it_does_not_overcorrect():
    """Latents that code head size with noise: a head-size slope pooled over both sexes also takes the latent
    local effect for size (males have both), so removing it pushes the size-controlled direction towards
    *smaller* heads and strips part of the local effect; fitted within each sex (an ANCOVA) it does not."""
    rng = np.random.default_rng(4)
    n, dim = 600, 10
    male = rng.integers(0, 2, n).astype(float)
    size = 1.5 * male + rng.normal(size=n)
    local = 1.0 * male + rng.normal(size=n)  # size-independent
    coded_size = size + rng.normal(size=n)  # what the latents hold of head size
    factors = np.column_stack([coded_size, local, rng.normal(size=(n, dim - 2)) * np.linspace(0.5, 2, dim - 2)])
    rotation = special_ortho_group.rvs(dim, random_state=5)
    z = factors @ rotation.T
    u_size, u_local = rotation[:, 0], rotation[:, 1]
    head = 1.2e6 * (1 + 0.05 * size)  # a skull-based head size: the local effect is not in it
    y = male.astype(np.int64)

    def controlled(within: bool):
        probe = make_probe("binary", "latent_size_controlled", SETTINGS).set_params(residualise__within_labels=within)
        return direction_from_probe(probe.fit(np.column_stack([z, head]), y), z, "sex_size_controlled", "male",
                                    covariates=head, labels=y)

    within, pooled = controlled(True), controlled(False)
    assert abs(cosine(within.vector, u_size)) < 0.05
    assert cosine(pooled.vector, u_size) < -0.1  # overcorrected: the male direction shrinks the head
    assert cosine(within.vector, u_local) > cosine(pooled.vector, u_local)
    # The residualiser itself: the local feature has no head-size slope within sex; pooled, it seems to.
    per_sd = 1.2e6 * 0.05
    slope = {w: CovariateResidualizer(within_labels=w).fit(np.column_stack([local, head]), y).coef_.item() * per_sd
             for w in (True, False)}
    assert abs(slope[True]) < 0.1 and slope[False] > 0.15


def test_json_round_trip(tmp_path):
    z, y, _ = _anisotropic_cohort(n=200, dim=5, seed=6)
    d = direction_from_probe(make_probe("binary", "latent", SETTINGS).fit(z, y), z, "sex", "male",
                             metadata={"cv_auc": np.float64(0.8), "p_value": float("nan"), "C": 1.0})
    path = d.save(tmp_path / "dirs" / "sex.json")
    text = path.read_text()
    assert "NaN" not in text  # strict JSON: NaN is written as null
    assert isinstance(json.loads(text)["vector"], list)
    back = Direction.load(path)
    np.testing.assert_array_equal(back.vector, d.vector)
    assert (back.name, back.positive, back.step_sd, back.center) == (d.name, d.positive, d.step_sd, d.center)
    assert back.metadata["cv_auc"] == 0.8 and back.metadata["p_value"] is None


def test_invalid_directions_and_files_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unit norm"):
        Direction("x", np.array([1.0, 1.0]), step_sd=1.0, center=0.0, positive="male")
    with pytest.raises(ValueError, match="step_sd"):
        Direction("x", np.array([1.0, 0.0]), step_sd=0.0, center=0.0, positive="male")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="bad.json: not a direction file"):
        Direction.load(bad)
    d = Direction("x", np.array([0.6, 0.8]), step_sd=2.0, center=0.0, positive="male")
    with pytest.raises(ValueError, match=r"expected latents \(N, 2\)"):
        d.project(np.zeros((3, 4)))


def test_pixel_baselines_have_no_latent_direction():
    rng = np.random.default_rng(7)
    X, y = rng.normal(size=(40, 30)), np.repeat([0, 1], 20)
    probe = make_probe("binary", "pca_voxels", SETTINGS, n_train=40).fit(X, y)
    assert isinstance(probe, Pipeline) and isinstance(probe[0], PCA)
    with pytest.raises(ValueError, match="not a latent-space transform"):
        raw_gradient(probe)


def test_pattern_direction_ignores_a_collapsed_dimension_the_gradient_follows():
    """A VAE-like latent: dim 0 carries the label with unit variance, dim 1 the same signal-to-noise at 1/100
    the scale (a nearly collapsed dimension the decoder ignores). Standardised, both are equally useful, so
    the raw gradient w / s is ~100x larger along dim 1; the activation pattern Cov(z) w follows dim 0."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    z = np.stack([y + rng.normal(0, 1, 400), 0.01 * (y + rng.normal(0, 1, 400))], axis=1)
    probe = make_probe("binary", "latent", SETTINGS).fit(z, y)
    e0 = np.array([1.0, 0.0])
    pattern = direction_from_probe(probe, z, "sex", "male", kind="pattern")
    gradient = direction_from_probe(probe, z, "sex", "male", kind="gradient")
    assert cosine(pattern.vector, e0) >= 0.99
    assert abs(cosine(gradient.vector, e0)) < 0.1
    assert pattern.metadata["kind"] == "pattern" and pattern.logit_per_sd > 0  # the probe still rises along +a
    with pytest.raises(ValueError, match="kind must be one of"):
        direction_from_probe(probe, z, "sex", "male", kind="filter")


def _local_effect_read_as_size(seed: int, n: int = 600, dim: int = 10):
    """A local region that grows with head size *and* is larger in males at fixed head size (a size-independent
    local effect), in latents that code head size with noise. Within each sex the local latent predicts head size,
    so a ridge predictor of head size from the latents (the covariate axis) leans on it; the model's own size axis
    (what a global rescaling moves: ``u_size`` by construction) does not."""
    rng = np.random.default_rng(seed)
    male = rng.integers(0, 2, n).astype(float)
    size = 1.5 * male + rng.normal(size=n)
    local = 1.0 * male + 0.6 * size + 0.6 * rng.normal(size=n)  # +1 SD in males at any head size
    coded_size = size + 0.7 * rng.normal(size=n)
    factors = np.column_stack([coded_size, local, rng.normal(size=(n, dim - 2)) * np.linspace(0.5, 2, dim - 2)])
    rotation = special_ortho_group.rvs(dim, random_state=5)
    z = factors @ rotation.T
    head = 1.2e6 * (1 + 0.05 * size)  # skull-based: the local effect is not in it
    return z, head, male.astype(np.int64), rotation[:, 0], rotation[:, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scaling_axis_keeps_the_local_effect_the_covariate_axis_removes_part_of(seed):
    """Issue 16's failure, in miniature: the covariate-derived head-size axis holds part of the local effect, so the
    size-controlled direction made orthogonal to it loses part of the local effect and turns towards smaller heads;
    made orthogonal to the scaling axis it keeps the local effect and leaves head size alone."""
    z, head, y, u_size, u_local = _local_effect_read_as_size(seed)
    probe = make_probe("binary", "latent_size_controlled", SETTINGS).fit(np.column_stack([z, head]), y)
    by_covariate = direction_from_probe(probe, z, "sex_size_controlled", "male", covariates=head, labels=y)
    by_scaling = direction_from_probe(probe, z, "sex_size_controlled", "male", covariates=head, labels=y,
                                      size_axis=-3.0 * u_size)  # any scale or sign: only the axis matters

    covariate_axis = covariate_axes(z, head, y)[:, 0]
    assert abs(cosine(covariate_axis, u_local)) > 0.5  # the local effect is in the covariate axis...
    assert abs(cosine(-3.0 * u_size, u_local)) < 1e-12  # ...and not in the scaling axis
    assert cosine(by_scaling.vector, u_local) >= 0.95  # keeps the local effect
    assert cosine(by_covariate.vector, u_local) < cosine(by_scaling.vector, u_local) - 0.1  # loses part of it
    assert cosine(by_covariate.vector, u_size) < -0.4  # and shrinks the head instead
    assert abs(cosine(by_scaling.vector, u_size)) < 1e-9
    assert by_scaling.metadata["orthogonal_to"] == "latent scaling axis"
    assert by_covariate.metadata["orthogonal_to"] == "latent covariate predictor"
    assert 0.5 < by_scaling.metadata["size_axis_cos_covariate_axis"] < 0.9


def test_size_axis_must_fit_the_latents():
    z, head, y, u_size, _ = _local_effect_read_as_size(0, n=200)
    probe = make_probe("binary", "latent_size_controlled", SETTINGS).fit(np.column_stack([z, head]), y)
    for bad in (u_size[:-1], np.zeros_like(u_size), np.full_like(u_size, np.nan)):
        with pytest.raises(ValueError, match="size_axis must be a finite non-zero"):
            direction_from_probe(probe, z, "sex_size_controlled", "male", covariates=head, labels=y, size_axis=bad)
    # A probe without size control ignores it.
    raw_probe = make_probe("binary", "latent", SETTINGS).fit(z, y)
    d = direction_from_probe(raw_probe, z, "sex", "male", size_axis=u_size)
    assert "orthogonal_to" not in d.metadata


def _blobs(n: int, seed: int, shape=(28, 32, 28)) -> np.ndarray:
    """Gaussian blobs of varying width, off the volume's centre (as brains are in a field of view)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    centre = np.array(shape, float)[:, None, None, None] * np.array([0.45, 0.55, 0.4])[:, None, None, None]
    widths = rng.uniform(3.0, 4.0, n)
    return np.stack([np.exp(-((grid - centre) ** 2).sum(0) / (2 * w**2)) for w in widths]).astype(np.float32)


def _moments(volumes: np.ndarray) -> np.ndarray:
    """A toy encoder: (mass, centre of mass x, y, z) of each volume."""
    v = np.asarray(volumes, np.float64)
    mass = v.sum(axis=(1, 2, 3))
    coms = [(v * np.arange(s).reshape([-1 if k == a else 1 for k in range(3)])).sum(axis=(1, 2, 3)) / mass
            for a, s in enumerate(v.shape[1:])]
    return np.column_stack([mass, *coms])


def test_rescale_is_an_isotropic_scaling_about_the_centre_of_mass():
    vols = _blobs(3, 0)
    np.testing.assert_allclose(rescale(vols, 1.0), vols, atol=1e-5)
    before = _moments(vols)
    for factor in (1 / 1.03, 1.03, 1.1):
        after = _moments(rescale(vols, factor))
        # mass grows as s^3, up to the trilinear interpolation's blur (+0.5-1% on these 3-4 voxel blobs)
        np.testing.assert_allclose(after[:, 0] / before[:, 0], factor**3, rtol=0.015)
        np.testing.assert_allclose(after[:, 1:], before[:, 1:], atol=0.02)  # no translation
    # The central difference's point: both sides are blurred alike, so their ratio is s^6 far more closely.
    ratio = _moments(rescale(vols, 1.03))[:, 0] / _moments(rescale(vols, 1 / 1.03))[:, 0]
    np.testing.assert_allclose(ratio, 1.03**6, rtol=0.002)
    with pytest.raises(ValueError, match=r"expected \(N, X, Y, Z\)"):
        rescale(vols[0], 1.03)


def test_scaling_axis_is_the_models_tangent_of_a_global_rescaling():
    """With an encoder that reads (mass, centre of mass), a rescaling about the centre of mass moves the mass only:
    the axis is the mass coordinate, and every subject's tangent agrees."""
    offset = np.random.default_rng(1).normal(size=3)
    mixing = special_ortho_group.rvs(4, random_state=2)
    encode = lambda v: _moments(v) @ mixing.T  # noqa: E731 - a latent space that mixes the moments
    axis = scaling_axis(encode, _blobs(6, 1))
    assert axis.n_subjects == 6 and axis.factor == SCALING_FACTOR
    assert cosine(axis.vector, mixing[:, 0]) > 0.999  # +vector = larger
    assert axis.agreement > 0.999
    assert abs(np.linalg.norm(axis.vector) - 1) < 1e-12
    with pytest.raises(ValueError, match="factor must be > 1"):
        scaling_axis(encode, _blobs(2, 1), factor=0.97)
    with pytest.raises(ValueError, match="does not change their latents"):
        scaling_axis(lambda v: np.zeros((len(v), 3)) + offset, _blobs(2, 1))  # a model that ignores size


def test_global_size_map_is_the_rendered_difference_of_a_rescaling():
    """Through an identity model it is the mean difference of the rescaled volumes themselves; through a model it
    is what the model renders of them (here a decoder that halves the intensities)."""
    vols = _blobs(3, 4)
    expected = (rescale(vols, 1.03).astype(np.float64) - rescale(vols, 1 / 1.03)).mean(0)
    identity = global_size_map(lambda v: v.reshape(len(v), -1), lambda z: z.reshape(vols.shape), vols)
    np.testing.assert_allclose(identity, expected, atol=1e-6)
    assert identity.shape == vols.shape[1:] and identity.sum() > 0  # + = larger
    halved = global_size_map(lambda v: v.reshape(len(v), -1), lambda z: 0.5 * z.reshape(vols.shape), vols)
    np.testing.assert_allclose(halved, 0.5 * expected, atol=1e-6)
    with pytest.raises(ValueError, match="factor must be > 1"):
        global_size_map(lambda v: v, lambda z: z, vols, factor=1.0)


def _shell_and_local_maps(shape=(20, 24, 20)):
    """A brain mask (a ball), a global-size map (+ on a shell at the ball's outline: the outline pushed outward)
    and a planted local map (a local enlargement: the same shell, over one side only, so correlated with it)."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    centre = (np.array(shape, float) - 1)[:, None, None, None] / 2
    radius = np.sqrt(((grid - centre) ** 2).sum(0))
    mask = radius < 9.5
    size_map = np.exp(-((radius - 7.5) ** 2) / 2.0)
    spot = centre + np.array([0, 7.0, 0])[:, None, None, None]
    local = size_map * np.exp(-((grid - spot) ** 2).sum(0) / (2 * 5.0**2))
    return mask, size_map, local


def test_partial_map_correlation_takes_out_what_a_global_size_change_explains():
    """Known answer: a direction map = (its local part + a global-size component) correlates with the planted
    local map better than its local part alone does, because the planted map itself correlates with the global
    map; beyond size (partial r given the global map) both score exactly what the local part does, whatever the
    size component's weight, and that equals the textbook partial correlation."""
    mask, size_map, planted = _shell_and_local_maps()
    assert map_correlation(size_map, planted, mask) > 0.15  # a pure size change already "matches" the local map
    noise = np.random.default_rng(0).normal(scale=0.3, size=planted.shape)
    local_part = planted + noise
    for weight in (0.5, 2.0, -1.0):
        with_size = local_part + weight * size_map
        plain_local = map_correlation(local_part, planted, mask)
        if weight > 0:
            assert map_correlation(with_size, planted, mask) > plain_local + 0.02  # the plain r is boosted
        beyond = partial_map_correlation(with_size, planted, size_map, mask)
        assert beyond == pytest.approx(partial_map_correlation(local_part, planted, size_map, mask), abs=1e-12)
    r_ab, r_ac, r_bc = (map_correlation(a, b, mask) for a, b in
                        ((local_part, planted), (local_part, size_map), (planted, size_map)))
    textbook = (r_ab - r_ac * r_bc) / np.sqrt((1 - r_ac**2) * (1 - r_bc**2))
    assert partial_map_correlation(local_part, planted, size_map, mask) == pytest.approx(textbook, abs=1e-12)
    # A map that is only a size change holds nothing beyond it; a control map that is constant explains nothing.
    with pytest.raises(ValueError, match="multiple of the control map"):
        partial_map_correlation(3 * size_map + 1, planted, size_map, mask)
    with pytest.raises(ValueError, match="non-constant"):
        partial_map_correlation(local_part, planted, np.ones_like(size_map), mask)
    with pytest.raises(ValueError, match="differ"):
        partial_map_correlation(local_part, planted, size_map[:-1], mask)


def test_size_free_map_correlation_counts_a_size_component_against_a_direction():
    """Known answer: against the part of the planted map a global-size map does not explain, a direction map
    made of that part scores 1, and adding any global-size component (either sign) lowers the score as
    1 / sqrt(1 + a^2 var(size) / var(part)); the partial r forgives that component, this one does not. It is the
    textbook semipartial correlation."""
    mask, size_map, planted = _shell_and_local_maps()
    c = size_map[mask] - size_map[mask].mean()
    b = planted[mask] - planted[mask].mean()
    part = np.zeros_like(planted)
    part[mask] = b - (b @ c) / (c @ c) * c  # the planted map's size-free part
    assert size_free_map_correlation(part, planted, size_map, mask) == pytest.approx(1.0, abs=1e-12)
    # The planted map itself carries a size-like component, so it scores below its size-free part.
    assert size_free_map_correlation(planted, planted, size_map, mask) < 0.99
    scores = []
    for weight in (0.0, 0.5, -0.5, 2.0):
        with_size = part + weight * size_map
        expected = 1 / np.sqrt(1 + weight**2 * np.var(size_map[mask]) / np.var(part[mask]))
        score = size_free_map_correlation(with_size, planted, size_map, mask)
        assert score == pytest.approx(expected, abs=1e-9)
        assert partial_map_correlation(with_size, planted, size_map, mask) == pytest.approx(1.0, abs=1e-9)
        scores.append(score)
    assert scores[0] > scores[1] > scores[3] and scores[1] == pytest.approx(scores[2])
    noisy = planted + np.random.default_rng(1).normal(scale=0.3, size=planted.shape)
    r_ab, r_ac, r_bc = (map_correlation(a, b, mask) for a, b in ((noisy, planted), (noisy, size_map),
                                                                 (planted, size_map)))
    textbook = (r_ab - r_ac * r_bc) / np.sqrt(1 - r_bc**2)
    assert size_free_map_correlation(noisy, planted, size_map, mask) == pytest.approx(textbook, abs=1e-12)
    with pytest.raises(ValueError, match="planted map is a multiple of the control map"):
        size_free_map_correlation(noisy, 2 * size_map - 1, size_map, mask)
    with pytest.raises(ValueError, match="non-constant"):
        size_free_map_correlation(np.ones_like(noisy), planted, size_map, mask)
    with pytest.raises(ValueError, match="differ"):
        size_free_map_correlation(noisy, planted[:-1], size_map, mask)


def test_size_axis_option_is_validated_by_name():
    with pytest.raises(ValueError, match=r"ProbeSettings\.size_axis: expected one of \('scaling', 'covariate'\)"):
        ProbeSettings(size_axis="ridge")
    with pytest.raises(ConfigError, match=r"directions\.size_axis: Input should be 'scaling' or 'covariate'"):
        build_section("directions", {"size_axis": "ridge"})
    with pytest.raises(ConfigError, match=r"directions\.size_axis_subjects"):
        build_section("directions", {"size_axis_subjects": 0})
    assert build_section("directions", {"size_axis": "scaling"}).size_axis == "scaling"


def test_suite_needs_the_scaling_axis_when_asked_for_it():
    z, head, y, u_size, u_local = _local_effect_read_as_size(0, n=300)
    subjects = pd.DataFrame({"sex": np.where(y == 1, "M", "F"), "etiv_mm3": head})
    settings = SETTINGS.replace(size_axis="scaling", n_repeats=1, n_bootstrap=20, n_permutations=0)
    with pytest.raises(ValueError, match="settings.size_axis is 'scaling' but no size_axis"):
        run_probe_suite(z, subjects, settings, targets=("sex",), baselines=False)
    suite = run_probe_suite(z, subjects, settings, targets=("sex",), baselines=False, size_axis=u_size)
    controlled = suite.directions["sex_size_controlled"]
    assert controlled.metadata["size_axis"] == "scaling"
    assert abs(controlled.vector @ u_size) < 1e-9 and cosine(controlled.vector, u_local) > 0.9
    assert "orthogonal_to" not in suite.directions["sex"].metadata  # the raw direction is untouched
    # covariate: the axis given is not used
    plain = run_probe_suite(z, subjects, settings.replace(size_axis="covariate"), targets=("sex",), baselines=False,
                            size_axis=u_size).directions["sex_size_controlled"]
    assert plain.metadata["orthogonal_to"] == "latent covariate predictor"
