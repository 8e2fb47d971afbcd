"""``LatentCodec``: a registered model's encoder and decoder on flat latent vectors ``(N, D)``, for any family.

The only place that knows how each family maps volumes to flat latent vectors:

  ae / vae   ``model.encode`` / ``model.decode`` (z, ``latent_dim``)
  gan        z by inversion (``GAN.encode(x, steps=...)``, Adam from z = 0), ``decode`` = EMA generator
  stylegan   W (``w_dim``) or W+ flattened (``n_layers * w_dim``) by inversion from ``w_avg``
             (``StyleGAN.project``); ``decode`` reshapes W+ back to ``(B, n_layers, w_dim)``

Everything else in ``brainlatent.directions`` sees arrays ``(N, D)`` and the codec's callables only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from brainlatent.models.base import LatentModel

from .traversal import decode_batched

INVERTING_FAMILIES: tuple[str, ...] = ("gan", "stylegan")


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
        space = stylegan_space if model.family == "stylegan" else "z"
        return cls(model, space, int(inversion_steps))

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def inverts(self) -> bool:
        """Encoding is an optimisation (GAN families): costly, and only approximately a preimage."""
        return self.family in INVERTING_FAMILIES

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
        if not self.inverts:
            with torch.inference_mode():
                return self.model.encode(x).reshape(len(x), -1)
        # Inversion needs autograd; callers may hold inference mode (effects.apply_batched does), which
        # enable_grad cannot lift. Leave it locally and copy the input out of inference-tensor storage.
        with torch.inference_mode(False):
            x = x.clone()
            if self.family == "stylegan":
                z = self.model.project(x, self.latent_space, steps=self.inversion_steps, compute_ssim=False).latent
            else:
                z = self.model.encode(x, steps=self.inversion_steps, compute_ssim=False)
        return z.detach().reshape(len(x), -1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, D)`` -> volumes ``(B, 1, X, Y, Z)`` in [0, 1]."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"{self.describe()}: expected latents (B, {self.dim}), got {tuple(z.shape)}")
        z = z.to(self.device, torch.float32)
        if self.latent_space == "w+":
            z = z.reshape(len(z), self.model.n_layers, self.model.latent_dim)
        return self.model.decode(z)

    def encode_volumes(self, volumes: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """``(N, X, Y, Z)`` volumes (any float dtype, a memmap is fine) -> ``(N, D)`` float64 latents.

        Batched: an inversion batch costs about as much per volume as single volumes on a CPU, and far less
        on a GPU; each volume's inversion is independent of the others in its batch (brainlatent.inversion).
        """
        if volumes.ndim != 4:
            raise ValueError(f"volumes: expected (N, X, Y, Z), got shape {volumes.shape}")
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
