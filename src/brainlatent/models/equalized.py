"""Equalized-learning-rate primitives for StyleGAN (3D).

Equalized learning rate (Karras et al., ProGAN/StyleGAN) stores weights drawn from N(0, 1/lr_mul^2) and
multiplies them at run time by ``weight_gain = lr_mul / sqrt(fan_in)``, so every layer's effective weight has
std ``1 / sqrt(fan_in)`` while Adam sees parameters of unit scale (one learning rate fits all layers). The
gain is an explicit multiply in ``forward`` (stylegan2-ada-pytorch style), never a hook that swaps ``.data``:
state dicts hold the raw parameters and the layer is safe under ``torch.compile``, DDP and autocast.

LeakyReLU layers apply the activation gain sqrt(2) *after* the non-linearity (stylegan2-ada's ``bias_act``)
rather than folding He's sqrt(2) into the weight gain as StyleGAN v1 did: the two agree up to the bias, and
keeping the gain out of the weight keeps ``weight_gain`` exactly ``lr_mul / sqrt(fan_in)``.

These layers are written by hand because neither PyTorch nor MONAI ships run-time weight scaling.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        bias = None if self.bias is None else self.bias * self.bias_gain
        return activate(F.linear(x, self.effective_weight(), bias), self.activation)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, lr_mul={self.lr_mul}, "
            f"activation={self.activation}"
        )


class EqualizedConv3d(nn.Module):
    """3D convolution with equalized learning rate, stride 1 and 'same' zero padding.

    ``weight_gain = lr_mul / sqrt(in_channels * k^3)``. x: (B, C_in, X, Y, Z) -> (B, C_out, X, Y, Z).
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
    ) -> None:
        super().__init__()
        _check_lr_mul(lr_mul)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.activation = activation
        self.lr_mul = lr_mul
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *(kernel_size,) * 3) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = lr_mul / math.sqrt(in_channels * kernel_size**3)
        self.bias_gain = lr_mul

    def effective_weight(self) -> Tensor:
        """The kernel actually applied: (C_out, C_in, k, k, k)."""
        return self.weight * self.weight_gain

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias * self.bias_gain
        y = F.conv3d(x, self.effective_weight(), bias, padding=self.kernel_size // 2)
        return activate(y, self.activation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"lr_mul={self.lr_mul}, activation={self.activation}"
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


class Blur3d(nn.Module):
    """[1, 2, 1] / 4 binomial low-pass filter on every axis (StyleGAN v1's blur), 'same' zero padding.

    Applied after nearest upsampling and before average-pool downsampling to suppress aliasing. The
    separable filter is written as shifted sums rather than a depthwise ``conv3d``: same result, several
    times faster on CPU, where grouped 3D convolutions are poorly optimised.
    x: (B, C, X, Y, Z) -> same shape.
    """

    def forward(self, x: Tensor) -> Tensor:
        for dim in (2, 3, 4):
            pad = [0] * 6
            pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = 1  # F.pad lists the last axis first
            xp = F.pad(x, pad)
            n = x.shape[dim]
            x = 0.25 * xp.narrow(dim, 0, n) + 0.5 * xp.narrow(dim, 1, n) + 0.25 * xp.narrow(dim, 2, n)
        return x
