"""Equalized-learning-rate primitives for StyleGAN (3D).

Equalized learning rate (Karras et al., ProGAN/StyleGAN) stores weights drawn from N(0, 1/lr_mul^2) and
multiplies them at run time by ``weight_gain = lr_mul / sqrt(fan_in)``, so every layer's effective weight has
std ``1 / sqrt(fan_in)`` while Adam sees parameters of unit scale (one learning rate fits all layers). The
gain is an explicit multiply in ``forward`` (stylegan2-ada-pytorch style), never a hook that swaps ``.data``:
state dicts hold the raw parameters and the layer is safe under ``torch.compile``, DDP and autocast.

LeakyReLU layers multiply their output by the activation gain sqrt(2) (stylegan2-ada's ``bias_act``).
``weight_gain`` stays exactly ``lr_mul / sqrt(fan_in)``; the forward pass applies the activation gain to the
weight and bias instead of to the output, since ``sqrt(2) * lrelu(y) == lrelu(sqrt(2) * y)``: the same
numbers up to rounding, without a pass over the activations (and its backward) on every layer.

These layers are written by hand because neither PyTorch nor MONAI ships run-time weight scaling.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainlatent.models.layers import conv3d_avgpool, upsample_conv3d

Activation = Literal["linear", "lrelu"]

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


def activate(x: Tensor, activation: Activation) -> Tensor:
    """Apply ``activation``; LeakyReLU(0.2) is scaled by sqrt(2) to keep unit signal variance."""
    if activation == "linear":
        return x
    if activation == "lrelu":
        return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN
    raise ValueError(f"activation must be 'linear' or 'lrelu', got {activation!r}")


def _act_gain(activation: Activation) -> float:
    """The gain :func:`activate` applies, checked at construction."""
    if activation not in ("linear", "lrelu"):
        raise ValueError(f"activation must be 'linear' or 'lrelu', got {activation!r}")
    return LRELU_GAIN if activation == "lrelu" else 1.0


def _activate_prescaled(y: Tensor, activation: Activation) -> Tensor:
    """:func:`activate` for a ``y`` whose weights and bias already carry the activation gain."""
    return F.leaky_relu(y, LRELU_SLOPE) if activation == "lrelu" else y


def _check_lr_mul(lr_mul: float) -> None:
    if not lr_mul > 0:
        raise ValueError(f"lr_mul must be > 0, got {lr_mul}")


class EqualizedLinear(nn.Module):
    """Fully connected layer with equalized learning rate.

    ``y = act(x @ (W * weight_gain).T + b * bias_gain)`` with ``weight_gain = lr_mul / sqrt(in_features)``
    and ``bias_gain = lr_mul``. x: (B, in_features) -> y: (B, out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: Activation = "linear",
    ) -> None:
        super().__init__()
        _check_lr_mul(lr_mul)
        self.in_features, self.out_features = in_features, out_features
        self.activation = activation
        self.act_gain = _act_gain(activation)
        self.lr_mul = lr_mul
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        # The stored bias is divided by lr_mul so that the effective bias starts at bias_init.
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.bias_gain = lr_mul

    def effective_weight(self) -> Tensor:
        """The weight actually applied: (out_features, in_features)."""
        return self.weight * self.weight_gain

    def forward(self, x: Tensor) -> Tensor:
        gain = self.weight_gain * self.act_gain
        if self.bias is not None and x.ndim == 2:
            # One addmm scales both terms: no scaled copies of the weight and bias per call.
            y = torch.addmm(self.bias, x, self.weight.t(), beta=self.bias_gain * self.act_gain, alpha=gain)
        else:
            bias = None if self.bias is None else self.bias * (self.bias_gain * self.act_gain)
            y = F.linear(x, self.weight * gain, bias)
        return _activate_prescaled(y, self.activation)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, lr_mul={self.lr_mul}, "
            f"activation={self.activation}"
        )


class EqualizedConv3d(nn.Module):
    """3D convolution with equalized learning rate, stride 1 and 'same' zero padding.

    ``weight_gain = lr_mul / sqrt(in_channels * k^3)``. x: (B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z).
    ``up=True`` upsamples the input x2 (nearest) before the convolution, ``down=True`` average-pools its
    output x2 before the activation (v1's ``upscale2d_conv2d`` / ``conv2d_downscale2d``); both are computed
    as one stride-2 convolution (see :func:`layers.upsample_conv3d`), 3x3x3 kernels only.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        bias: bool = True,
        lr_mul: float = 1.0,
        activation: Activation = "linear",
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        _check_lr_mul(lr_mul)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        if (up or down) and (kernel_size != 3 or up == down):
            raise ValueError(f"up/down: one of them, with kernel_size 3; got up={up}, down={down}, k={kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.up, self.down = up, down
        self.activation = activation
        self.act_gain = _act_gain(activation)
        self.lr_mul = lr_mul
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *(kernel_size,) * 3) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_channels * kernel_size**3)
        self.bias_gain = lr_mul

    def effective_weight(self) -> Tensor:
        """The kernel actually applied: (C_out, C_in, k, k, k)."""
        return self.weight * self.weight_gain

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias * (self.bias_gain * self.act_gain)
        gain = self.weight_gain * self.act_gain
        if self.up:
            y = upsample_conv3d(x, self.weight, bias, gain)
        elif self.down:
            y = conv3d_avgpool(x, self.weight, bias, gain)
        else:
            y = F.conv3d(x, self.weight * gain, bias, padding=self.kernel_size // 2)
        return _activate_prescaled(y, self.activation)

    def extra_repr(self) -> str:
        resample = ", up" if self.up else ", down" if self.down else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"lr_mul={self.lr_mul}, activation={self.activation}{resample}"
        )


class PixelNorm(nn.Module):
    """Normalise each sample's feature vector to unit RMS over dim 1: x / sqrt(mean(x^2) + eps).

    Works for (B, C) latents and (B, C, ...) feature maps; statistics in float32 (autocast-safe).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(dim=1, keepdim=True) + self.eps)).to(x.dtype)


@functools.lru_cache(maxsize=32)
def _blur_kernel(channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The 3x3x3 binomial kernel, one per channel: (C, 1, 3, 3, 3) for a depthwise ``conv3d``."""
    k = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64) / 4
    kernel = torch.einsum("i,j,k->ijk", k, k, k)
    return kernel.to(dtype=dtype, device=device).expand(channels, 1, 3, 3, 3).contiguous()


def _blur_once(x: Tensor) -> Tensor:
    """[1, 2, 1] / 4 on each of the three spatial axes, zero padding.

    Channels-last: a depthwise ``conv3d`` (oneDNN's channels-last depthwise kernel, 2-6x faster than the
    shifted sums, measured single-threaded in BENCHMARKS.md). NCDHW, where the depthwise conv is the slower
    one: shifted sums, three passes over the data per axis (2x, then the two neighbours added in place).
    """
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        return F.conv3d(x, _blur_kernel(x.shape[1], x.dtype, x.device), padding=1, groups=x.shape[1])
    for dim in (2, 3, 4):
        n = x.shape[dim]
        y = x * 0.5
        y.narrow(dim, 1, n - 1).add_(x.narrow(dim, 0, n - 1), alpha=0.25)
        y.narrow(dim, 0, n - 1).add_(x.narrow(dim, 1, n - 1), alpha=0.25)
        x = y
    return x


class _BlurFunction(torch.autograd.Function):
    """The blur with its own backward: a symmetric filter with zero padding is self-adjoint, so the gradient
    is the blurred gradient. Autograd through the shifted sums instead allocated and summed a zero-filled
    tensor per shifted view (the blur's backward cost ~3x its forward, profiled). Twice differentiable (R1)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return _blur_once(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _BlurFunction.apply(grad)


class Blur3d(nn.Module):
    """[1, 2, 1] / 4 binomial low-pass filter on every axis (StyleGAN v1's blur), 'same' zero padding.

    Applied after nearest upsampling and before average-pool downsampling to suppress aliasing; computed
    in the way that is fastest for the input's memory layout (:func:`_blur_once`), with a hand-written
    backward (:class:`_BlurFunction`). x: (B, C, X, Y, Z) -> same shape.
    """

    def forward(self, x: Tensor) -> Tensor:
        return _BlurFunction.apply(x)
