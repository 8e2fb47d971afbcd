"""Shared latent-model interface, 3D layers, autoencoder and VAE (tiny volumes, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from brainlatent.models.autoencoder import Autoencoder
from brainlatent.models.base import MODEL_FAMILIES, build_model, load_model, model_checkpoint
from brainlatent.models.layers import Decoder3d, Encoder3d, as_shape3, stage_shapes
from brainlatent.models.vae import LOGVAR_MAX, VAE, gaussian_kl, kl_warmup_weight
from conftest import blobs

SHAPES = [(16, 16, 16), (16, 20, 16), (32, 40, 32)]
TINY = dict(latent_dim=8, base_channels=4, max_channels=16)




def tiny(cls, shape=(16, 16, 16), seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(volume_shape=shape, **{**TINY, **kw})


# ------------------------------------------------------------------------------------------------ layers
@pytest.mark.parametrize(
    ("shape", "expected_bottleneck", "n_stages"),
    [((16, 16, 16), (4, 4, 4), 2), ((16, 20, 16), (4, 5, 4), 2), ((32, 40, 32), (4, 5, 4), 3),
     ((64, 80, 64), (4, 5, 4), 4), ((33, 41, 30), (5, 6, 4), 3)],
)
def test_stage_shapes_reach_a_small_bottleneck(shape, expected_bottleneck, n_stages):
    shapes = stage_shapes(shape, min_size=4)
    assert shapes[0] == shape and shapes[-1] == expected_bottleneck and len(shapes) == n_stages + 1


@pytest.mark.parametrize("shape", [(16, 16, 16), (33, 41, 30), (12, 20, 9)])
def test_encoder_decoder_reproduce_odd_and_anisotropic_shapes(shape):
    enc = Encoder3d(shape, 5, base_channels=4, max_channels=8)
    dec = Decoder3d(shape, 5, base_channels=4, max_channels=8)
    z = enc(torch.rand(2, 1, *shape))
    assert z.shape == (2, 5)
    assert dec(z).shape == (2, 1, *shape)


@pytest.mark.parametrize("bad", [(16, 16), (16, 0, 16), (16.5, 16, 16), "abc", ("16", 16, 16)])
def test_bad_volume_shape_is_a_value_error(bad):
    with pytest.raises(ValueError, match="volume_shape"):
        as_shape3(bad)


def test_volume_smaller_than_bottleneck_is_a_value_error():
    with pytest.raises(ValueError, match="min_size"):
        stage_shapes((16, 3, 16), min_size=4)


# ----------------------------------------------------------------------------------- shared interface
@pytest.mark.parametrize("arch", ["conv", "dense"])
@pytest.mark.parametrize("cls", [Autoencoder, VAE])
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_decode_shapes_and_range(cls, shape, arch):
    model = tiny(cls, shape, arch=arch, hidden=[16])
    # channels_last_3d input: the reshapes must not assume contiguity.
    x = torch.rand(3, 1, *shape).to(memory_format=torch.channels_last_3d)
    z = model.encode(x)
    assert z.shape == (3, model.latent_dim)
    y = model.decode(z)
    assert y.shape == (3, 1, *shape)
    assert 0.0 <= y.min() and y.max() <= 1.0
    assert model.volume_shape == shape and model.family in MODEL_FAMILIES


@pytest.mark.parametrize("arch", ["conv", "dense"])
@pytest.mark.parametrize("cls", [Autoencoder, VAE])
def test_config_dict_rebuilds_identical_model(cls, arch):
    model = tiny(cls, (16, 20, 16), seed=1, arch=arch, hidden=[16]).eval()
    model.set_template(blobs(3, (16, 20, 16), seed=2))  # the template travels in the state dict
    config = json.loads(json.dumps(model.config_dict()))  # what a JSON checkpoint gives back
    rebuilt = build_model(model.family, config)
    rebuilt.load_state_dict(model.state_dict())
    x = blobs(2, (16, 20, 16), seed=0)
    z = torch.randn(2, model.latent_dim)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode(x), model.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(rebuilt.decode(z), model.decode(z), rtol=0, atol=0)
    # The checkpoint helpers round-trip too.
    loaded = load_model(model_checkpoint(model))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), model.decode(z), rtol=0, atol=0)


def test_build_model_rejects_unknown_family_and_keys():
    with pytest.raises(ValueError, match="unknown 'nope'"):
        build_model("nope", {})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['widht'\]"):
        build_model("ae", {"widht": 3})


def test_wrong_input_shapes_are_value_errors():
    model = tiny(Autoencoder)
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16, 16\)"):
        model.encode(torch.rand(2, 1, 16, 16, 8))
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        model.decode(torch.rand(2, 7))


@pytest.mark.parametrize("cls", [Autoencoder, VAE])
def test_one_pass_encoders_take_the_shared_encode_call_and_refuse_inversion_options(cls):
    model = tiny(cls).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    assert not model.inverts and model.latent_spaces == ("z",)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x, space="z"), model.encode(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"no inversion options, got \['steps'\]"):
        model.encode(x, steps=10)
    with pytest.raises(ValueError, match="space 'w'"):
        model.encode(x, space="w")


def test_autoencoder_is_not_generative():
    with pytest.raises(NotImplementedError, match="not generative"):
        tiny(Autoencoder).sample(2)


# ------------------------------------------------------------------------------------------------ overfit
@pytest.mark.parametrize("arch", ["conv", "dense"])
@pytest.mark.parametrize("cls", [Autoencoder, VAE])
def test_tiny_batch_overfits(cls, arch):
    """Four volumes, 150 Adam steps: per-voxel MSE drops by far more than 20x (measured ~700-900x)."""
    x = blobs(4, (16, 16, 16), seed=0)
    model = tiny(cls, arch=arch, hidden=[32])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    mses = []
    for _ in range(150):
        out = model.loss(x) if cls is Autoencoder else model.loss(x, kl_weight=1.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        mses.append(float(out["recon"] if cls is Autoencoder else out["mse"]))
    assert all(torch.isfinite(torch.tensor(mses)))
    assert mses[-1] < mses[0] / 20


def test_dense_model_predicts_the_deviation_from_its_template():
    """At the template the dense decoder adds only its (bias) output; the encoder sees x - template."""
    x = blobs(4, (16, 16, 16), seed=3)
    model = tiny(Autoencoder, arch="dense", hidden=[])  # linear: decode(z) = template + W z + b
    model.set_template(x)
    torch.testing.assert_close(model.template, x.mean(0, keepdim=True))
    with torch.no_grad():
        for layer in model.decoder:
            if isinstance(layer, torch.nn.Linear):
                layer.bias.zero_()
        z = torch.zeros(1, model.latent_dim)
        torch.testing.assert_close(model.decode(z), x.mean(0, keepdim=True).clamp(0, 1))
        # Encoding the template itself gives the encoder's bias alone (zero input after centring).
        torch.testing.assert_close(model.encode(model.template), model.encoder[-1].bias[None])


def test_bad_architecture_settings_are_value_errors():
    with pytest.raises(ValueError, match="arch: expected 'conv' or 'dense', got 'mlp'"):
        tiny(Autoencoder, arch="mlp")
    with pytest.raises(ValueError, match="hidden: expected a list of positive integers"):
        tiny(VAE, arch="dense", hidden=[0])
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16, 16\)"):
        tiny(Autoencoder, arch="dense").set_template(torch.rand(2, 1, 8, 16, 16))


# -------------------------------------------------------------------------------------------------- VAE
def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(3, 8)
    torch.testing.assert_close(gaussian_kl(zeros, zeros), torch.zeros(3))
    mu, logvar = torch.randn(3, 8), torch.randn(3, 8)
    kl = gaussian_kl(mu, logvar)
    assert (kl > 0).all()
    # Same value as torch.distributions' closed form, summed over latent dimensions.
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(kl, expected)


def test_kl_warmup_schedule():
    assert kl_warmup_weight(0, 10) == 0.0
    assert kl_warmup_weight(2.5, 10) == pytest.approx(0.25)
    assert kl_warmup_weight(10, 10) == 1.0 and kl_warmup_weight(30, 10) == 1.0
    assert kl_warmup_weight(0, 0) == 1.0
    assert tiny(VAE, kl_warmup_epochs=4).kl_weight(1.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="kl_warmup_epochs"):
        kl_warmup_weight(1, -1)


def test_vae_loss_combines_terms_with_beta_and_warmup():
    model = tiny(VAE, beta=4.0, recon_sigma=0.2)
    x = blobs(2, (16, 16, 16), seed=3)
    out = model.loss(x, kl_weight=0.5, generator=torch.Generator().manual_seed(0))
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"].detach(), out["recon"] + 4.0 * 0.5 * out["kl"])
    # recon is the per-volume Gaussian NLL: sum of squared errors / (2 sigma^2), averaged over the batch.
    recon_x, _, _ = model(x, generator=torch.Generator().manual_seed(0))
    sse_per_volume = (recon_x - x).square().flatten(1).sum(1)
    torch.testing.assert_close(out["recon"], (sse_per_volume / (2 * 0.2**2)).mean())
    with pytest.raises(ValueError, match="kl_weight"):
        model.loss(x, kl_weight=-0.5)


def test_prior_samples_shape_seed_and_reproducibility():
    model = tiny(VAE, (16, 20, 16)).eval()
    with torch.no_grad():
        a = model.sample(3, generator=torch.Generator().manual_seed(0))
        b = model.sample(3, generator=torch.Generator().manual_seed(0))
        c = model.sample(3, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 16, 20, 16)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # distinct draws within a batch too


def test_reparameterisation_gradient_flows_to_mu_and_logvar():
    mu = torch.zeros(4, 8, requires_grad=True)
    logvar = torch.zeros(4, 8, requires_grad=True)
    z = VAE.reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    (z**2).sum().backward()
    assert mu.grad is not None and mu.grad.abs().sum() > 0
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0
    # Through the whole model: both halves of the encoder head receive gradient from the reconstruction.
    model = tiny(VAE)
    model.loss(blobs(2, (16, 16, 16), seed=0), kl_weight=0.0)["loss"].backward()
    head = model.encoder.head[-1].weight.grad
    assert head[: model.latent_dim].abs().sum() > 0 and head[model.latent_dim :].abs().sum() > 0


def test_encode_is_the_deterministic_posterior_mean_and_logvar_is_clamped():
    model = tiny(VAE).eval()
    x = blobs(2, (16, 16, 16), seed=0)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), model.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(model.encode(x), model.posterior(x)[0])
        model.encoder.head[-1].bias[model.latent_dim :] = 1e4  # a diverging log-variance head
        _, logvar = model.posterior(x)
    assert logvar.max() == LOGVAR_MAX


@pytest.mark.parametrize("cls", [Autoencoder, VAE])
def test_losses_are_float32_and_finite_under_bf16_autocast(cls):
    model = tiny(cls)
    x = blobs(2, (16, 16, 16), seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(x) if cls is Autoencoder else model.loss(x, kl_weight=1.0)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------ VAE sampling prior
def _gaussian_latents(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """Correlated, off-centre latents: what a trained encoder's posterior means look like."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * 0.3
    return 2.0 + torch.randn(n, dim, generator=g) @ mix


def test_unfitted_prior_is_the_standard_normal():
    model = tiny(VAE, arch="dense", hidden=[32]).eval()
    assert not model.prior_is_fitted
    with torch.no_grad():
        fitted = model.sample(3, generator=torch.Generator().manual_seed(0))
        standard = model.sample(3, generator=torch.Generator().manual_seed(0), prior="standard")
        by_hand = model.decode(model.prior_latents(3, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(fitted, standard, rtol=0, atol=0)
    torch.testing.assert_close(standard, by_hand, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prior: expected 'fitted' or 'standard'"):
        model.sample_latents(2, prior="aggregate")


def test_fit_prior_is_the_ledoit_wolf_gaussian_of_the_latents_and_sample_draws_from_it():
    from sklearn.covariance import LedoitWolf

    model = tiny(VAE, arch="dense", hidden=[32]).eval()
    latents = _gaussian_latents(60)
    model.fit_prior(latents)
    assert model.prior_is_fitted
    expected = LedoitWolf().fit(latents.double().numpy())
    torch.testing.assert_close(model.prior_mean, torch.tensor(expected.location_, dtype=torch.float32))
    covariance = model.prior_scale_tril @ model.prior_scale_tril.T
    torch.testing.assert_close(covariance, torch.tensor(expected.covariance_, dtype=torch.float32), atol=1e-5, rtol=1e-4)
    draws = model.sample_latents(20_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(draws.mean(0), model.prior_mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), covariance, atol=0.03, rtol=0)
    # sample() decodes those latents; "standard" still decodes N(0, I), far from the fitted mean of 2.
    with torch.no_grad():
        torch.testing.assert_close(
            model.sample(4, torch.Generator().manual_seed(2)),
            model.decode(model.sample_latents(4, torch.Generator().manual_seed(2))),
        )
    standard = model.sample_latents(2000, torch.Generator().manual_seed(3), prior="standard")
    assert standard.mean().abs() < 0.05 and (standard.std() - 1).abs() < 0.05


def test_fit_prior_with_fewer_latents_than_dimensions_stays_positive_definite():
    model = tiny(VAE, arch="dense", hidden=[32], latent_dim=16)
    model.fit_prior(_gaussian_latents(5, dim=16))  # the sample covariance would be singular (rank 4)
    assert torch.isfinite(model.prior_scale_tril).all() and (model.prior_scale_tril.diagonal() > 0).all()


def test_fit_prior_rejects_bad_latents():
    model = tiny(VAE, arch="dense", hidden=[32])
    with pytest.raises(ValueError, match=r"expected latents of shape \(B, 8\)"):
        model.fit_prior(torch.zeros(10, 4))
    with pytest.raises(ValueError, match="at least 2 latent vectors"):
        model.fit_prior(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="NaN or inf"):
        model.fit_prior(torch.full((4, 8), float("nan")))
    assert not model.prior_is_fitted


def test_fitted_prior_is_saved_with_the_weights_and_read_back_weights_only(tmp_path):
    from brainlatent.registry import load_weights

    model = tiny(VAE, arch="dense", hidden=[32])
    model.fit_prior(_gaussian_latents(30))
    torch.save(model.state_dict(), tmp_path / "weights.pt")  # the registered artifact
    again = build_model("vae", json.loads(json.dumps(model.config_dict())))
    again.load_state_dict(load_weights(tmp_path / "weights.pt"), strict=True)
    assert again.prior_is_fitted
    for name in ("prior_mean", "prior_scale_tril"):
        torch.testing.assert_close(getattr(again, name), getattr(model, name), rtol=0, atol=0)
    loaded = load_model(model_checkpoint(model))
    torch.testing.assert_close(loaded.prior_mean, model.prior_mean, rtol=0, atol=0)


def test_weights_saved_before_the_prior_existed_load_with_the_standard_normal_and_a_warning(caplog):
    old = tiny(VAE, arch="dense", hidden=[32])
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("prior_")}
    model = tiny(VAE, arch="dense", hidden=[32], seed=1)
    with caplog.at_level("WARNING", logger="brainlatent.models.vae"):
        model.load_state_dict(state, strict=True)
    assert "saved before the fitted prior" in caplog.text
    assert not model.prior_is_fitted and torch.equal(model.prior_scale_tril, torch.eye(8))
    torch.testing.assert_close(model.decoder[0].weight, old.decoder[0].weight, rtol=0, atol=0)
    # Strictness is kept for everything else: a missing decoder weight still fails.
    del state["decoder.0.weight"]
    with pytest.raises(RuntimeError, match="decoder.0.weight"):
        model.load_state_dict(state, strict=True)


def test_training_fits_the_prior_at_the_end_and_checkpoints_it(tmp_path):
    from brainlatent.config import VAEConfig
    from brainlatent.train.checkpoint import load_checkpoint
    from brainlatent.train.loop import LoopConfig, run_loop
    from brainlatent.train.reconstruction import ReconstructionTask

    cfg = VAEConfig(latent_dim=8, hidden=(32,), epochs=2, batch_size=4, kl_warmup_epochs=0.0)
    train, val = blobs(12, (16, 16, 16), seed=0), blobs(4, (16, 16, 16), seed=1)
    torch.manual_seed(0)
    task = ReconstructionTask("vae", cfg, (16, 16, 16), torch.device("cpu"))
    loop = LoopConfig(epochs=2, batch_size=4, seed=0, checkpoint=tmp_path / "last.pt")
    run_loop(task, train, val, loop)
    model = task.model
    assert model.prior_is_fitted
    with torch.no_grad():
        means = model.encode(train)
    torch.testing.assert_close(model.prior_mean, means.mean(0), atol=1e-5, rtol=0)
    saved = load_checkpoint(tmp_path / "last.pt")["model"]
    assert saved["prior_fitted"] == 1.0
    torch.testing.assert_close(saved["prior_mean"], model.prior_mean, rtol=0, atol=0)
