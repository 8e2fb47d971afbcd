"""Deterministic 3D autoencoder with a vector latent, and the encoder/decoder base it shares with the VAE.

Two architectures (``arch``), chosen by measurement (docs/architecture.md, "Autoencoder architecture"):

* ``conv``: a convolutional encoder/decoder (layers.Encoder3d / Decoder3d) with a sigmoid output; the
  research-scale choice (64^3-128^3 volumes, thousands of scans), where dense layers would be huge.
* ``dense``: fully connected layers on the voxels, predicting the deviation from a *template* (the mean
  training volume, a buffer saved with the weights). At the CPU-budget grid (24 x 32 x 24) with ~100
  training scans it generalises far better: held-out MSE 0.0009 vs 0.0025 for the conv model, and its
  reconstructions keep the ventricle volume (r = 0.93 vs 0.26 against the scans) that the conv model
  averages away (even after 60 epochs) -- the age signal of the cohort (benchmarks/bench_ae_architecture.py).
  ``hidden=[]`` makes it linear (PCA learned by gradient descent).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from brainlatent.models.base import LatentModel, constructor_config, register_family
from brainlatent.models.layers import (
    Arch,
    Decoder3d,
    DenseDecoder,
    DenseEncoder,
    Encoder3d,
    Norm,
    as_shape3,
)


class ReconstructionModel(LatentModel):
    """Encoder + decoder of a chosen architecture, the template, and decoding into [0, 1].

    Args:
        latent_dim: size of the latent vector.
        volume_shape: (X, Y, Z) of the processed volumes.
        arch: ``"conv"`` or ``"dense"`` (module docstring).
        hidden: dense only: widths of the hidden layers, encoder order (the decoder mirrors them).
        base_channels, max_channels, min_bottleneck, norm: conv only: width at full resolution (doubling
            at each downsampling up to ``max_channels``), the smallest bottleneck axis, the normalisation.
        encoder_outputs: features the encoder emits (``latent_dim``; ``2 * latent_dim`` for mu and log-variance).
    """

    def __init__(
        self,
        latent_dim: int,
        volume_shape: Sequence[int],
        arch: Arch,
        hidden: Sequence[int],
        base_channels: int,
        max_channels: int,
        min_bottleneck: int,
        norm: Norm,
        encoder_outputs: int,
    ):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim: expected a positive integer, got {latent_dim}")
        if arch not in ("conv", "dense"):
            raise ValueError(f"arch: expected 'conv' or 'dense', got {arch!r}")
        if not all(isinstance(h, int) and h > 0 for h in hidden):
            raise ValueError(f"hidden: expected a list of positive integers, got {list(hidden)!r}")
        self.latent_dim = int(latent_dim)
        self.volume_shape = as_shape3(volume_shape)
        self.arch = arch
        if arch == "conv":
            widths = dict(base_channels=base_channels, max_channels=max_channels, min_size=min_bottleneck, norm=norm)
            self.encoder = Encoder3d(self.volume_shape, encoder_outputs, **widths)
            self.decoder = Decoder3d(self.volume_shape, self.latent_dim, out_activation="sigmoid", **widths)
        else:
            self.encoder = DenseEncoder(self.volume_shape, encoder_outputs, hidden)
            self.decoder = DenseDecoder(self.volume_shape, self.latent_dim, hidden)
        # The mean training volume (dense arch): set by the training task from the training split, saved in
        # the state dict, so a registered model decodes exactly as it trained.
        self.register_buffer("template", torch.zeros(1, 1, *self.volume_shape))

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)  # set by the registered subclass: constructor_config(self, locals())

    @torch.no_grad()
    def set_template(self, volumes: torch.Tensor) -> None:
        """Use the voxel-wise mean of ``volumes (N, 1, X, Y, Z)`` (the training split) as the template."""
        self.check_volumes(volumes)
        self.template.copy_(volumes.float().mean(0, keepdim=True).to(self.template.device))

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> the encoder's raw output (B, encoder_outputs)."""
        self.check_volumes(x)
        return self.encoder(x - self.template if self.arch == "dense" else x)

    def decode_unclamped(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, 1, X, Y, Z): what the loss sees (dense: template + deviation, unbounded)."""
        self.check_latents(z)
        out = self.decoder(z)
        return out + self.template.to(out.dtype) if self.arch == "dense" else out

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, 1, X, Y, Z) in [0, 1], the range of the processed volumes."""
        return self.decode_unclamped(z).clamp(0.0, 1.0)


@register_family
class Autoencoder(ReconstructionModel):
    """(B, 1, X, Y, Z) in [0, 1] -> (B, latent_dim) -> (B, 1, X, Y, Z) in [0, 1]; arguments as in
    :class:`ReconstructionModel`."""

    family = "ae"

    def __init__(
        self,
        latent_dim: int = 64,
        volume_shape: Sequence[int] = (32, 40, 32),
        arch: Arch = "conv",
        hidden: Sequence[int] = (256,),
        base_channels: int = 16,
        max_channels: int = 128,
        min_bottleneck: int = 4,
        norm: Norm = "group",
    ):
        super().__init__(latent_dim, volume_shape, arch, hidden, base_channels, max_channels, min_bottleneck, norm,
                         encoder_outputs=latent_dim)
        self._config = constructor_config(self, locals())

    def encode(self, x: torch.Tensor, *, space: str | None = None, **inversion_kwargs: Any) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, latent_dim) in one pass (``space`` None or "z"; no inversion options)."""
        self.check_encode_options(space, inversion_kwargs)
        return self.encoder_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 1, X, Y, Z) in [0, 1]."""
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean squared error per voxel (on the unclamped output, so every voxel has a gradient), averaged
        over the batch, computed in float32. Returns ``loss`` and ``recon`` (the same value, the VAE's name).
        """
        mse = F.mse_loss(self.decode_unclamped(self.encode(x)).float(), x.float())
        return {"loss": mse, "recon": mse.detach()}
