"""Deterministic 3D convolutional autoencoder with a vector latent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from brainlatent.models.base import LatentModel, register_family
from brainlatent.models.layers import Decoder3d, Encoder3d, Norm, as_shape3


@register_family
class Autoencoder(LatentModel):
    """(B, 1, X, Y, Z) in [0, 1] -> (B, latent_dim) -> (B, 1, X, Y, Z) in [0, 1] (sigmoid output).

    Args:
        latent_dim: size of the latent vector.
        volume_shape: (X, Y, Z) of the processed volumes.
        base_channels: width at full resolution; doubles at each downsampling stage up to ``max_channels``.
        max_channels: width cap.
        min_bottleneck: the smallest allowed bottleneck axis (see :func:`layers.stage_shapes`).
        norm: normalisation in the conv blocks ("group", "layer" or "none").
    """

    family = "ae"

    def __init__(
        self,
        latent_dim: int = 64,
        volume_shape: Sequence[int] = (32, 40, 32),
        base_channels: int = 16,
        max_channels: int = 128,
        min_bottleneck: int = 4,
        norm: Norm = "group",
    ):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim: expected a positive integer, got {latent_dim}")
        self.latent_dim = int(latent_dim)
        self.volume_shape = as_shape3(volume_shape)
        self._config = dict(
            latent_dim=self.latent_dim,
            volume_shape=list(self.volume_shape),
            base_channels=base_channels,
            max_channels=max_channels,
            min_bottleneck=min_bottleneck,
            norm=norm,
        )
        widths = dict(base_channels=base_channels, max_channels=max_channels, min_size=min_bottleneck, norm=norm)
        self.encoder = Encoder3d(self.volume_shape, self.latent_dim, **widths)
        self.decoder = Decoder3d(self.volume_shape, self.latent_dim, out_activation="sigmoid", **widths)

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, latent_dim)."""
        self.check_volumes(x)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, 1, X, Y, Z) in [0, 1]."""
        self.check_latents(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 1, X, Y, Z)."""
        return self.decode(self.encode(x))

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean squared error per voxel, averaged over the batch, computed in float32.

        Returns ``loss`` (to minimise) and ``recon`` (the same value, the name shared with the VAE).
        """
        mse = F.mse_loss(self(x).float(), x.float())
        return {"loss": mse, "recon": mse.detach()}
