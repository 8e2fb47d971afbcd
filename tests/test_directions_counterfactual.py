"""Counterfactual checks (directions/counterfactual.py) on tiny models whose answers are known in closed form.

The model: a linear autoencoder with an orthonormal decoder basis ``W (V, L)`` and mean ``mu``:
``decode(z) = mu + W z``, ``encode(x) = a * W^T (x - mu)``. With ``a = 1`` it is a projection: its null
intervention is idempotent (f(f(x)) = f(x)), every step is undone exactly, and a traversal along ``d`` moves
the volume by ``s * W d``. With ``a = 1/2`` the encoder shrinks: a round trip undoes only half of each step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainlatent.directions import Direction, traversal_effects, traverse
from brainlatent.directions import counterfactual as cf
from brainlatent.directions.effects import reencode_traversals
from brainlatent.models.featurenet import FeatureNet

SHAPE = (6, 6, 6)
L = 4
STEPS = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])


class LinearAE:
    def __init__(self, shrink: float = 1.0, noise: float = 0.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        w = np.linalg.qr(rng.normal(size=(np.prod(SHAPE), L)))[0]
        self.w = torch.from_numpy(w).float()  # (V, L) orthonormal columns
        self.mu = torch.full((int(np.prod(SHAPE)),), 0.5)
        self.shrink, self.noise = shrink, noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mu + z.float() @ self.w.T
        if self.noise:  # a decoder that draws fresh noise on every call (StyleGAN's "random" noise mode)
            x = x + self.noise * torch.randn_like(x)
        return x.reshape(len(z), 1, *SHAPE)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.shrink * (x.reshape(len(x), -1).float() - self.mu) @ self.w


def _direction(vector=(1.0, 0.0, 0.0, 0.0)) -> Direction:
    v = np.asarray(vector, float)
    return Direction("sex", v / np.linalg.norm(v), step_sd=0.1, center=0.0, positive="male")


def _latents(n: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.1, size=(n, L))


def test_composition_of_a_projection_is_idempotent_and_measures_what_the_latent_misses():
    model = LinearAE()
    rng = np.random.default_rng(2)
    z = _latents()
    off = rng.normal(0, 0.05, size=(3, int(np.prod(SHAPE))))
    off -= off @ model.w.numpy().astype(np.float64) @ model.w.numpy().T  # orthogonal to the decoder's span
    x = (model.decode(torch.from_numpy(z)).reshape(3, -1).numpy() + off).reshape(3, *SHAPE)
    recon = model.decode(model.encode(torch.from_numpy(x).float())).numpy()[:, 0]
    cycled = model.decode(model.encode(torch.from_numpy(recon))).numpy()[:, 0]
    out = cf.composition(x, recon, cycled)
    assert out["composition_mae"] == pytest.approx(np.abs(off).mean(), rel=1e-4)  # exactly what it cannot hold
    assert out["composition_cycle_mae"] < 1e-6  # f(f(x)) = f(x)


def test_zero_step_is_exact_for_a_deterministic_decoder_only():
    z = _latents()
    for noise, expect_zero in ((0.0, True), (0.01, False)):
        model = LinearAE(noise=noise)
        recon = model.decode(torch.from_numpy(z)).numpy()[:, 0]
        err = cf.zero_step_error(z, _direction(), model.decode, recon)
        assert (err < 1e-6) == expect_zero


@pytest.mark.parametrize("shrink, ratio", [(1.0, 0.0), (0.5, 0.5)])
def test_reversibility_matches_the_closed_form(shrink, ratio):
    """+d then -d: a projection undoes the step exactly; an encoder that halves the latents leaves half of it
    (z = 0, so every round trip lands at (a - 1) s W d: residual / change = |a - 1|)."""
    model = LinearAE(shrink=shrink)
    z = np.zeros((2, L))
    d = _direction((1.0, 1.0, 0.0, 0.0))
    trav = traverse(z, d, STEPS, model.decode)
    recon = model.decode(torch.zeros(2, L)).numpy()[:, 0]
    reencoded = reencode_traversals(trav, model.encode)
    out = cf.reversibility(reencoded, trav, STEPS, d, model.decode, recon)
    assert out["reversibility_ratio"] == pytest.approx(ratio, abs=1e-5)
    assert out["composition_cycle_mae"] == pytest.approx(0.0, abs=1e-6)  # the zero step's round trip
    if shrink == 1.0:
        assert out["reversibility_mae"] < 1e-6


def test_effectiveness_and_minimality_against_a_planted_map():
    """Plant the image-space change of latent axis 0 inside a region; a direction along axis 0 moves the
    projection on that map up strictly for every subject (+1), the opposite direction down (-1), an orthogonal
    one not at all (constant: no defined monotonicity). Minimality: a change confined to the planted region
    leaves nothing outside it; one spread over the volume leaves about the chance share."""
    model = LinearAE()
    region = np.zeros(SHAPE, bool)
    region[:3, :3, :3] = True
    # Decoder basis: column 0 lives in the region only, the others outside it (orthonormal still).
    basis = np.zeros((int(np.prod(SHAPE)), L))
    inside, outside = np.flatnonzero(region.ravel()), np.flatnonzero(~region.ravel())
    basis[inside, 0] = 1 / np.sqrt(len(inside))
    for k in range(1, L):
        basis[outside, k] = np.random.default_rng(k).normal(size=len(outside))
    basis[:, 1:] = np.linalg.qr(basis[:, 1:])[0]
    model.w = torch.from_numpy(basis).float()
    planted = basis[:, 0].reshape(SHAPE)
    measure = cf.map_projection_measure({"sex": planted})
    z = _latents(4)
    results = {}
    for name, vector in (("along", (1, 0, 0, 0)), ("against", (-1, 0, 0, 0)), ("orthogonal", (0, 1, 0, 0))):
        d = _direction(vector)
        trav = traverse(z, d, STEPS, model.decode)
        effects = traversal_effects(trav, STEPS, measure=measure)
        results[name] = (cf.effectiveness(effects.summary, cf.EFFECTIVENESS["sex"]), cf.minimality(trav, planted))
    assert results["along"][0]["effectiveness"] == pytest.approx(1.0)
    assert results["along"][0]["effectiveness_predictor"] == "sex_map_projection"
    assert results["against"][0]["effectiveness"] == pytest.approx(-1.0)
    assert np.isnan(results["orthogonal"][0]["effectiveness"])  # the projection does not move at all
    assert results["along"][1]["minimality_outside_share"] < 1e-9
    assert results["orthogonal"][1]["minimality_outside_share"] == pytest.approx(1.0)
    assert results["along"][1]["minimality_chance"] == pytest.approx(1 - region.mean())


def test_planted_region_holds_the_requested_energy():
    planted = np.zeros((4, 4, 4))
    planted[0, 0, :] = [4.0, 2.0, 1.0, 0.5]
    region = cf.planted_region(planted, energy=0.9)
    assert region.sum() == 2  # 16 + 4 = 20 of 21.25: the two largest voxels hold > 90%
    with pytest.raises(ValueError, match="zero inside the mask"):
        cf.planted_region(np.zeros((2, 2, 2)))


def test_direction_checks_combine_everything_and_the_featurenet_measure_reads_a_featurenet():
    model = LinearAE()
    z = _latents(3)
    d = _direction()
    trav = traverse(z, d, STEPS, model.decode)
    recon = model.decode(torch.from_numpy(z)).numpy()[:, 0]
    net = FeatureNet(SHAPE, channels=(2, 4), feature_dim=4).eval()
    measure = cf.combine_measures(cf.featurenet_measure(net), cf.map_projection_measure({"sex": np.ones(SHAPE)}))
    effects = traversal_effects(trav, STEPS, measure=measure)
    assert {"predicted_male", "predicted_age_group", "sex_map_projection"} <= set(effects.summary.index)
    assert effects.per_step["predicted_male"].between(0, 1).all()
    assert effects.per_step["predicted_age_group"].between(0, 3).all()
    inputs = cf.CounterfactualInputs(d, z, trav, STEPS, recon, reencode_traversals(trav[:2], model.encode), effects)
    out = cf.direction_checks(inputs, model.decode, None, np.ones(SHAPE), cf.EFFECTIVENESS["sex"])
    assert out["zero_step_max"] < 1e-6 and out["reversibility_ratio"] < 1e-5
    assert {"effectiveness", "effectiveness.predicted_male", "minimality_outside_share"} <= set(out)
