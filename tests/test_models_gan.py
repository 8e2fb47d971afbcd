"""DCGAN-style 3D GAN: shapes, EMA, penalties, losses and a tiny WGAN-GP run (CPU, 16^3)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainlatent.models.adversarial import (
    gradient_penalty,
    ns_d_loss,
    ns_g_loss,
    r1_penalty,
    update_ema,
    wgan_g_loss,
    wgan_gp_d_loss,
)
from brainlatent.models.base import build_model
from brainlatent.models.gan import GAN
from brainlatent.models.layers import UpBlock, conv3d_avgpool, upsample_conv3d
from conftest import blobs

SHAPE = (16, 16, 16)
TINY = dict(latent_dim=8, g_base_channels=4, g_max_channels=16, d_base_channels=4, d_max_channels=16)




def tiny_gan(shape=SHAPE, seed: int = 0) -> GAN:
    torch.manual_seed(seed)
    return GAN(volume_shape=shape, **TINY)


def linear_critic(shape, weight_norm: float) -> nn.Module:
    """D(x) = <w, x> with ||w||_2 = weight_norm: its input gradient has exactly that norm everywhere."""
    critic = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 1, bias=False))
    with torch.no_grad():
        w = torch.randn_like(critic[1].weight)
        critic[1].weight.copy_(w / w.norm() * weight_norm)
    return critic


class ConstantCritic(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1), 3.0)


# ------------------------------------------------------------------------------ fused resampling convs
@pytest.mark.parametrize("shape", [(3, 4, 5), (5, 2, 3)])
def test_resampling_convolutions_equal_resampling_around_a_convolution(shape):
    """One stride-2 (transposed) convolution each, equal to the two steps they replace, borders included."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *shape, dtype=torch.float64)
    w, b = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    up = F.conv3d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)
    assert torch.allclose(upsample_conv3d(x, w, b), up, atol=1e-10)
    down = F.avg_pool3d(F.conv3d(x, w, b, padding=1), 2)
    assert torch.allclose(conv3d_avgpool(x, w, b), down, atol=1e-10)


def test_resampling_convolutions_train_after_a_first_call_in_inference_mode():
    """The cached tap map is built on the first call; sampling under ``torch.inference_mode()`` often comes
    first (evaluation before training in one process), and the next training step must still backpropagate."""
    from brainlatent.models import layers

    layers._resampling_map.cache_clear()
    x = torch.randn(1, 2, 3, 3, 3)
    w = torch.randn(2, 2, 3, 3, 3, requires_grad=True)
    with torch.inference_mode():
        upsample_conv3d(x, w.detach())
        conv3d_avgpool(x, w.detach())
    (upsample_conv3d(x, w).sum() + conv3d_avgpool(x, w).sum()).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("size", [(6, 8, 4), (5, 7, 4)])
def test_up_block_is_upsampling_then_two_conv_blocks(size):
    torch.manual_seed(0)
    block = UpBlock(3, 2, size, "group").double()
    upsample, first, second = block
    x = torch.randn(2, 3, 3, 4, 2, dtype=torch.float64)
    assert torch.allclose(block(x), second(first(upsample(x))), atol=1e-10)


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("shape", [(16, 16, 16), (16, 20, 16), (32, 40, 32)])
def test_generator_and_critic_shapes(shape):
    gan = tiny_gan(shape)
    z = torch.randn(3, gan.latent_dim)
    fake = gan(z)
    assert fake.shape == (3, 1, *shape) and 0 <= fake.min() and fake.max() <= 1
    assert gan.discriminator(fake.to(memory_format=torch.channels_last_3d)).shape == (3, 1)
    assert gan.decode(z).shape == (3, 1, *shape)
    assert gan.sample(2).shape == (2, 1, *shape)
    assert gan.latent_init(4).shape == (4, gan.latent_dim) and not gan.latent_init(4).any()


def test_decode_and_sample_use_the_ema_generator():
    gan = tiny_gan()
    z = torch.randn(2, gan.latent_dim)
    with torch.no_grad():
        for p in gan.generator.parameters():  # the training generator moves, the EMA does not
            p.add_(0.1)
        torch.testing.assert_close(gan.decode(z), gan.generator_ema(z), rtol=0, atol=0)
        assert not torch.allclose(gan.decode(z), gan(z))
        a = gan.sample(3, torch.Generator().manual_seed(0))
        torch.testing.assert_close(a, gan.sample(3, torch.Generator().manual_seed(0)), rtol=0, atol=0)
        assert not torch.allclose(a, gan.sample(3, torch.Generator().manual_seed(1)))
    assert not any(p.requires_grad for p in gan.generator_ema.parameters())


def test_config_dict_rebuilds_identical_gan():
    gan = tiny_gan((16, 20, 16), seed=2)
    gan.update_ema(0.5)
    rebuilt = build_model("gan", json.loads(json.dumps(gan.config_dict())))
    rebuilt.load_state_dict(gan.state_dict())
    z = torch.randn(2, gan.latent_dim)
    x = blobs(2, (16, 20, 16), seed=0)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.decode(z), gan.decode(z), rtol=0, atol=0)
        torch.testing.assert_close(rebuilt.discriminator(x), gan.discriminator(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in rebuilt.generator_ema.parameters())


# --------------------------------------------------------------------------------------------- penalties
def test_gradient_penalty_vanishes_for_a_unit_norm_linear_critic():
    real, fake = blobs(4, SHAPE, seed=0), torch.rand(4, 1, *SHAPE)
    gp = gradient_penalty(linear_critic(SHAPE, 1.0), real, fake)
    assert gp.dtype == torch.float32 and gp.item() == pytest.approx(0.0, abs=1e-6)
    # ||grad|| = 2 everywhere: the penalty is exactly (2 - 1)^2.
    assert gradient_penalty(linear_critic(SHAPE, 2.0), real, fake).item() == pytest.approx(1.0, rel=1e-4)
    # A real critic is penalised and the penalty is differentiable in the critic's weights.
    critic = tiny_gan().discriminator
    gp = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(0))
    assert gp > 0
    gp.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())


def test_gradient_penalty_interpolates_at_the_generators_uniform_draws():
    """Between real = 0 and fake = 1 the critic sees x_hat = alpha: the seeded generator's U[0, 1) draws, one per
    volume, in the input's dtype (bfloat16 under autocast)."""
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return x.float().flatten(1).sum(1)

    real, fake = torch.zeros(3, 1, *SHAPE), torch.ones(3, 1, *SHAPE)
    alpha = torch.rand(3, 1, 1, 1, 1, generator=torch.Generator().manual_seed(4))
    for dtype in (torch.float32, torch.bfloat16):
        gradient_penalty(Recorder(), real.to(dtype), fake, generator=torch.Generator().manual_seed(4))
        assert seen[-1].dtype == dtype and torch.equal(seen[-1], alpha.to(dtype).expand_as(real))


def test_r1_penalty_is_zero_for_a_constant_critic_and_the_squared_gradient_norm_otherwise():
    real = blobs(3, SHAPE, seed=0)
    assert r1_penalty(ConstantCritic(), real).item() == 0.0
    assert r1_penalty(linear_critic(SHAPE, 3.0), real).item() == pytest.approx(9.0, rel=1e-4)
    # ns_d_loss's R1 (reusing the forward pass) agrees with the standalone penalty.
    critic = tiny_gan().discriminator
    out = ns_d_loss(critic, real, torch.rand(3, 1, *SHAPE), r1_gamma=10.0)
    torch.testing.assert_close(out["r1"], r1_penalty(critic, real).detach())
    torch.testing.assert_close(out["loss"].detach(), out["adv"] + 5.0 * out["r1"])


def test_loss_values_on_a_known_critic():
    real, fake = blobs(2, SHAPE, seed=0), blobs(2, SHAPE, seed=1)
    critic = linear_critic(SHAPE, 1.0)
    with torch.no_grad():
        s_real, s_fake = critic(real), critic(fake)
    out = wgan_gp_d_loss(critic, real, fake, gp_weight=10.0, drift_weight=1e-3)
    torch.testing.assert_close(out["wasserstein"], s_real.mean() - s_fake.mean())
    torch.testing.assert_close(out["loss"].detach(), -out["wasserstein"] + 10 * out["gp"] + 1e-3 * out["drift"])
    torch.testing.assert_close(wgan_g_loss(s_fake), -s_fake.mean())
    torch.testing.assert_close(ns_g_loss(torch.zeros(4, 1)), torch.tensor(math.log(2.0)))


def test_losses_are_float32_and_finite_under_bf16_autocast():
    gan = tiny_gan()
    real = blobs(2, SHAPE, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = gan(torch.randn(2, gan.latent_dim))
        d_outs = [wgan_gp_d_loss(gan.discriminator, real, fake), ns_d_loss(gan.discriminator, real, fake)]
        g_loss = ns_g_loss(gan.discriminator(fake))
    for loss in [*(o["loss"] for o in d_outs), g_loss]:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --------------------------------------------------------------------------------------------------- EMA
def test_ema_decay_zero_copies_and_decay_one_stays_put():
    model, ema = nn.Linear(4, 3), nn.Linear(4, 3)
    before = [p.clone() for p in ema.parameters()]
    update_ema(ema, model, 1.0)
    for p, b in zip(ema.parameters(), before):
        torch.testing.assert_close(p, b, rtol=0, atol=0)
    update_ema(ema, model, 0.5)
    for p, b, m in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(p, (b + m) / 2)
    update_ema(ema, model, 0.0)
    for p, m in zip(ema.parameters(), model.parameters()):
        torch.testing.assert_close(p, m, rtol=0, atol=0)
    with pytest.raises(ValueError, match="decay"):
        update_ema(ema, model, 1.5)


# ------------------------------------------------------------------------------------------------- train
def test_tiny_wgan_gp_training_moves_samples_toward_the_data():
    """40 critic+generator steps on 8 volumes: no NaN, and the EMA samples' mean volume approaches the
    data's mean volume (measured: MSE 0.21 -> 0.02; asserted: at least a 2x drop)."""
    torch.manual_seed(0)
    data = blobs(8, SHAPE, seed=1)
    gan = tiny_gan()
    opt_g = torch.optim.Adam(gan.generator.parameters(), lr=1e-3, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(gan.discriminator.parameters(), lr=1e-3, betas=(0.0, 0.99))

    def mean_mse() -> float:
        with torch.no_grad():
            samples = gan.sample(16, torch.Generator().manual_seed(123))
        return float((samples.mean(0) - data.mean(0)).square().mean())

    start = mean_mse()
    for _ in range(40):
        d = wgan_gp_d_loss(gan.discriminator, data, gan(torch.randn(8, gan.latent_dim)))
        opt_d.zero_grad()
        d["loss"].backward()
        opt_d.step()
        g = wgan_g_loss(gan.discriminator(gan(torch.randn(8, gan.latent_dim))))
        opt_g.zero_grad()
        g.backward()
        opt_g.step()
        gan.update_ema(0.8)
        assert torch.isfinite(d["loss"]) and torch.isfinite(g)
    assert all(torch.isfinite(p).all() for p in gan.parameters())
    assert mean_mse() < start / 2


# ------------------------------------------------------------------------------------------- inversion
def test_encode_inverts_through_the_inversion_module():
    pytest.importorskip("brainlatent.inversion")
    gan = tiny_gan()
    with torch.no_grad():  # a target the EMA generator can reach exactly
        x = gan.synthesize(torch.randn(2, gan.latent_dim, generator=torch.Generator().manual_seed(0)))
    z = gan.encode(x, space="z", steps=60, lr=0.1, compute_ssim=False)
    assert gan.inverts and z.shape == (2, gan.latent_dim) and torch.isfinite(z).all() and not z.requires_grad
    with torch.no_grad():
        err_init = (gan.decode(gan.latent_init(2)) - x).square().mean()
        err_inverted = (gan.decode(z) - x).square().mean()
    assert err_inverted < err_init / 2


# ---------------------------------------------------------------------------------------- template start
def test_template_generators_start_from_the_mean_training_volume():
    """With a silent last layer, both families draw exactly the (clamped) mean of the volumes they were given,
    at every StyleGAN level; the buffer travels with the state dict and into the EMA generator."""
    from brainlatent.models.adversarial import TEMPLATE_EPS
    from brainlatent.models.gan import GAN
    from brainlatent.models.stylegan import StyleGAN, reals_at_level

    torch.manual_seed(0)
    volumes = torch.rand(6, 1, 16, 20, 16) * 0.8
    volumes[:, :, :2] = 0.0  # background: clamped to eps before the logit
    mean = volumes.mean(0, keepdim=True)

    gan = GAN(latent_dim=8, volume_shape=(16, 20, 16), g_base_channels=4, g_max_channels=8, d_base_channels=4,
              d_max_channels=8, template=True)
    gan.set_template(volumes)
    with torch.no_grad():
        gan.generator_ema.decoder.out.weight.zero_()
        gan.generator_ema.decoder.out.bias.zero_()
    expected = mean.clamp(TEMPLATE_EPS, 1 - TEMPLATE_EPS).expand(3, -1, -1, -1, -1)
    assert torch.allclose(gan.sample(3), expected, atol=1e-6)

    sg = StyleGAN(volume_shape=(16, 20, 16), z_dim=8, w_dim=8, n_mapping=2, base_channels=4, max_channels=8,
                  template=True)
    sg.set_template(volumes)
    with torch.no_grad():
        for conv in sg.generator_ema.synthesis.to_volume:
            conv.weight.zero_()
            conv.bias.zero_()
    for level in range(sg.n_levels):
        out = sg.generator_ema(torch.randn(2, 8), level, 1.0)
        assert torch.allclose(out, reals_at_level(mean, level, 1.0, sg.n_levels).clamp(1e-3, 1 - 1e-3), atol=1e-6)
    reloaded = StyleGAN(**sg.config_dict())
    reloaded.load_state_dict(sg.state_dict())
    assert torch.equal(reloaded.generator.synthesis.template_logit_0, sg.generator.synthesis.template_logit_0)


def test_models_saved_before_the_template_option_load_as_plain_generators():
    from brainlatent.models.gan import GAN

    config = GAN(latent_dim=8, volume_shape=(16, 20, 16)).config_dict()
    config.pop("template")  # what a config of an earlier release holds
    assert not hasattr(GAN(**config).generator, "template_logit")


def test_the_minibatch_std_critic_sees_how_much_a_batch_varies():
    """gan.d_mbstd_group_size: the same volume scores differently in a batch of copies (a collapsed generator)
    than among varied volumes; without the layer a score depends on its own volume only."""
    from brainlatent.models.gan import GAN

    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 20, 16)
    copies = x[:1].expand(4, -1, -1, -1, -1)
    for group, depends_on_batch in ((4, True), (0, False)):
        critic = GAN(latent_dim=8, volume_shape=(16, 20, 16), d_base_channels=4, d_max_channels=8,
                     d_mbstd_group_size=group).discriminator
        with torch.no_grad():
            differs = not torch.allclose(critic(x)[0], critic(copies)[0], atol=1e-6)
        assert differs == depends_on_batch, group
