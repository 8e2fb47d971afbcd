"""``LatentCodec``: a registered model's encoder and decoder on flat latent vectors ``(N, D)``, for any family.

Every family encodes through one call, ``model.encode(x, space=..., **inversion_options)``, to flat latents
``(B, D)``, and ``model.decode`` takes them back. What differs, the codec settles here:

  latent space  ``"z"`` (``latent_dim``) for ae / vae / gan; StyleGAN's ``"w"`` (``w_dim``) or ``"w+"``
                (``n_layers * w_dim``), picked by ``directions.latent_space``
  inversion     families with ``model.inverts`` (gan: Adam from z = 0; stylegan: from ``w_avg``) encode by
                optimisation: the codec passes its step budget and runs them outside inference mode

Everything else in ``brainlatent.directions`` sees arrays ``(N, D)`` and the codec's callables only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from brainlatent.models.base import LatentModel

from .traversal import decode_batched


ENCODE_BATCH = 32
# An inversion batch (gan, stylegan) keeps every generator activation for its backward pass: at the research
# widths and 64 x 80 x 64, 32 volumes took the directions stage to a 10.5 GB peak (BENCHMARKS.md, the shortened
# research run). Capping the voxels per batch keeps the stage near training's memory at any shape; below the
# cap (24 x 32 x 24: 113 volumes) the batch stays ENCODE_BATCH, so small grids encode exactly as before.
ENCODE_BATCH_VOXELS = 2**21


def encode_batch(shape: Sequence[int]) -> int:
    """Volumes per encoding batch for volumes of ``shape`` (X, Y, Z): ENCODE_BATCH, fewer on large grids."""
    return max(1, min(ENCODE_BATCH, ENCODE_BATCH_VOXELS // math.prod(shape)))


@dataclass(frozen=True)
class LatentCodec:
    """A registered model's encoder and decoder on flat latent vectors ``(B, D)``, for any family.

    ``latent_space`` is ``"z"`` for ae/vae/gan and ``"w"`` / ``"w+"`` for StyleGAN. ``inversion_steps``
    (gan, stylegan) is the Adam budget of each encoding.
    """

    model: LatentModel
    latent_space: str
    inversion_steps: int

    @classmethod
    def for_model(cls, model: LatentModel, stylegan_space: str = "w", inversion_steps: int = 100) -> "LatentCodec":
        if stylegan_space not in ("w", "w+"):
            raise ValueError(f"directions.latent_space: expected 'w' or 'w+', got {stylegan_space!r}")
        # directions.latent_space picks between the spaces of a family that has two (StyleGAN's W and W+).
        space = stylegan_space if stylegan_space in model.latent_spaces else model.latent_spaces[0]
        return cls(model, space, int(inversion_steps))

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def inverts(self) -> bool:
        """Encoding is an optimisation (GAN families): costly, and only approximately a preimage."""
        return self.model.inverts

    @property
    def dim(self) -> int:
        """D, the size of the flat latent vectors the directions live in."""
        layers = self.model.n_layers if self.latent_space == "w+" else 1
        return int(self.model.latent_dim) * int(layers)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def describe(self) -> str:
        return f"{self.family} {self.latent_space} ({self.dim} dimensions)"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Volumes ``(B, 1, X, Y, Z)`` in [0, 1] -> latents ``(B, D)`` float32 on the model's device."""
        self.model.check_volumes(x)
        x = x.to(self.device, torch.float32)
        options = {"steps": self.inversion_steps, "compute_ssim": False} if self.inverts else {}
        # One-pass encoders run in inference mode. Inversion needs autograd; callers may hold inference mode
        # (effects.apply_batched does), which enable_grad cannot lift: leave it locally and copy the input out
        # of inference-tensor storage.
        with torch.inference_mode(not self.inverts):
            z = self.model.encode(x.clone() if self.inverts else x, space=self.latent_space, **options)
        return z.detach()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, D)`` -> volumes ``(B, 1, X, Y, Z)`` in [0, 1]."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"{self.describe()}: expected latents (B, {self.dim}), got {tuple(z.shape)}")
        return self.model.decode(z.to(self.device, torch.float32))

    def encode_volumes(self, volumes: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """``(N, X, Y, Z)`` volumes (any float dtype, a memmap is fine) -> ``(N, D)`` float64 latents.

        Batched (``batch_size`` None: :func:`encode_batch` of the shape): an inversion batch costs about as much
        per volume as single volumes on a CPU, and far less on a GPU; each volume's inversion is independent of
        the others in its batch (brainlatent.inversion).
        """
        if volumes.ndim != 4:
            raise ValueError(f"volumes: expected (N, X, Y, Z), got shape {volumes.shape}")
        batch_size = batch_size or encode_batch(volumes.shape[1:])
        out = []
        for start in range(0, len(volumes), batch_size):
            batch = torch.from_numpy(np.asarray(volumes[start : start + batch_size], np.float32)[:, None])
            out.append(self.encode(batch).float().cpu().numpy())
        latents = np.concatenate(out).astype(np.float64)
        if not np.all(np.isfinite(latents)):
            raise ValueError(f"{self.describe()}: encoding produced NaN/Inf latents (diverged inversion?)")
        return latents

    def decode_latents(self, latents: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """``(N, D)`` -> ``(N, X, Y, Z)`` float32 volumes."""
        return decode_batched(latents, self.decode, batch_size=batch_size, device=self.device)
