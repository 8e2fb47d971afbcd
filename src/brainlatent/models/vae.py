"""3D variational autoencoder (Kingma & Welling, 2014) with beta and KL warm-up.

Loss convention (per volume, then averaged over the batch), all in float32:

* ``recon`` = Gaussian negative log-likelihood with a fixed observation noise ``recon_sigma``, summed over
  voxels and dropping the constant: ``sum_v (x_v - x̂_v)^2 / (2 recon_sigma^2)``;
* ``kl`` = KL(q(z|x) || N(0, I)) summed over latent dimensions;
* ``loss`` = ``recon + beta * kl_weight * kl`` where ``kl_weight`` is the warm-up factor in [0, 1]
  (:func:`kl_warmup_weight`). With ``beta = 1`` and ``kl_weight = 1`` the loss is the negative ELBO up to a
  constant, so values are comparable across volume sizes only per voxel (``mse`` is also reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from brainlatent.models.autoencoder import ReconstructionModel
from brainlatent.models.base import register_family
from brainlatent.models.layers import Arch, Norm

# Log-variance is clamped so exp() neither overflows (bf16/fp16) nor collapses to 0 early in training.
LOGVAR_MIN, LOGVAR_MAX = -10.0, 10.0


def kl_warmup_weight(epoch: float, warmup_epochs: float) -> float:
    """Linear KL warm-up factor: 0 at epoch 0, 1 from ``warmup_epochs`` on; 1 when ``warmup_epochs`` is 0.

    ``epoch`` may be fractional (``epoch + step / steps_per_epoch``) for a per-step ramp.
    """
    if warmup_epochs < 0:
        raise ValueError(f"kl_warmup_epochs: expected >= 0, got {warmup_epochs}")
    if epoch < 0:
        raise ValueError(f"epoch: expected >= 0, got {epoch}")
    if warmup_epochs == 0:
        return 1.0
    return float(min(1.0, epoch / warmup_epochs))


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample: (B, D), (B, D) -> (B,), in float32."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=1)


@register_family
class VAE(ReconstructionModel):
    """Encoder heads for mu and log-variance, reparameterised sampling, decoder into [0, 1].

    Args:
        latent_dim, volume_shape, arch, hidden, base_channels, max_channels, min_bottleneck, norm: as in
            :class:`~brainlatent.models.autoencoder.ReconstructionModel`.
        beta: weight of the KL term (beta-VAE, Higgins et al., 2017).
        kl_warmup_epochs: epochs of the linear KL warm-up (0: none); see :meth:`kl_weight`.
        recon_sigma: observation noise standard deviation of the Gaussian likelihood (intensity units).
    """

    family = "vae"
    generative = True

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
        beta: float = 1.0,
        kl_warmup_epochs: float = 0.0,
        recon_sigma: float = 0.1,
    ):
        if beta < 0:
            raise ValueError(f"beta: expected >= 0, got {beta}")
        if kl_warmup_epochs < 0:
            raise ValueError(f"kl_warmup_epochs: expected >= 0, got {kl_warmup_epochs}")
        if recon_sigma <= 0:
            raise ValueError(f"recon_sigma: expected > 0, got {recon_sigma}")
        # The mu and log-variance heads are the two halves of the encoder's final linear layer.
        super().__init__(latent_dim, volume_shape, arch, hidden, base_channels, max_channels, min_bottleneck, norm,
                         encoder_outputs=2 * latent_dim)
        self.beta = float(beta)
        self.kl_warmup_epochs = float(kl_warmup_epochs)
        self.recon_sigma = float(recon_sigma)
        self._config.update(beta=self.beta, kl_warmup_epochs=self.kl_warmup_epochs, recon_sigma=self.recon_sigma)

    # -- inference ------------------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, X, Y, Z) -> mu (B, D), logvar (B, D) clamped to [LOGVAR_MIN, LOGVAR_MAX]."""
        mu, logvar = self.encoder_features(x).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean (B, latent_dim): deterministic, as latent directions need."""
        return self.posterior(x)[0]

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I): (B, D) float32, differentiable in mu and logvar."""
        mu, logvar = mu.float(), logvar.float()
        eps = torch.randn(mu.shape, generator=generator, device=mu.device if generator is None else generator.device)
        return mu + (0.5 * logvar).exp() * eps.to(mu.device)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 1, X, Y, Z) -> reconstruction from a posterior sample (B, 1, X, Y, Z), mu (B, D), logvar (B, D).

        The reconstruction is unclamped (what the likelihood sees); :meth:`decode` clamps to [0, 1].
        """
        mu, logvar = self.posterior(x)
        return self.decode_unclamped(self.reparameterize(mu, logvar, generator)), mu, logvar

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` volumes (n, 1, X, Y, Z) decoded from the N(0, I) prior."""
        return self.decode(self.prior_latents(n, generator))

    # -- training -------------------------------------------------------------------------------------
    def kl_weight(self, epoch: float) -> float:
        """Warm-up factor at (possibly fractional) ``epoch``: linear over ``kl_warmup_epochs``."""
        return kl_warmup_weight(epoch, self.kl_warmup_epochs)

    def loss(
        self, x: torch.Tensor, kl_weight: float = 1.0, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Negative (beta-weighted, warmed-up) ELBO; see the module docstring for the convention.

        ``kl_weight`` multiplies ``beta``: normally the warm-up factor :meth:`kl_weight` in [0, 1]; a caller
        that keeps beta outside the model passes ``beta * warm-up`` to a model built with ``beta=1``.
        Returns ``loss`` (to minimise), and detached ``recon`` (nats per volume), ``kl`` (nats per volume)
        and ``mse`` (mean squared error per voxel, comparable with the autoencoder).
        """
        if not kl_weight >= 0.0:
            raise ValueError(f"kl_weight: expected a non-negative KL multiplier, got {kl_weight}")
        recon_x, mu, logvar = self(x, generator)
        sq_err = (recon_x.float() - x.float()).square().flatten(1)  # (B, V)
        recon = (sq_err.sum(dim=1) / (2.0 * self.recon_sigma**2)).mean()
        kl = gaussian_kl(mu, logvar).mean()
        loss = recon + self.beta * kl_weight * kl
        return {"loss": loss, "recon": recon.detach(), "kl": kl.detach(), "mse": sq_err.mean().detach()}
