"""StyleGAN v1 3D: every architectural part against its definition, on tiny volumes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from brainlatent.models.base import MODEL_FAMILIES, build_model, load_model, model_checkpoint
from brainlatent.models.equalized import Blur3d, EqualizedConv3d, EqualizedLinear, PixelNorm, activate
from brainlatent.models.stylegan import (
    AdaIN,
    Discriminator,
    DiscriminatorBlock,
    Generator,
    MappingNetwork,
    MinibatchStd,
    StyleGAN,
    SynthesisLayer,
    default_n_levels,
    discriminator_loss,
    downsample,
    generator_loss,
    level_shapes,
    reals_at_level,
    style_epilogue,
    upsample,
)

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions are fastest single-threaded, and other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(z_dim=16, w_dim=16, n_mapping=8, base_channels=4, max_channels=8)


def tiny_generator(shape=(16, 16, 16), n_levels=3, seed=0) -> Generator:
    torch.manual_seed(seed)
    return Generator(shape, n_levels=n_levels, **TINY)


def set_noise_strength(g: Generator, value: float) -> None:
    for layer in g.synthesis.layers:
        torch.nn.init.constant_(layer.noise.weight, value)


# ------------------------------------------------------------------------------------------- geometry
def test_base_shape_is_derived_from_volume_shape():
    assert default_n_levels((32, 40, 32)) == 4
    assert level_shapes((32, 40, 32), 4)[0] == (4, 5, 4)
    assert level_shapes((16, 16, 16), 4)[0] == (2, 2, 2)
    assert level_shapes((8, 10, 8), 2) == [(4, 5, 4), (8, 10, 8)]
    with pytest.raises(ValueError, match="not divisible"):
        level_shapes((32, 40, 32), 5)
    g = tiny_generator((8, 10, 8), n_levels=2)
    assert g.synthesis.const.shape[2:] == (4, 5, 4)
    assert g(torch.randn(2, 16)).shape == (2, 1, 8, 10, 8)


# ------------------------------------------------------------------------------------------ equalized
def test_equalized_linear_gain_and_effective_weight_std():
    torch.manual_seed(0)
    for lr_mul in (1.0, 0.01):
        layer = EqualizedLinear(256, 512, lr_mul=lr_mul, bias_init=0.5)
        assert layer.weight_gain == pytest.approx(lr_mul / math.sqrt(256))
        # Stored weights are N(0, 1/lr_mul^2); the applied ones have He-like std 1/sqrt(fan_in).
        assert layer.weight.std().item() == pytest.approx(1.0 / lr_mul, rel=0.02)
        assert layer.effective_weight().std().item() == pytest.approx(1.0 / math.sqrt(256), rel=0.02)
        # The effective bias starts at bias_init whatever lr_mul.
        assert torch.allclose(layer.bias * layer.bias_gain, torch.full((512,), 0.5))
        x = torch.randn(3, 256)
        expected = F.linear(x, layer.weight * lr_mul / math.sqrt(256), layer.bias * lr_mul)
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_equalized_conv_gain():
    conv = EqualizedConv3d(6, 5, 3, lr_mul=0.5)
    assert conv.weight_gain == pytest.approx(0.5 / math.sqrt(6 * 27))
    x = torch.randn(2, 6, 5, 5, 5)
    assert torch.allclose(conv(x), F.conv3d(x, conv.weight * conv.weight_gain, conv.bias * 0.5, padding=1), atol=1e-5)


def binomial_blur(x):
    """The definition: a depthwise 3x3x3 [1, 2, 1]^3 / 64 convolution with zero padding."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype)
    kernel = torch.einsum("i,j,k->ijk", k1, k1, k1) / 64.0
    return F.conv3d(x, kernel.expand(x.shape[1], 1, 3, 3, 3), padding=1, groups=x.shape[1])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_blur_is_the_normalised_binomial_filter_in_both_layouts(layout):
    x = torch.randn(2, 3, 5, 6, 7).contiguous(memory_format=layout)
    out = Blur3d()(x)
    assert torch.allclose(out, binomial_blur(x), atol=1e-6)
    assert out.is_contiguous(memory_format=layout)


def test_blur_gradient_is_the_blurred_gradient_and_twice_differentiable():
    """The hand-written backward (the filter is self-adjoint) against autograd's, and R1's double backward."""
    x = torch.randn(2, 2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Blur3d(), (x,))
    assert torch.autograd.gradgradcheck(Blur3d(), (x,))
    xc = x.detach().contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    assert torch.autograd.gradcheck(Blur3d(), (xc,))


def test_lrelu_layers_fold_the_activation_gain_into_their_weights():
    """sqrt(2) * lrelu(y) is computed as lrelu(sqrt(2) * y): the same outputs as activate(...)."""
    torch.manual_seed(0)
    conv = EqualizedConv3d(3, 4, 3, activation="lrelu")
    torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, 3, 4, 5, 4)
    reference = activate(F.conv3d(x, conv.effective_weight(), conv.bias * conv.bias_gain, padding=1), "lrelu")
    assert torch.allclose(conv(x), reference, atol=1e-5)
    linear = EqualizedLinear(6, 5, activation="lrelu", lr_mul=0.1, bias_init=0.3)
    z = torch.randn(3, 6)
    reference = activate(F.linear(z, linear.effective_weight(), linear.bias * 0.1), "lrelu")
    assert torch.allclose(linear(z), reference, atol=1e-5)


def test_up_and_down_convolutions_equal_resampling_around_the_convolution():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, 4, 5, dtype=torch.float64)
    up = EqualizedConv3d(3, 2, 3, up=True).double()
    torch.nn.init.normal_(up.bias)
    w, b = up.effective_weight(), up.bias * up.bias_gain
    assert torch.allclose(up(x), F.conv3d(upsample(x), w, b, padding=1), atol=1e-10)
    down = EqualizedConv3d(3, 2, 3, down=True, activation="lrelu").double()
    w, b = down.effective_weight(), down.bias * down.bias_gain
    assert torch.allclose(down(x), activate(downsample(F.conv3d(x, w, b, padding=1)), "lrelu"), atol=1e-10)
    with pytest.raises(ValueError, match="up/down"):
        EqualizedConv3d(3, 2, 1, up=True)


def test_lr_mul_slows_effective_weight_updates_under_adam():
    """Same effective weights, same loss, same Adam step: lr_mul scales the change of the applied weight."""
    torch.manual_seed(0)
    fast, slow = EqualizedLinear(32, 8, lr_mul=1.0), EqualizedLinear(32, 8, lr_mul=0.01)
    with torch.no_grad():
        slow.weight.copy_(fast.weight / 0.01)
    assert torch.allclose(fast.effective_weight(), slow.effective_weight(), atol=1e-6)
    x = torch.randn(16, 32)
    changes = []
    for layer in (fast, slow):
        before = layer.effective_weight().detach().clone()
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        layer(x).square().mean().backward()
        opt.step()
        changes.append((layer.effective_weight().detach() - before).abs().mean().item())
    assert changes[1] / changes[0] == pytest.approx(0.01, rel=0.05)


# -------------------------------------------------------------------------------------------- mapping
def test_mapping_network_defaults_and_pixel_norm():
    mapping = MappingNetwork(z_dim=16, w_dim=24)
    linears = [m for m in mapping.modules() if isinstance(m, EqualizedLinear)]
    assert len(linears) == 8
    assert all(m.lr_mul == 0.01 and m.activation == "lrelu" for m in linears)
    assert linears[0].weight_gain == pytest.approx(0.01 / math.sqrt(16))
    assert linears[1].weight_gain == pytest.approx(0.01 / math.sqrt(24))
    z = 7.0 * torch.randn(5, 16) + 3.0
    rms = PixelNorm()(z).square().mean(dim=1).sqrt()
    assert torch.allclose(rms, torch.ones(5), atol=1e-5)
    # Pixel norm makes the mapping invariant to the scale of z.
    assert torch.allclose(mapping(z), mapping(10 * z), atol=1e-5)
    assert mapping(z).shape == (5, 24)


# ---------------------------------------------------------------------------------------------- AdaIN
def test_adain_output_has_style_mean_and_std():
    torch.manual_seed(0)
    adain = AdaIN(channels=6, w_dim=8)
    with torch.no_grad():  # make the style depend visibly on w
        adain.to_scale.weight.mul_(3.0)
        adain.to_shift.weight.mul_(3.0)
    x = 4.0 * torch.randn(3, 6, 6, 7, 5) + 2.0
    w = torch.randn(3, 8)
    out = adain(x, w)
    scale, shift = adain.style(w)
    assert torch.allclose(out.mean(dim=(2, 3, 4)), shift, atol=1e-4)
    assert torch.allclose(out.std(dim=(2, 3, 4), unbiased=False), scale.abs(), atol=1e-4)
    assert scale.std() > 0.5  # a real test: styles differ across samples and channels


def composed_epilogue(x, scale, shift, eps, noise=None, strength=None, bias=None, slope=None):
    """style_epilogue's definition written with autograd's ops."""
    if noise is not None:
        x = x + noise * strength.view(1, -1, 1, 1, 1)
    if bias is not None:
        x = x + bias.view(1, -1, 1, 1, 1)
    if slope is not None:
        x = F.leaky_relu(x, slope)
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    var = x.var(dim=(2, 3, 4), keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + eps) * scale[..., None, None, None] + shift[..., None, None, None]


@pytest.mark.parametrize("noise_batch", [3, 1, None])
def test_style_epilogue_forward_and_backward_match_the_composed_definition(noise_batch):
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, 3, 4, 2, **f64)
    strength, bias = torch.randn(4, **f64), torch.randn(4, **f64)
    scale, shift = torch.randn(3, 4, **f64), torch.randn(3, 4, **f64)
    noise = None if noise_batch is None else torch.randn(noise_batch, 1, 3, 4, 2, dtype=torch.float64)
    args = (x, scale, shift, 1e-8)
    kwargs = dict(noise=noise, strength=strength, bias=bias, slope=0.2)
    out = style_epilogue(*args, **kwargs)
    expected = composed_epilogue(*args, **kwargs)
    assert torch.allclose(out, expected, atol=1e-10)
    grad = torch.randn_like(out)
    inputs = (x, scale, shift, bias) if noise is None else (x, scale, shift, bias, strength)
    ours = torch.autograd.grad(out, inputs, grad)
    reference = torch.autograd.grad(expected, inputs, grad)
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, atol=1e-8)
    def epilogue(*tensors):
        return style_epilogue(*tensors, 1e-8, noise=noise, strength=strength)

    assert torch.autograd.gradcheck(epilogue, (x, scale, shift))


def test_style_epilogue_keeps_the_input_dtype_and_computes_in_float32():
    x = (3.0 * torch.randn(2, 3, 4, 4, 4) + 5.0).bfloat16()
    scale, shift = torch.ones(2, 3), torch.zeros(2, 3)
    out = style_epilogue(x, scale, shift, 1e-8)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), composed_epilogue(x.float(), scale, shift, 1e-8), atol=2e-2)


def test_synthesis_layer_computes_v1s_order_of_operations():
    """upsample -> conv -> blur -> noise -> bias -> sqrt(2) * lrelu -> AdaIN, written out step by step."""
    torch.manual_seed(0)
    layer = SynthesisLayer(3, 4, 8, (6, 4, 8), conv="up").double()
    with torch.no_grad():
        for p in (layer.noise.weight, layer.bias):
            p.normal_()
    x, w = torch.randn(2, 3, 3, 2, 4, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    h = binomial_blur(F.conv3d(upsample(x), layer.conv.effective_weight(), padding=1))
    h = h + layer.noise.noise_const * layer.noise.weight.view(1, -1, 1, 1, 1) + layer.bias.view(1, -1, 1, 1, 1)
    expected = composed_epilogue(activate(h, "lrelu"), *layer.adain.style(w), layer.adain.eps)
    assert torch.allclose(layer(x, w, "const"), expected, atol=1e-10)


def test_discriminator_block_is_conv_lrelu_blur_conv_pool_lrelu():
    torch.manual_seed(0)
    block = DiscriminatorBlock(3, 5).double()
    with torch.no_grad():
        block.conv1.bias.normal_()
    x = torch.randn(2, 3, 4, 6, 4, dtype=torch.float64)
    h = block.conv0(x)
    h = F.conv3d(binomial_blur(h), block.conv1.effective_weight(), block.conv1.bias, padding=1)
    assert torch.allclose(block(x), activate(downsample(h), "lrelu"), atol=1e-10)


def test_adain_style_starts_at_identity():
    adain = AdaIN(channels=4, w_dim=8)
    scale, shift = adain.style(torch.zeros(2, 8))
    assert torch.equal(scale, torch.ones(2, 4)) and torch.equal(shift, torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------------- noise
def test_noise_off_is_deterministic_and_on_varies():
    g = tiny_generator()
    z = torch.randn(2, 16)
    # Zero-initialised strengths: random noise has no effect yet.
    assert all(torch.count_nonzero(layer.noise.weight) == 0 for layer in g.synthesis.layers)
    assert torch.equal(g(z, noise_mode="random"), g(z, noise_mode="random"))
    set_noise_strength(g, 0.5)
    assert torch.equal(g(z, noise_mode="none"), g(z, noise_mode="none"))
    assert torch.equal(g(z, noise_mode="const"), g(z, noise_mode="const"))
    a, b = g(z, noise_mode="random"), g(z, noise_mode="random")
    assert (a - b).abs().mean() > 1e-3
    # Seeded noise is reproducible; noise is one map per sample shared by the channels, (B, 1, X, Y, Z).
    seeded = [g(z, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*seeded)
    assert g.synthesis.layers[-1].noise.noise_const.shape == (1, 1, 16, 16, 16)


# ----------------------------------------------------------------------------------------- truncation
def test_truncation_psi_zero_maps_every_z_to_the_average_w_image():
    g = tiny_generator()
    g.update_w_avg(g.mapping(torch.randn(256, 16)), beta=0.0)
    assert g.w_avg.abs().sum() > 0
    z = torch.randn(4, 16)
    out = g(z, psi=0.0, noise_mode="none")
    avg = g.synthesis(g.broadcast(g.w_avg[None]), noise_mode="none")
    assert torch.allclose(out, avg.expand_as(out), atol=1e-5)  # batched vs single conv: float rounding
    assert (g(z, psi=1.0, noise_mode="none") - out).abs().mean() > 1e-3


def test_truncation_cutoff_only_touches_early_layers():
    g = tiny_generator()
    g.update_w_avg(torch.randn(64, 16), beta=0.0)
    ws = g.broadcast(torch.randn(3, 16))
    out = g.truncate(ws, psi=0.5, cutoff=2)
    assert torch.allclose(out[:, :2], g.w_avg + 0.5 * (ws[:, :2] - g.w_avg))
    assert torch.equal(out[:, 2:], ws[:, 2:])


def test_update_w_avg_is_a_moving_average():
    g = tiny_generator()
    w = torch.randn(8, 16)
    g.update_w_avg(w, beta=0.9)
    assert torch.allclose(g.w_avg, 0.1 * w.mean(0), atol=1e-6)
    g.update_w_avg(w, beta=0.9)
    assert torch.allclose(g.w_avg, 0.19 * w.mean(0), atol=1e-6)


# -------------------------------------------------------------------------------------- style mixing
def test_mix_styles_uses_second_w_after_crossover_in_synthesis():
    g = tiny_generator()
    w1, w2 = torch.randn(2, 16), torch.randn(2, 16)
    crossover = 3
    seen = {}
    hooks = [
        layer.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[1].clone()))
        for i, layer in enumerate(g.synthesis.layers)
    ]
    g.synthesis(g.mix_styles(w1, w2, crossover), noise_mode="none")
    for h in hooks:
        h.remove()
    assert len(seen) == g.n_layers == 6
    for i, w in seen.items():
        assert torch.equal(w, w1 if i < crossover else w2), f"layer {i}"


def test_mixing_regularisation_draws_second_z_and_crossover_from_the_generator():
    g = tiny_generator()
    z = torch.randn(3, 16)
    ws = g.styles(z, mixing_prob=1.0, generator=torch.Generator().manual_seed(5))
    # Replay the documented draw order: mixing decision, second z, crossover in [1, n_layers).
    gen = torch.Generator().manual_seed(5)
    torch.rand((), generator=gen)
    z2 = torch.randn(z.shape, generator=gen)
    crossover = 1 + int(torch.rand((), generator=gen) * (g.n_layers - 1))
    expected = g.mix_styles(g.mapping(z), g.mapping(z2), crossover)
    assert torch.equal(ws, expected)
    # Without mixing every layer gets the same w; at step 0 only layers 0-1 are in use, so crossover = 1.
    assert torch.equal(g.styles(z, mixing_prob=0.0), g.broadcast(g.mapping(z)))
    ws0 = g.styles(z, step=0, mixing_prob=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ws0[:, 0], g.mapping(z)) and not torch.equal(ws0[:, 1], ws0[:, 0])


# --------------------------------------------------------------------------------- progressive growing
@pytest.mark.parametrize("step", [1, 2])
def test_alpha_zero_equals_upsampled_lower_resolution_output(step):
    g = tiny_generator()
    set_noise_strength(g, 0.3)
    ws = g.broadcast(g.mapping(torch.randn(2, 16)))
    faded = g.synthesis(ws, step, alpha=0.0, noise_mode="const")
    lower = g.synthesis(ws, step - 1, alpha=1.0, noise_mode="const")
    assert faded.shape[2:] == g.synthesis.shapes[step]
    assert torch.equal(faded, upsample(lower))
    full = g.synthesis(ws, step, alpha=1.0, noise_mode="const")
    half = g.synthesis(ws, step, alpha=0.5, noise_mode="const")
    assert torch.allclose(half, 0.5 * (full + upsample(lower)), atol=1e-5)
    assert not torch.allclose(full, upsample(lower), atol=1e-3)


def test_discriminator_fade_mirrors_the_generator():
    torch.manual_seed(0)
    d = Discriminator((16, 16, 16), n_levels=3, base_channels=4, max_channels=8, mbstd_group_size=2)
    x = torch.rand(4, 1, 16, 16, 16)
    assert torch.equal(d(x, 2, alpha=0.0), d(downsample(x), 1, alpha=1.0))
    assert d(x, 2, alpha=0.7).shape == (4,)
    with pytest.raises(ValueError, match="expected"):
        d(downsample(x), 2, 1.0)
    # Reals follow the same fade: at alpha = 0 they are the lower level, upsampled.
    assert torch.equal(reals_at_level(x, 2, 0.0, 3), upsample(downsample(x)))
    assert torch.equal(reals_at_level(x, 1, 1.0, 3), downsample(x))


# ------------------------------------------------------------------------------------ minibatch stddev
def test_minibatch_std_adds_the_group_std_channel():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 2, 3, 2) * torch.arange(1, 9.0).view(8, 1, 1, 1, 1)
    out = MinibatchStd(group_size=4)(x)
    assert out.shape == (8, 4, 2, 3, 2)
    assert torch.equal(out[:, :3], x)
    n_groups = 8 // 4
    for i in range(8):
        members = x[i % n_groups :: n_groups]  # strided groups, as in StyleGAN
        expected = members.std(dim=0, unbiased=False).mean()
        assert torch.allclose(out[i, 3], expected.expand(2, 3, 2), atol=1e-5)
    assert MinibatchStd(4).group(6) == 3  # ragged batch: the largest divisor <= group_size


# --------------------------------------------------------------------------------------------- losses
class LinearCritic(torch.nn.Module):
    """D(x) = <a, x>: its input gradient is a everywhere, so GP and R1 have closed forms."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, step=None, alpha=1.0):
        return (x * self.a).flatten(1).sum(1)


def test_losses_bind_step_and_alpha_and_match_closed_forms():
    a = torch.randn(1, 1, 4, 4, 4)
    critic = LinearCritic(a)
    real, fake = torch.rand(3, 1, 4, 4, 4), torch.rand(3, 1, 4, 4, 4)
    gap = (critic(fake) - critic(real)).mean()
    wgan = discriminator_loss(critic, real, fake, 1, 0.5, loss="wgan-gp", gp_weight=1.0, drift=0.0)
    assert wgan["loss"].item() == pytest.approx(gap.item() + (a.norm().item() - 1) ** 2, rel=1e-4)
    ns = discriminator_loss(critic, real, fake, 1, 0.5, loss="ns-r1", r1_gamma=2.0)
    adv = F.softplus(critic(fake)).mean() + F.softplus(-critic(real)).mean()
    assert ns["loss"].item() == pytest.approx(adv.item() + a.square().sum().item(), rel=1e-4)
    assert generator_loss(critic, fake, loss="ns-r1").item() == pytest.approx(F.softplus(-critic(fake)).mean().item())
    assert generator_loss(critic, fake, loss="wgan-gp").item() == pytest.approx(-critic(fake).mean().item())
    with pytest.raises(ValueError, match="loss"):
        generator_loss(critic, fake, loss="hinge")


def test_losses_are_float32_and_finite_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = StyleGAN((8, 8, 8), n_levels=2, mbstd_group_size=2, **TINY)
    real = torch.rand(4, 1, 8, 8, 8)
    for loss in ("ns-r1", "wgan-gp"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fake = model.generator(torch.randn(4, 16), 1, 0.5, mixing_prob=0.9)
            parts = discriminator_loss(model.discriminator, model.reals_at_level(real, 1, 0.5), fake, 1, 0.5, loss=loss)
            g_loss = generator_loss(model.discriminator, fake, 1, 0.5, loss=loss)
        assert parts["loss"].dtype == g_loss.dtype == torch.float32
        (parts["loss"] + g_loss).backward()
        assert all(math.isfinite(v.item()) for v in [*parts.values(), g_loss])


# ------------------------------------------------------------------------------------------------ EMA
def test_update_ema_lerps_parameters_and_copies_buffers():
    torch.manual_seed(0)
    model = StyleGAN((8, 8, 8), n_levels=2, **TINY)
    g, ema = model.generator, model.generator_ema
    with torch.no_grad():
        g.synthesis.const.add_(1.0)
    g.update_w_avg(torch.randn(4, 16), beta=0.0)
    p_g, p_e = g.synthesis.const.detach().clone(), ema.synthesis.const.detach().clone()
    model.update_ema(decay=0.75)
    assert torch.allclose(ema.synthesis.const, 0.75 * p_e + 0.25 * p_g, atol=1e-6)
    assert torch.equal(ema.w_avg, g.w_avg)
    model.update_ema(decay=0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), g.state_dict().values()))


# -------------------------------------------------------------------------------------------- wrapper
def test_wrapper_latent_model_contract_and_checkpoint_round_trip():
    torch.manual_seed(0)
    model = StyleGAN((16, 16, 16), n_levels=3, inversion_steps=5, **TINY)
    assert MODEL_FAMILIES["stylegan"] is StyleGAN and model.latent_dim == 16 and model.n_layers == 6
    w = model.mapping(torch.randn(2, 16))
    vol = model.decode(w)
    assert vol.shape == (2, 1, 16, 16, 16) and 0.0 <= vol.min() and vol.max() <= 1.0
    assert torch.equal(model.decode(model.generator_ema.broadcast(w)), vol)  # W+ accepted
    with pytest.raises(ValueError, match="W latents"):
        model.decode(torch.randn(2, 5))
    s1, s2 = (model.sample(3, generator=torch.Generator().manual_seed(0)) for _ in range(2))
    assert s1.shape == (3, 1, 16, 16, 16) and torch.equal(s1, s2)
    with torch.no_grad():
        assert model.encode(vol).shape == (2, 16)
    assert all(p.grad is None for p in model.generator_ema.parameters())

    clone = build_model("stylegan", model.config_dict())
    assert clone.config_dict() == model.config_dict()
    model.generator.update_w_avg(torch.randn(4, 16), beta=0.0)
    model.update_ema(decay=0.0)
    restored = load_model(model_checkpoint(model))
    assert torch.equal(restored.w_avg, model.w_avg)
    assert torch.equal(restored.decode(w), model.decode(w))
    model.train()
    assert not model.generator_ema.training and model.generator.training


# ----------------------------------------------------------------------------------------- overfitting
def test_tiny_stylegan_overfits_a_handful_of_volumes():
    """Progressive training (level 0, fade-in, level 1) pulls the EMA samples' mean towards the data mean."""
    torch.manual_seed(0)
    grid = torch.stack(torch.meshgrid(*(torch.linspace(-1, 1, 8),) * 3, indexing="ij"))
    radii = torch.tensor([0.5, 0.6, 0.7, 0.8]).view(4, 1, 1, 1)
    data = torch.sigmoid((radii - grid.norm(dim=0)) * 12).unsqueeze(1)  # (4, 1, 8, 8, 8) soft spheres
    model = StyleGAN((8, 8, 8), z_dim=16, w_dim=16, n_mapping=2, base_channels=8, max_channels=8,
                     n_levels=2, mbstd_group_size=4)
    g, d = model.generator, model.discriminator
    opt_g = torch.optim.Adam(g.parameters(), lr=1e-2, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-2, betas=(0.0, 0.99))

    def sample_error() -> float:
        with torch.no_grad():
            samples = model.sample(64, generator=torch.Generator().manual_seed(0))
        return F.mse_loss(samples.mean(0), data.mean(0)).item()

    before = sample_error()
    # Seeds 0-3 all reach after/before < 0.06 with this schedule (160 iterations, a few seconds).
    schedule = [(0, 1.0)] * 40 + [(1, (i + 1) / 40) for i in range(40)] + [(1, 1.0)] * 80
    for step, alpha in schedule:
        real = model.reals_at_level(data, step, alpha)
        fake = g(torch.randn(4, 16), step, alpha, mixing_prob=0.9)
        d_loss = discriminator_loss(d, real, fake, step, alpha, loss="wgan-gp")["loss"]
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        fake, ws = g(torch.randn(4, 16), step, alpha, mixing_prob=0.9, return_ws=True)
        g_loss = generator_loss(d, fake, step, alpha, loss="wgan-gp")
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        g.update_w_avg(ws[:, 0])
        model.update_ema(decay=0.9)
    after = sample_error()
    assert after < 0.2 * before, (before, after)
