"""3D building blocks shared by the AE, VAE and GAN families.

Volumes are anisotropic (e.g. 32x40x32 or 64x80x64). The encoder halves every axis at each stage (so
voxels keep their aspect ratio) until the next halving would take some axis below ``min_size``, e.g. down
to a 4x5x4 bottleneck; the decoder upsamples back to the exact shape recorded at every encoder stage.

Hand-written rather than MONAI's ``AutoEncoder`` / ``VarAutoEncoder``: those decode with transposed
convolutions, whose output size for odd axes (5 -> 10 -> 20 for a 40-voxel axis is fine, 13 -> 25 is
not) needs per-shape ``output_padding``; ``nn.Upsample(size=...)`` followed by a convolution reproduces
any shape exactly and avoids checkerboard artefacts (Odena et al., 2016).

All reshapes go through einops (``reshape`` semantics), so the modules accept ``channels_last_3d`` inputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn

Shape3 = tuple[int, int, int]
Norm = Literal["group", "layer", "none"]
Arch = Literal["conv", "dense"]

LEAKY_SLOPE = 0.2


def as_shape3(shape: Sequence[int], name: str = "volume_shape") -> Shape3:
    """Validate and normalise a 3D shape (a JSON list or a tuple) to a tuple of three positive ints."""
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected three positive integers (X, Y, Z), got {shape!r}") from None
    if len(out) != 3 or any(s <= 0 for s in out) or any(int(s) != s for s in shape):
        raise ValueError(f"{name}: expected three positive integers (X, Y, Z), got {shape!r}")
    return out  # type: ignore[return-value]


def stage_shapes(volume_shape: Sequence[int], min_size: int = 4) -> list[Shape3]:
    """Spatial shapes at every encoder stage, from the input down to the bottleneck.

    Each stage halves every axis (``n -> ceil(n / 2)``, what a stride-2, kernel-3, padding-1 convolution
    gives); stages stop before any axis would drop below ``min_size``.

    >>> stage_shapes((32, 40, 32))
    [(32, 40, 32), (16, 20, 16), (8, 10, 8), (4, 5, 4)]
    >>> stage_shapes((16, 16, 16))
    [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    """
    shape = as_shape3(volume_shape)
    if min_size < 1:
        raise ValueError(f"min_size: expected a positive integer, got {min_size}")
    if min(shape) < min_size:
        raise ValueError(f"volume_shape {shape}: every axis must be >= min_size ({min_size})")
    shapes = [shape]
    # n > 1 guards min_size == 1, where ceil(1 / 2) == 1 would never stop.
    while all(n > 1 and math.ceil(n / 2) >= min_size for n in shapes[-1]):
        shapes.append(tuple(math.ceil(n / 2) for n in shapes[-1]))  # type: ignore[arg-type]
    return shapes


def stage_channels(n_stages: int, base_channels: int, max_channels: int) -> list[int]:
    """Channel widths at each of the ``n_stages + 1`` resolutions: doubling from ``base_channels``, capped."""
    if base_channels < 1 or max_channels < base_channels:
        raise ValueError(
            f"channels: expected 1 <= base_channels <= max_channels, got base_channels={base_channels}, "
            f"max_channels={max_channels}"
        )
    return [min(base_channels * 2**i, max_channels) for i in range(n_stages + 1)]


def _pair_sum(kernel: torch.Tensor) -> torch.Tensor:
    """Each spatial axis of (C_out, C_in, k, k, k) replaced by the sum of the kernel and its copy shifted by
    one tap: (C_out, C_in, k + 1, k + 1, k + 1)."""
    for dim in (2, 3, 4):  # F.pad lists the last axis first
        kernel = F.pad(kernel, [0, 0] * (4 - dim) + [0, 1]) + F.pad(kernel, [0, 0] * (4 - dim) + [1, 0])
    return kernel


@functools.lru_cache(maxsize=16)
def _resampling_map(kind: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(27, 64): a 3x3x3 kernel's taps -> the 4x4x4 kernel of :func:`upsample_conv3d` (``kind="up"``: flipped,
    pair-summed) or :func:`conv3d_avgpool` (``"down"``: pair-summed / 8). As a matrix, one matmul per call
    derives the kernel instead of a dozen small pad/add operations.

    Built outside inference mode: the first call may come from sampling under ``torch.inference_mode()``,
    and a cached inference tensor could never again take part in a training step's autograd graph."""
    with torch.inference_mode(False), torch.no_grad():
        basis = torch.eye(27, dtype=torch.float64).view(27, 1, 3, 3, 3)
        mapped = _pair_sum(basis.flip(2, 3, 4)) if kind == "up" else _pair_sum(basis) / 8
        return mapped.view(27, 64).to(dtype=dtype, device=device)


def _resampled_kernel(weight: torch.Tensor, kind: str, gain: float) -> torch.Tensor:
    """gain * weight (C_out, C_in, 3, 3, 3) mapped to (C_out, C_in, 4, 4, 4) by :func:`_resampling_map`."""
    if weight.shape[2:] != (3, 3, 3):
        raise ValueError(f"fused resampling convolutions need a 3x3x3 kernel, got {tuple(weight.shape)}")
    mapping = _resampling_map(kind, weight.dtype, weight.device)
    if gain != 1.0:
        mapping = mapping * gain
    return torch.matmul(weight.flatten(2), mapping).view(*weight.shape[:2], 4, 4, 4)


def _fused_resampling(x: torch.Tensor) -> bool:
    # MPS lacks 3D transposed convolutions in some torch releases: there the two steps run as written.
    return x.device.type != "mps"


def upsample_conv3d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gain: float = 1.0
) -> torch.Tensor:
    """``conv3d(nearest_x2(x), gain * weight, bias, padding=1)`` for a 3x3x3 kernel, as one stride-2
    transposed convolution at the low resolution with a 4x4x4 kernel (sums of the 3x3x3 taps that read the
    same input voxel): 64 instead of 8 x 27 = 216 multiply-adds per input voxel and channel pair, no
    upsampled copy. Equal up to rounding, borders included. (B, C_in, X, Y, Z) -> (B, C_out, 2X, 2Y, 2Z)."""
    if not _fused_resampling(x):
        return F.conv3d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight * gain, bias, padding=1)
    kernel = _resampled_kernel(weight, "up", gain).transpose(0, 1)
    return F.conv_transpose3d(x, kernel, bias, stride=2, padding=1)


def conv3d_avgpool(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gain: float = 1.0
) -> torch.Tensor:
    """``avg_pool3d(conv3d(x, gain * weight, bias, padding=1), 2)`` for a 3x3x3 kernel, as one stride-2
    convolution with the 4x4x4 kernel that averages the 3x3x3 taps over each pooling window: an eighth of
    the outputs, equal up to rounding. (B, C_in, X, Y, Z) -> (B, C_out, X // 2, Y // 2, Z // 2)."""
    if not _fused_resampling(x):
        return F.avg_pool3d(F.conv3d(x, weight * gain, bias, padding=1), 2)
    return F.conv3d(x, _resampled_kernel(weight, "down", gain), bias, stride=2, padding=1)


def _num_groups(channels: int, max_groups: int = 8) -> int:
    """The largest group count <= ``max_groups`` that divides ``channels`` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def make_norm(kind: Norm, channels: int) -> nn.Module:
    """GroupNorm (<= 8 groups), LayerNorm over (C, X, Y, Z) as GroupNorm(1, C), or identity.

    All options normalise per sample, so they are valid under gradient penalties (unlike BatchNorm) and
    behave identically in train and eval mode (no running statistics to drift in an EMA copy).
    """
    if kind == "group":
        return nn.GroupNorm(_num_groups(channels), channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm: expected one of 'group', 'layer', 'none', got {kind!r}")


class ConvBlock(nn.Sequential):
    """Conv3d(k=3, padding=1, stride s) -> norm -> LeakyReLU(0.2).

    (B, C_in, X, Y, Z) -> (B, C_out, ceil(X/s), ceil(Y/s), ceil(Z/s)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: Norm = "group"):
        super().__init__(
            # No bias before a normalisation layer: it would be removed by the mean subtraction anyway.
            nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=norm == "none"),
            make_norm(norm, out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )


class DownBlock(nn.Sequential):
    """One encoder stage: a strided ConvBlock then a ConvBlock at the new resolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2, norm: Norm = "group"):
        super().__init__(
            ConvBlock(in_channels, out_channels, stride, norm),
            ConvBlock(out_channels, out_channels, 1, norm),
        )


class UpBlock(nn.Sequential):
    """One decoder stage: nearest upsampling to an exact ``size``, then two ConvBlocks.

    Where ``size`` doubles every axis, upsampling and the first convolution run as one transposed
    convolution (:func:`upsample_conv3d`). (B, C_in, ...) -> (B, C_out, *size).
    """

    def __init__(self, in_channels: int, out_channels: int, size: Shape3, norm: Norm = "group"):
        super().__init__(
            nn.Upsample(size=tuple(size), mode="nearest"),
            ConvBlock(in_channels, out_channels, 1, norm),
            ConvBlock(out_channels, out_channels, 1, norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upsample, first, second = self
        if tuple(2 * n for n in x.shape[2:]) != tuple(upsample.size):
            return second(first(upsample(x)))
        conv, norm, act = first
        return second(act(norm(upsample_conv3d(x, conv.weight, conv.bias))))


class Encoder3d(nn.Module):
    """Convolutional encoder: (B, 1, X, Y, Z) -> (B, out_features).

    A full-resolution stem, one :class:`DownBlock` per stage of :func:`stage_shapes`, then a linear layer
    on the flattened bottleneck (C_last * x * y * z features). Also the GAN discriminator (``out_features=1``).
    """

    def __init__(
        self,
        volume_shape: Sequence[int],
        out_features: int,
        base_channels: int = 16,
        max_channels: int = 128,
        min_size: int = 4,
        norm: Norm = "group",
        in_channels: int = 1,
    ):
        super().__init__()
        self.shapes = stage_shapes(volume_shape, min_size)
        channels = stage_channels(len(self.shapes) - 1, base_channels, max_channels)
        # The stem is not normalised: normalising a single raw intensity channel only discards contrast.
        stem = ConvBlock(in_channels, channels[0], 1, "none")
        stages = [
            DownBlock(c_in, c_out, 2, norm) for c_in, c_out in zip(channels[:-1], channels[1:])
        ]
        self.features = nn.Sequential(stem, *stages)
        self.head = nn.Sequential(
            Rearrange("b c x y z -> b (c x y z)"),
            nn.Linear(channels[-1] * math.prod(self.shapes[-1]), out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Decoder3d(nn.Module):
    """Convolutional decoder / generator: (B, in_features) -> (B, 1, X, Y, Z).

    A linear projection to the bottleneck grid (C_last, x, y, z), one :class:`UpBlock` per encoder stage in
    reverse (upsampling to the exact stage shapes), and a 3x3x3 output convolution. With
    ``out_activation="sigmoid"`` the output lies in [0, 1], the range of the processed volumes.
    """

    def __init__(
        self,
        volume_shape: Sequence[int],
        in_features: int,
        base_channels: int = 16,
        max_channels: int = 128,
        min_size: int = 4,
        norm: Norm = "group",
        out_activation: Literal["sigmoid", "none"] = "sigmoid",
        out_channels: int = 1,
    ):
        super().__init__()
        self.shapes = stage_shapes(volume_shape, min_size)
        channels = stage_channels(len(self.shapes) - 1, base_channels, max_channels)
        x, y, z = self.shapes[-1]
        self.project = nn.Sequential(
            nn.Linear(in_features, channels[-1] * x * y * z),
            Rearrange("b (c x y z) -> b c x y z", x=x, y=y, z=z),
            make_norm(norm, channels[-1]),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )
        self.stages = nn.Sequential(
            *[
                UpBlock(c_in, c_out, size, norm)
                for c_in, c_out, size in zip(channels[:0:-1], channels[-2::-1], self.shapes[-2::-1])
            ]
        )
        self.out = nn.Conv3d(channels[0], out_channels, 3, padding=1)
        if out_activation not in ("sigmoid", "none"):
            raise ValueError(f"out_activation: expected 'sigmoid' or 'none', got {out_activation!r}")
        self.out_activation = out_activation

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.out(self.stages(self.project(z)))
        return torch.sigmoid(x) if self.out_activation == "sigmoid" else x


def _mlp(sizes: Sequence[int]) -> list[nn.Module]:
    """Linear layers through ``sizes`` with LeakyReLU(0.2) between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
    return layers


class DenseEncoder(nn.Sequential):
    """Fully connected encoder: (B, 1, X, Y, Z) -> flatten -> [Linear -> LeakyReLU] x len(hidden) -> Linear.

    ``hidden=()`` is a linear encoder (with a linear decoder: PCA learned by gradient descent).
    """

    def __init__(self, volume_shape: Sequence[int], out_features: int, hidden: Sequence[int] = (256,)):
        n_voxels = math.prod(as_shape3(volume_shape))
        super().__init__(Rearrange("b c x y z -> b (c x y z)"), *_mlp([n_voxels, *hidden, out_features]))


class DenseDecoder(nn.Sequential):
    """Fully connected decoder: (B, in_features) -> [Linear -> LeakyReLU] x len(hidden) -> Linear -> (B, 1, X, Y, Z).

    No output activation: the autoencoders add it to a template volume (see ``autoencoder.py``).
    """

    def __init__(self, volume_shape: Sequence[int], in_features: int, hidden: Sequence[int] = (256,)):
        x, y, z = as_shape3(volume_shape)
        super().__init__(
            *_mlp([in_features, *reversed(tuple(hidden)), x * y * z]),
            Rearrange("b (c x y z) -> b c x y z", c=1, x=x, y=y, z=z),
        )
