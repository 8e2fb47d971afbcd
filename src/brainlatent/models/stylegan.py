"""StyleGAN v1 (Karras et al., 2019) in 3D, with progressive growing.

Follows the official v1 design (NVlabs/stylegan) with the equalized-LR convention of stylegan2-ada-pytorch:

* mapping network: pixel norm of z, ``n_mapping`` equalized FC layers (LeakyReLU, lr multiplier 0.01);
* synthesis network: a learned constant at the base shape (e.g. (4, 5, 4) for a (32, 40, 32) volume), then
  per resolution level two style layers ``[upsample -> conv -> blur] -> noise -> bias -> lrelu -> AdaIN``;
  every level has a 1x1x1 ``to_volume`` ("toRGB") followed by a sigmoid (volumes are in [0, 1]; see forward);
* progressive growing: ``step`` (resolution level) and ``alpha`` (fade-in weight) are explicit forward
  arguments; at ``alpha < 1`` the output is ``lerp(upsample(to_volume[step-1](prev)), to_volume[step](cur),
  alpha)`` and the discriminator mirrors it with ``from_volume`` layers;
* discriminator: ``from_volume -> [conv -> blur -> conv -> avgpool]*`` then minibatch standard deviation,
  conv, two FC layers; WGAN-GP (+ drift) or non-saturating logistic + R1 losses (adversarial.py's, bound to the
  current step and alpha);
* style mixing regularisation, truncation trick around a tracked ``w_avg``, generator EMA.

Layer index convention: level ``l`` (0 = base shape) owns style layers ``2l`` and ``2l + 1``; a W+ latent is
(B, n_layers, w_dim) with ``n_layers = 2 * n_levels``.

Written by hand (MONAI has no style-based generator); rosinality's and NVIDIA's v1 code were the references.
Where the same numbers (up to rounding) can be had for less work, the layers compute them that way: upsampling
and conv as one transposed conv, conv and pooling as one strided conv (v1 does both at high resolution),
noise -> bias -> lrelu -> AdaIN as one autograd node (:func:`style_epilogue`); BENCHMARKS.md has the numbers.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainlatent.inversion import InversionResult, invert
from brainlatent.models.adversarial import MinibatchStd, ns_d_loss, ns_g_loss, update_ema, template_logit, wgan_g_loss, wgan_gp_d_loss
from brainlatent.models.base import LatentModel, constructor_config, rand_on, randn_on, register_family
from brainlatent.models.equalized import (
    LRELU_GAIN,
    LRELU_SLOPE,
    Blur3d,
    EqualizedConv3d,
    EqualizedLinear,
    PixelNorm,
)
from brainlatent.models.layers import Shape3, as_shape3

NoiseMode = Literal["random", "const", "none"]
GanLoss = Literal["ns-r1", "wgan-gp"]
NOISE_MODES = ("random", "const", "none")


# ------------------------------------------------------------------------------------------- geometry
def default_n_levels(volume_shape: Sequence[int], min_base: int = 4) -> int:
    """Most resolution levels such that every axis of the base shape is an integer >= ``min_base``.

    >>> default_n_levels((32, 40, 32)), default_n_levels((16, 16, 16)), default_n_levels((160, 192, 160))
    (4, 3, 6)
    """
    shape = as_shape3(volume_shape)
    if min(shape) < min_base:
        raise ValueError(f"volume_shape {shape}: every axis must be >= {min_base} for a StyleGAN base shape")
    levels = 1
    while all(s % 2 == 0 and s // 2 >= min_base for s in shape):
        shape = tuple(s // 2 for s in shape)
        levels += 1
    return levels


def level_shapes(volume_shape: Sequence[int], n_levels: int) -> list[Shape3]:
    """Spatial shape at each resolution level, base first: each level doubles every axis.

    >>> level_shapes((32, 40, 32), 4)
    [(4, 5, 4), (8, 10, 8), (16, 20, 16), (32, 40, 32)]
    """
    shape = as_shape3(volume_shape)
    if n_levels < 1:
        raise ValueError(f"n_levels: expected a positive integer, got {n_levels}")
    factor = 2 ** (n_levels - 1)
    if any(s % factor for s in shape):
        raise ValueError(
            f"volume_shape {shape} is not divisible by 2**(n_levels-1) = {factor} on every axis "
            f"(n_levels={n_levels}); choose fewer levels or a shape whose axes are multiples of {factor}"
        )
    base = tuple(s // factor for s in shape)
    return [tuple(b * 2**level for b in base) for level in range(n_levels)]  # type: ignore[misc]


def level_channels(n_levels: int, base_channels: int, max_channels: int) -> list[int]:
    """Feature width per level, base first: ``base_channels`` at full resolution, doubling towards the
    base shape up to ``max_channels`` (v1's ``nf(stage)`` schedule)."""
    if base_channels < 1 or max_channels < 1:
        raise ValueError(f"base_channels/max_channels must be positive, got {base_channels}/{max_channels}")
    return [min(max_channels, base_channels * 2 ** (n_levels - 1 - level)) for level in range(n_levels)]


def _check_step_alpha(step: int, alpha: float, n_levels: int) -> None:
    if not 0 <= step < n_levels:
        raise ValueError(f"step: expected a resolution level in [0, {n_levels - 1}], got {step}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a fade-in weight in [0, 1], got {alpha}")


def upsample(x: Tensor) -> Tensor:
    """Nearest-neighbour x2 upsampling of every axis (v1's ``upscale2d``). (B, C, X, Y, Z) -> (B, C, 2X, 2Y, 2Z)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def downsample(x: Tensor) -> Tensor:
    """x2 box-filter downsampling of every axis (v1's ``downscale2d``)."""
    return F.avg_pool3d(x, kernel_size=2)


def fade(low: Tensor, high: Tensor, alpha: float) -> Tensor:
    """Progressive-growing fade-in ``lerp(low, high, alpha)``; alpha = 0 returns ``low`` exactly.

    ``high`` is cast to ``low``'s dtype (under autocast the two paths may differ).
    """
    return torch.lerp(low, high.to(low.dtype), alpha)


def reals_at_level(x: Tensor, step: int, alpha: float, n_levels: int) -> Tensor:
    """Real volumes as the discriminator should see them at (step, alpha).

    Box-downsampled to level ``step``; during a fade-in (alpha < 1) blended with their own lower-level
    version upsampled back, exactly what the generator's fade-in produces (v1's ``process_reals``).
    (B, 1, *final_shape) -> (B, 1, *level_shapes[step]).
    """
    _check_step_alpha(step, alpha, n_levels)
    for _ in range(n_levels - 1 - step):
        x = downsample(x)
    if step > 0 and alpha < 1.0:
        x = fade(upsample(downsample(x)), x, alpha)
    return x


# ------------------------------------------------------------------------------------------- mapping
class MappingNetwork(nn.Module):
    """z (B, z_dim) -> w (B, w_dim): pixel norm then ``n_layers`` equalized FC + LeakyReLU(0.2) layers.

    ``lr_mul`` (0.01 in StyleGAN) slows the mapping network's effective learning rate 100x; it is applied
    in the equalized weight and bias gains.
    """

    def __init__(self, z_dim: int, w_dim: int, n_layers: int = 8, lr_mul: float = 0.01) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_mapping: expected >= 1 mapping layers, got {n_layers}")
        self.z_dim, self.w_dim = z_dim, w_dim
        self.norm = PixelNorm()
        dims = [z_dim] + [w_dim] * n_layers
        self.layers = nn.Sequential(
            *(EqualizedLinear(i, o, lr_mul=lr_mul, activation="lrelu") for i, o in zip(dims[:-1], dims[1:]))
        )

    def forward(self, z: Tensor) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"mapping: expected z of shape (B, {self.z_dim}), got {tuple(z.shape)}")
        return self.layers(self.norm(z))


# ----------------------------------------------------------------------------------------- synthesis
class NoiseInjection(nn.Module):
    """Single-channel Gaussian noise (B, 1, X, Y, Z) and its learned per-channel strength (C,).

    The strength starts at zero (v1). Modes: ``random`` draws fresh noise, ``const`` uses a fixed buffer
    drawn at construction (deterministic synthesis, e.g. for ``decode`` and inversion), ``none`` skips it.
    The noise is added inside :func:`style_epilogue`, fused with the bias, activation and AdaIN.
    """

    def __init__(self, channels: int, shape: Shape3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels))
        self.register_buffer("noise_const", torch.randn(1, 1, *shape))

    def draw(self, x: Tensor, mode: NoiseMode = "random", generator: torch.Generator | None = None) -> Tensor | None:
        """Noise for features ``x`` (B, C, X, Y, Z): (B or 1, 1, X, Y, Z), or None for mode ``none``."""
        if mode == "none":
            return None
        if mode == "const":
            return self.noise_const
        if mode == "random":
            return randn_on(generator, (x.shape[0], 1, *x.shape[2:]), x.device)
        raise ValueError(f"noise_mode: expected one of {NOISE_MODES}, got {mode!r}")


def _per_channel(t: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, 1, 1) and (B, C) -> (B, C, 1, 1, 1), to broadcast over (B, C, X, Y, Z)."""
    return t.view(1, -1, 1, 1, 1) if t.ndim == 1 else t.view(*t.shape, 1, 1, 1)


class _StyleEpilogue(torch.autograd.Function):
    """Forward and backward of :func:`style_epilogue` written out.

    Composed from autograd's ops, the chain made ~15 passes over every feature volume forward and ~20
    backward, more time than the convolutions at width 64 (profiled, BENCHMARKS.md); here it is ~5 and
    ~9. Differentiable once, which is all the generator needs (R1 and the gradient penalty differentiate
    the discriminator twice, never the generator).
    """

    @staticmethod
    def forward(ctx, x, noise, strength, bias, scale, shift, slope, eps):  # type: ignore[override]
        dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in float32 at least (bf16 autocast)
        a = x.to(dtype)
        if noise is not None:
            a = torch.addcmul(a, noise.to(dtype), _per_channel(strength.to(dtype)))
        if bias is not None:
            bias = _per_channel(bias.to(dtype))
            a = a + bias if a is x else a.add_(bias)
        if slope is not None:
            a = F.leaky_relu(a, slope) if a is x else F.leaky_relu_(a, slope)
        # Two passes (mean, then mean square of the centred copy): as exact as var_mean's Welford update and
        # 8x faster on CPU at the default shape (measured); the centred copy is not kept.
        mean = a.mean(dim=(2, 3, 4), keepdim=True)
        rstd = torch.rsqrt((a - mean).square_().mean(dim=(2, 3, 4), keepdim=True) + eps)
        scale = _per_channel(scale.to(dtype))
        k = scale * rstd
        out = torch.addcmul(_per_channel(shift.to(dtype)) - mean * k, a, k)
        ctx.save_for_backward(a, noise, mean, rstd, scale)
        ctx.slope, ctx.x_dtype = slope, x.dtype
        ctx.param_dtypes = [None if t is None else t.dtype for t in (strength, bias, scale, shift)]
        return out.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        a, noise, mean, rstd, scale = ctx.saved_tensors
        g = grad.to(a.dtype)
        n = a[0, 0].numel()
        dims = (2, 3, 4)
        d_shift = g.sum(dims, keepdim=True)
        d_scale = ((g * a).sum(dims, keepdim=True) - mean * d_shift) * rstd  # sum of g * normalised a
        # d a = scale * rstd * (g - mean(g) - normalised_a * mean(g * normalised_a)), as k1 * g + k2 * a + k3
        k1 = scale * rstd
        k2 = -k1 * rstd * d_scale / n
        k3 = -k1 * d_shift / n - k2 * mean
        da = torch.addcmul(k3, g, k1).addcmul_(a, k2)
        if ctx.slope is not None:  # a is the activation's output: it has the sign of its input
            da = torch.ops.aten.leaky_relu_backward(da, a, ctx.slope, True)
        need = ctx.needs_input_grad
        d_strength = (da * noise).sum((0, 2, 3, 4)) if need[2] else None
        d_bias = da.sum((0, 2, 3, 4)) if need[3] else None
        s_dtype, b_dtype, scale_dtype, shift_dtype = ctx.param_dtypes
        return (
            da.to(ctx.x_dtype) if need[0] else None,
            None,
            None if d_strength is None else d_strength.to(s_dtype),
            None if d_bias is None else d_bias.to(b_dtype),
            d_scale.flatten(1).to(scale_dtype) if need[4] else None,
            d_shift.flatten(1).to(shift_dtype) if need[5] else None,
            None,
            None,
        )


def style_epilogue(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    eps: float,
    *,
    noise: Tensor | None = None,
    strength: Tensor | None = None,
    bias: Tensor | None = None,
    slope: float | None = None,
) -> Tensor:
    """``AdaIN(leaky_relu(x + noise * strength + bias, slope))`` in one autograd node.

    AdaIN: ``scale * (a - mean) / sqrt(var + eps) + shift`` with per-sample, per-channel statistics over
    the volume (float32 at least). x: (B, C, X, Y, Z); noise: (B or 1, 1, X, Y, Z) with strength (C,), or
    None; bias (C,) or None; slope None skips the activation; scale, shift: (B, C). Returns x's dtype.
    """
    if noise is None:
        strength = None
    elif strength is None:
        raise ValueError("style_epilogue: noise needs its per-channel strength")
    return _StyleEpilogue.apply(x, noise, strength, bias, scale, shift, slope, eps)


class AdaIN(nn.Module):
    """Adaptive instance normalisation: ``scale(w) * instance_norm(x) + shift(w)``.

    ``scale`` and ``shift`` are equalized affine maps of w with biases initialised to 1 and 0, so an
    untrained layer passes the normalised features through. Statistics are computed in float32.
    x: (B, C, X, Y, Z), w: (B, w_dim) -> (B, C, X, Y, Z).
    """

    def __init__(self, channels: int, w_dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.to_scale = EqualizedLinear(w_dim, channels, bias_init=1.0)
        self.to_shift = EqualizedLinear(w_dim, channels, bias_init=0.0)

    def style(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel (scale, shift), each (B, C)."""
        return self.to_scale(w), self.to_shift(w)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return style_epilogue(x, *self.style(w), self.eps)


class SynthesisLayer(nn.Module):
    """One style layer: ``[upsample] -> [conv 3x3x3] -> [blur] -> noise -> bias -> lrelu -> AdaIN(w)``.

    ``conv``: ``"none"`` (the first layer, applied to the learned constant), ``"same"`` or ``"up"``
    (x2 nearest upsampling before the conv, blur after it, as in v1; upsampling and conv run as one
    transposed convolution). Output spatial shape: ``shape``. The LeakyReLU's sqrt(2) gain is left out:
    AdaIN's normalisation removes any positive factor, and halving its eps keeps the result the same.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        shape: Shape3,
        *,
        conv: Literal["none", "same", "up"],
        blur: bool = True,
    ) -> None:
        super().__init__()
        if conv == "none" and in_channels != out_channels:
            raise ValueError("a SynthesisLayer without conv needs in_channels == out_channels")
        self.up = conv == "up"
        self.conv = None if conv == "none" else EqualizedConv3d(in_channels, out_channels, 3, bias=False, up=self.up)
        self.blur = Blur3d() if (self.up and blur) else None
        self.noise = NoiseInjection(out_channels, shape)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.adain = AdaIN(out_channels, w_dim)

    def forward(
        self, x: Tensor, w: Tensor, noise_mode: NoiseMode = "random", generator: torch.Generator | None = None
    ) -> Tensor:
        if self.conv is not None:
            x = self.conv(x)
        if self.blur is not None:
            x = self.blur(x)
        noise = self.noise.draw(x, noise_mode, generator)
        eps = self.adain.eps / LRELU_GAIN**2  # AdaIN(gain * a, eps) == AdaIN(a, eps / gain^2)
        return style_epilogue(
            x, *self.adain.style(w), eps, noise=noise, strength=self.noise.weight, bias=self.bias, slope=LRELU_SLOPE
        )


class SynthesisNetwork(nn.Module):
    """W+ styles (B, n_layers, w_dim) -> volumes (B, 1, *level_shapes[step]) with progressive fade-in."""

    def __init__(
        self,
        volume_shape: Sequence[int],
        w_dim: int,
        n_levels: int,
        base_channels: int,
        max_channels: int,
        blur: bool = True,
        template: bool = False,
    ) -> None:
        super().__init__()
        self.w_dim, self.n_levels = w_dim, n_levels
        self.shapes = level_shapes(volume_shape, n_levels)
        self.channels = level_channels(n_levels, base_channels, max_channels)
        c0 = self.channels[0]
        # Random (not v1's all-ones) constant: the first AdaIN then sees spatial structure from step one.
        self.const = nn.Parameter(torch.randn(1, c0, *self.shapes[0]))
        layers: list[SynthesisLayer] = []
        for level, (shape, ch) in enumerate(zip(self.shapes, self.channels)):
            in_ch = c0 if level == 0 else self.channels[level - 1]
            first = "none" if level == 0 else "up"
            layers.append(SynthesisLayer(in_ch, ch, w_dim, shape, conv=first, blur=blur))
            layers.append(SynthesisLayer(ch, ch, w_dim, shape, conv="same", blur=blur))
        self.layers = nn.ModuleList(layers)
        self.to_volume = nn.ModuleList(EqualizedConv3d(ch, 1, 1) for ch in self.channels)
        # template: each level's output is a deviation, in logit space, from the mean training volume at that
        # level (set_template; the DCGAN's TemplateGenerator does the same). Not in StyleGAN v1: with ~100
        # volumes and a CPU budget, the generator otherwise spends its steps drawing an average brain first.
        self.template = bool(template)
        if self.template:
            for level, shape in enumerate(self.shapes):
                self.register_buffer(f"template_logit_{level}", torch.zeros(1, 1, *shape))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def set_template(self, volumes: Tensor) -> None:
        """Each level's template: the mean of ``volumes`` (N, 1, X, Y, Z) box-downsampled to the level, as a
        logit (:func:`adversarial.template_logit`). A no-op without ``template``."""
        if not self.template:
            return
        mean = volumes.float().mean(0, keepdim=True)
        for level in range(self.n_levels):
            logit = template_logit(reals_at_level(mean, level, 1.0, self.n_levels))
            buffer = getattr(self, f"template_logit_{level}")
            buffer.copy_(logit.to(buffer.device))

    def _volume(self, level: int, x: Tensor) -> Tensor:
        """The level's 1x1x1 to_volume, plus its template logit if any, through the sigmoid."""
        logits = self.to_volume[level](x)
        if self.template:
            logits = logits + getattr(self, f"template_logit_{level}").to(logits.dtype)
        return torch.sigmoid(logits)

    def forward(
        self,
        ws: Tensor,
        step: int | None = None,
        alpha: float = 1.0,
        noise_mode: NoiseMode = "random",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """ws: (B, n_layers, w_dim); step defaults to the final level. Returns (B, 1, *shapes[step])."""
        step = self.n_levels - 1 if step is None else step
        _check_step_alpha(step, alpha, self.n_levels)
        if ws.ndim != 3 or ws.shape[1:] != (self.n_layers, self.w_dim):
            raise ValueError(
                f"synthesis: expected W+ styles of shape (B, {self.n_layers}, {self.w_dim}), got {tuple(ws.shape)}"
            )
        x = self.const.expand(ws.shape[0], -1, -1, -1, -1)
        prev = x
        for level in range(step + 1):
            prev = x
            for i in (2 * level, 2 * level + 1):
                x = self.layers[i](x, ws[:, i], noise_mode, generator)
        # Processed volumes live in [0, 1] (mean ~0.15, SD ~0.23), but the AdaIN-normalised features give a
        # linear "toRGB" output of SD ~1.2 at initialisation: with a linear output the generator spent the whole
        # CPU budget unlearning that scale and its samples stayed noise (measured, docs/architecture.md). A
        # sigmoid after each to_volume (as in our DCGAN) keeps every output in range; the fade mixes the
        # activated outputs, so alpha = 0 still reproduces the lower level exactly.
        out = self._volume(step, x)
        if step > 0 and alpha < 1.0:
            # lerp(a, b, 0) == a exactly, so alpha = 0 reproduces the lower level bit for bit.
            out = fade(upsample(self._volume(step - 1, prev)), out, alpha)
        return out


# ----------------------------------------------------------------------------------------- generator
class Generator(nn.Module):
    """Mapping + synthesis, with style mixing, truncation around ``w_avg`` and the running ``w_avg``.

    ``w_avg`` (w_dim,) is a buffer, zero at construction, updated by :meth:`update_w_avg` (the training
    loop calls it with each batch's w).
    """

    def __init__(
        self,
        volume_shape: Sequence[int],
        z_dim: int = 128,
        w_dim: int = 128,
        n_mapping: int = 8,
        mapping_lr_mul: float = 0.01,
        n_levels: int | None = None,
        base_channels: int = 16,
        max_channels: int = 128,
        blur: bool = True,
        template: bool = False,
    ) -> None:
        super().__init__()
        n_levels = default_n_levels(volume_shape) if n_levels is None else n_levels
        self.z_dim, self.w_dim, self.n_levels = z_dim, w_dim, n_levels
        self.mapping = MappingNetwork(z_dim, w_dim, n_mapping, mapping_lr_mul)
        self.synthesis = SynthesisNetwork(volume_shape, w_dim, n_levels, base_channels, max_channels, blur, template)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    @property
    def n_layers(self) -> int:
        return self.synthesis.n_layers

    @torch.no_grad()
    def update_w_avg(self, w: Tensor, beta: float = 0.995) -> None:
        """``w_avg <- lerp(mean(w), w_avg, beta)`` (v1's dlatent_avg). w: (B, w_dim) or (B, n_layers, w_dim)."""
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"update_w_avg: beta must be in [0, 1], got {beta}")
        batch_mean = w.detach().float().reshape(-1, self.w_dim).mean(dim=0)
        self.w_avg.copy_(torch.lerp(batch_mean, self.w_avg, beta))

    def broadcast(self, w: Tensor) -> Tensor:
        """W (B, w_dim) -> W+ (B, n_layers, w_dim); W+ passes through (shape-checked)."""
        if w.ndim == 2 and w.shape[1] == self.w_dim:
            return w.unsqueeze(1).expand(-1, self.n_layers, -1)
        if w.ndim == 3 and w.shape[1:] == (self.n_layers, self.w_dim):
            return w
        raise ValueError(
            f"expected W latents (B, {self.w_dim}) or W+ latents (B, {self.n_layers}, {self.w_dim}), "
            f"got {tuple(w.shape)}"
        )

    def truncate(self, ws: Tensor, psi: float = 1.0, cutoff: int | None = None) -> Tensor:
        """Truncation trick: ``w_avg + psi * (w - w_avg)`` on layers ``< cutoff`` (all layers if None)."""
        if psi == 1.0:
            return ws
        cutoff = self.n_layers if cutoff is None else cutoff
        mask = (torch.arange(self.n_layers, device=ws.device) < cutoff).view(1, -1, 1)
        truncated = torch.lerp(self.w_avg.to(ws.dtype), ws, psi)
        return torch.where(mask, truncated, ws)

    def mix_styles(self, w1: Tensor, w2: Tensor, crossover: int) -> Tensor:
        """W+ (B, n_layers, w_dim) whose layers ``< crossover`` use w1 and the rest w2 (each (B, w_dim))."""
        if not 0 <= crossover <= self.n_layers:
            raise ValueError(f"crossover: expected a layer index in [0, {self.n_layers}], got {crossover}")
        first = (torch.arange(self.n_layers, device=w1.device) < crossover).view(1, -1, 1)
        return torch.where(first, w1.unsqueeze(1), w2.unsqueeze(1))

    def styles(
        self,
        z: Tensor,
        step: int | None = None,
        *,
        mixing_prob: float = 0.0,
        psi: float = 1.0,
        truncation_cutoff: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """z (B, z_dim) -> W+ (B, n_layers, w_dim) with optional style mixing and truncation.

        Style mixing (v1): with probability ``mixing_prob`` a second z is mapped and the whole batch
        switches to it at a crossover drawn uniformly from [1, layers in use at ``step``).
        """
        step = self.n_levels - 1 if step is None else step
        if not 0.0 <= mixing_prob <= 1.0:
            raise ValueError(f"mixing_prob: expected a probability in [0, 1], got {mixing_prob}")
        w = self.mapping(z)
        ws = self.broadcast(w)
        layers_in_use = 2 * (step + 1)
        if mixing_prob > 0:
            draw = float(rand_on(generator, (), z.device))
            if draw < mixing_prob:
                w2 = self.mapping(randn_on(generator, tuple(z.shape), z.device).to(z.dtype))
                crossover = 1 + int(float(rand_on(generator, (), z.device)) * (layers_in_use - 1))
                ws = self.mix_styles(w, w2, crossover)
        return self.truncate(ws, psi, truncation_cutoff)

    def forward(
        self,
        z: Tensor,
        step: int | None = None,
        alpha: float = 1.0,
        *,
        mixing_prob: float = 0.0,
        psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: NoiseMode = "random",
        generator: torch.Generator | None = None,
        return_ws: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """z (B, z_dim) -> volumes (B, 1, *level_shape[step]); with ``return_ws`` also the W+ used.

        The training loop (psi = 1) can feed ``ws[:, 0]``, the first z's w (never mixed), to
        :meth:`update_w_avg`.
        """
        ws = self.styles(
            z, step, mixing_prob=mixing_prob, psi=psi, truncation_cutoff=truncation_cutoff, generator=generator
        )
        img = self.synthesis(ws, step, alpha, noise_mode, generator)
        return (img, ws) if return_ws else img


# ------------------------------------------------------------------------------------- discriminator
class DiscriminatorBlock(nn.Module):
    """``conv(c_in -> c_in) -> lrelu -> [blur] -> conv(c_in -> c_out) -> avgpool x2 -> lrelu`` (v1).

    The second conv and the pooling run as one stride-2 convolution (``EqualizedConv3d(down=True)``); the
    bias commutes with average pooling, so this equals v1's conv -> pool -> bias -> act.
    """

    def __init__(self, in_channels: int, out_channels: int, blur: bool = True) -> None:
        super().__init__()
        self.conv0 = EqualizedConv3d(in_channels, in_channels, 3, activation="lrelu")
        self.blur = Blur3d() if blur else nn.Identity()
        self.conv1 = EqualizedConv3d(in_channels, out_channels, 3, activation="lrelu", down=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv1(self.blur(self.conv0(x)))


class Discriminator(nn.Module):
    """Volumes (B, 1, *level_shapes[step]) -> scores (B,), mirroring the generator's fade-in.

    At ``alpha < 1`` the features entering level ``step - 1`` are
    ``lerp(from_volume[step-1](downsample(x)), block[step](from_volume[step](x)), alpha)``.
    """

    def __init__(
        self,
        volume_shape: Sequence[int],
        n_levels: int | None = None,
        base_channels: int = 16,
        max_channels: int = 128,
        mbstd_group_size: int = 4,
        blur: bool = True,
    ) -> None:
        super().__init__()
        self.n_levels = default_n_levels(volume_shape) if n_levels is None else n_levels
        self.shapes = level_shapes(volume_shape, self.n_levels)
        self.channels = level_channels(self.n_levels, base_channels, max_channels)
        self.from_volume = nn.ModuleList(EqualizedConv3d(1, ch, 1, activation="lrelu") for ch in self.channels)
        # blocks[l] maps level l to level l - 1; blocks[0] is unused (the epilogue handles level 0).
        self.blocks = nn.ModuleList(
            [nn.Identity()]
            + [DiscriminatorBlock(self.channels[l], self.channels[l - 1], blur) for l in range(1, self.n_levels)]
        )
        c0 = self.channels[0]
        self.mbstd = MinibatchStd(mbstd_group_size)
        self.conv = EqualizedConv3d(c0 + 1, c0, 3, activation="lrelu")
        self.fc = EqualizedLinear(c0 * math.prod(self.shapes[0]), c0, activation="lrelu")
        self.out = EqualizedLinear(c0, 1)

    def forward(self, x: Tensor, step: int | None = None, alpha: float = 1.0) -> Tensor:
        step = self.n_levels - 1 if step is None else step
        _check_step_alpha(step, alpha, self.n_levels)
        if x.ndim != 5 or tuple(x.shape[1:]) != (1, *self.shapes[step]):
            raise ValueError(
                f"discriminator at step {step}: expected (B, 1, {', '.join(map(str, self.shapes[step]))}), "
                f"got {tuple(x.shape)}"
            )
        h = self.from_volume[step](x)
        for level in range(step, 0, -1):
            h = self.blocks[level](h)
            if level == step and alpha < 1.0:
                h = fade(self.from_volume[step - 1](downsample(x)), h, alpha)
        h = self.conv(self.mbstd(h))
        return self.out(self.fc(h.flatten(1))).squeeze(1)


# -------------------------------------------------------------------------------------------- losses
# The adversarial losses and EMA are adversarial.py's; here they are bound to the current (step, alpha).
def discriminator_loss(
    D: Discriminator,
    real: Tensor,
    fake: Tensor,
    step: int | None = None,
    alpha: float = 1.0,
    *,
    loss: GanLoss = "ns-r1",
    r1_gamma: float = 10.0,
    gp_weight: float = 10.0,
    drift: float = 1e-3,
) -> dict[str, Tensor]:
    """Discriminator loss at (step, alpha): ``{"loss": float32 scalar, ...detached parts}``.

    ``ns-r1``: softplus(D(fake)) + softplus(-D(real)) + r1_gamma / 2 * R1 (v1's D_logistic_simplegp,
    :func:`adversarial.ns_d_loss`). ``wgan-gp``: D(fake) - D(real) + gp_weight * GP + drift * D(real)^2 (v1's
    D_wgan_gp, :func:`adversarial.wgan_gp_d_loss`). ``real`` must already be at (step, alpha) (see
    :func:`reals_at_level`); ``fake`` is detached.
    """
    critic = functools.partial(D, step=step, alpha=alpha)
    if loss == "ns-r1":
        return ns_d_loss(critic, real, fake, r1_gamma=r1_gamma)  # type: ignore[arg-type]
    if loss == "wgan-gp":
        return wgan_gp_d_loss(critic, real, fake, gp_weight=gp_weight, drift_weight=drift)  # type: ignore[arg-type]
    raise ValueError(f"loss: expected 'ns-r1' or 'wgan-gp', got {loss!r}")


def generator_loss(
    D: Discriminator, fake: Tensor, step: int | None = None, alpha: float = 1.0, *, loss: GanLoss = "ns-r1"
) -> Tensor:
    """Generator loss (float32 scalar) at (step, alpha): softplus(-D(fake)) (ns-r1) or -D(fake) (wgan-gp)."""
    if loss not in ("ns-r1", "wgan-gp"):
        raise ValueError(f"loss: expected 'ns-r1' or 'wgan-gp', got {loss!r}")
    scores = D(fake, step, alpha)
    return ns_g_loss(scores) if loss == "ns-r1" else wgan_g_loss(scores)


# ------------------------------------------------------------------------------------------- wrapper
@register_family
class StyleGAN(LatentModel):
    """StyleGAN v1 3D as a :class:`LatentModel` whose latent space is W (``latent_dim = w_dim``), or W+
    (``encode(x, space="w+")``, flattened to ``n_layers * w_dim``).

    Holds the trained ``generator``, its EMA copy ``generator_ema`` (frozen; used by decode/sample/
    encode) and the ``discriminator``. ``decode`` synthesises with fixed ("const") noise so that encode
    and decode are deterministic; outputs are clamped to [0, 1] as the LatentModel contract requires.

    Args:
        volume_shape: (X, Y, Z); every axis must be divisible by ``2 ** (n_levels - 1)``.
        z_dim, w_dim: sizes of Z and W.
        n_mapping: mapping network depth (8 in StyleGAN).
        mapping_lr_mul: learning-rate multiplier of the mapping network (0.01).
        n_levels: resolution levels (None: as many as keep a base axis >= 4, see :func:`default_n_levels`).
        base_channels, max_channels: width at full resolution, doubling per lower level up to the cap
            (generator and discriminator alike).
        blur: [1, 2, 1] blur after upsampling / before downsampling (v1).
        mbstd_group_size: minibatch-std group size of the discriminator.
        truncation_psi, truncation_cutoff: default truncation of :meth:`sample` (cutoff None: all layers).
        inversion_steps, inversion_lr: optimisation budget of :meth:`encode`.
    """

    family = "stylegan"
    generative = True
    inverts = True
    latent_spaces = ("w", "w+")

    def __init__(
        self,
        volume_shape: Sequence[int] = (32, 40, 32),
        z_dim: int = 128,
        w_dim: int = 128,
        n_mapping: int = 8,
        mapping_lr_mul: float = 0.01,
        n_levels: int | None = None,
        base_channels: int = 16,
        max_channels: int = 128,
        blur: bool = True,
        mbstd_group_size: int = 4,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        inversion_steps: int = 300,
        inversion_lr: float = 0.05,
        template: bool = False,
    ) -> None:
        super().__init__()
        for name, value in dict(z_dim=z_dim, w_dim=w_dim, inversion_steps=inversion_steps).items():
            if value < 1:
                raise ValueError(f"stylegan.{name}: expected a positive integer, got {value}")
        self.volume_shape = as_shape3(volume_shape)
        n_levels = default_n_levels(self.volume_shape) if n_levels is None else int(n_levels)
        self.latent_dim = int(w_dim)
        self.truncation_psi, self.truncation_cutoff = truncation_psi, truncation_cutoff
        self.inversion_steps, self.inversion_lr = inversion_steps, inversion_lr
        widths = dict(n_levels=n_levels, base_channels=base_channels, max_channels=max_channels, blur=blur)
        self.generator = Generator(self.volume_shape, z_dim, w_dim, n_mapping, mapping_lr_mul, **widths,
                                   template=template)
        self.generator_ema = copy.deepcopy(self.generator).eval().requires_grad_(False)
        self.discriminator = Discriminator(self.volume_shape, mbstd_group_size=mbstd_group_size, **widths)
        self._config = constructor_config(self, locals())

    @torch.no_grad()
    def set_template(self, volumes: Tensor) -> None:
        """Start both generators' outputs from the mean of ``volumes`` (the training split); no-op without
        ``template``."""
        self.generator.synthesis.set_template(volumes)
        self.generator_ema.synthesis.set_template(volumes)

    # -- geometry -------------------------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return self.generator.n_levels

    @property
    def final_step(self) -> int:
        return self.n_levels - 1

    @property
    def n_layers(self) -> int:
        return self.generator.n_layers

    @property
    def z_dim(self) -> int:
        return self.generator.z_dim

    @property
    def w_avg(self) -> Tensor:
        """The EMA generator's average w (w_dim,)."""
        return self.generator_ema.w_avg

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    def train(self, mode: bool = True) -> "StyleGAN":
        super().train(mode)
        self.generator_ema.eval()  # never trained; keeps inference semantics whatever the wrapper's mode
        return self

    # -- training helpers -----------------------------------------------------------------------------
    def update_ema(self, decay: float) -> None:
        """``ema <- decay * ema + (1 - decay) * generator``; buffers (w_avg, const noise) are copied.

        Call after each generator step.
        """
        update_ema(self.generator_ema, self.generator, decay)

    def reals_at_level(self, x: Tensor, step: int, alpha: float) -> Tensor:
        """Full-resolution volumes -> what D sees at (step, alpha); see :func:`reals_at_level`."""
        return reals_at_level(x, step, alpha, self.n_levels)

    # -- LatentModel ----------------------------------------------------------------------------------
    def mapping(self, z: Tensor) -> Tensor:
        """z (B, z_dim) -> w (B, w_dim) through the EMA mapping network."""
        return self.generator_ema.mapping(z)

    def synthesize(self, w: Tensor, noise_mode: NoiseMode = "const") -> Tensor:
        """Unclamped EMA synthesis at full resolution from W (B, w_dim) or W+ (B, n_layers, w_dim)."""
        return self.generator_ema.synthesis(self.generator_ema.broadcast(w), None, 1.0, noise_mode)

    def decode(self, z: Tensor) -> Tensor:
        """W (B, w_dim) or W+ (B, n_layers, w_dim), or W+ flat (B, n_layers * w_dim) as :meth:`encode` gives it,
        -> (B, 1, X, Y, Z) in [0, 1] (fixed noise)."""
        if z.ndim == 2 and z.shape[1] == self.n_layers * self.latent_dim:
            z = z.unflatten(1, (self.n_layers, self.latent_dim))
        return self.synthesize(z).clamp(0.0, 1.0)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        psi: float | None = None,
        noise_mode: NoiseMode = "random",
    ) -> Tensor:
        """``n`` volumes (n, 1, X, Y, Z) in [0, 1] from the EMA generator; ``psi`` defaults to the config's."""
        if n < 1:
            raise ValueError(f"sample: n must be a positive integer, got {n}")
        psi = self.truncation_psi if psi is None else psi
        z = randn_on(generator, (n, self.z_dim), self.device)
        g = self.generator_ema
        ws = g.truncate(g.broadcast(g.mapping(z)), psi, self.truncation_cutoff)
        return g.synthesis(ws, None, 1.0, noise_mode, generator).clamp(0.0, 1.0)

    @torch.no_grad()
    def style_mixing_grid(self, generator: torch.Generator, n: int = 2) -> Tensor:
        """Volumes of a style-mixing grid: sources A_i, sources B_j, then A_i's coarse styles with B_j's fine
        ones at a crossover halfway through the layers (fixed noise). (n + n + n * n, 1, X, Y, Z) in [0, 1],
        row-major."""
        g = self.generator_ema
        za = randn_on(generator, (n, self.z_dim), self.device)
        zb = randn_on(generator, (n, self.z_dim), self.device)
        wa, wb = g.mapping(za), g.mapping(zb)
        crossover = g.n_layers // 2
        vols = [self.synthesize(wa), self.synthesize(wb)]
        for i in range(n):
            vols.append(g.synthesis(g.mix_styles(wa[i : i + 1].expand(n, -1), wb, crossover), None, 1.0, "const"))
        return torch.cat(vols).clamp(0, 1)

    @torch.no_grad()
    def truncation_sweep(self, generator: torch.Generator, psis=(0.0, 0.25, 0.5, 0.75, 1.0)) -> Tensor:
        """One z rendered at each truncation psi (psi = 0 is the average w's image), fixed noise.
        (len(psis), 1, X, Y, Z) in [0, 1]."""
        g = self.generator_ema
        ws = g.broadcast(g.mapping(randn_on(generator, (1, self.z_dim), self.device)))
        return torch.cat([g.synthesis(g.truncate(ws, psi), None, 1.0, "const") for psi in psis]).clamp(0, 1)

    def project(
        self,
        x: Tensor,
        space: Literal["w", "w+"] = "w",
        steps: int | None = None,
        lr: float | None = None,
        **invert_kwargs: Any,
    ) -> InversionResult:
        """Invert volumes (B, 1, X, Y, Z) into W (B, w_dim) or W+ (B, n_layers, w_dim), starting at w_avg.

        Extra keyword arguments go to :func:`brainlatent.inversion.invert` (feature_fn, seed, ...).
        """
        self.check_volumes(x)
        if space not in ("w", "w+"):
            raise ValueError(f"space: expected 'w' or 'w+', got {space!r}")
        shape = (x.shape[0], self.latent_dim) if space == "w" else (x.shape[0], self.n_layers, self.latent_dim)
        init = self.w_avg.to(x.device).expand(*shape)
        return invert(
            self.synthesize,
            x,
            init,
            steps=self.inversion_steps if steps is None else steps,
            lr=self.inversion_lr if lr is None else lr,
            **invert_kwargs,
        )

    def encode(self, x: Tensor, *, space: str | None = None, **inversion_kwargs: Any) -> Tensor:
        """(B, 1, X, Y, Z) -> flat latents by optimisation from w_avg: W (B, w_dim) for ``space`` "w" (None), W+
        flattened (B, n_layers * w_dim) for "w+". ``inversion_kwargs`` (``steps``, ``lr``, ...) as in
        :meth:`project`, which keeps the W+ shape and the whole :class:`InversionResult`."""
        space = self.check_encode_options(space, inversion_kwargs)
        return self.project(x, space, **inversion_kwargs).latent.flatten(1)

    def forward(self, z: Tensor) -> Tensor:
        """Same as :meth:`decode`."""
        return self.decode(z)
