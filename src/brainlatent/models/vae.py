"""3D variational autoencoder (Kingma & Welling, 2014) with beta and KL warm-up.

Loss convention (per volume, then averaged over the batch), all in float32:

* ``recon`` = Gaussian negative log-likelihood with a fixed observation noise ``recon_sigma``, summed over
  voxels and dropping the constant: ``sum_v (x_v - x̂_v)^2 / (2 recon_sigma^2)``;
* ``kl`` = KL(q(z|x) || N(0, I)) summed over latent dimensions;
* ``loss`` = ``recon + beta * kl_weight * kl`` where ``kl_weight`` is the warm-up factor in [0, 1]
  (:func:`kl_warmup_weight`). With ``beta = 1`` and ``kl_weight = 1`` the loss is the negative ELBO up to a
  constant, so values are comparable across volume sizes only per voxel (``mse`` is also reported).

Sampling. The KL term pulls each posterior towards N(0, I), but with ~100 training volumes and 64 latent
dimensions the posteriors do not fill it: decoding N(0, I) draws lands mostly where the decoder never
trained (prior holes) and gives noise. :meth:`VAE.sample` therefore draws from the *fitted prior*: a
Gaussian fitted at the end of training to the posterior means of the training split (their mean and
Ledoit-Wolf shrunk covariance, :meth:`VAE.fit_prior`). It lives in the buffers ``prior_mean``,
``prior_scale_tril`` (Cholesky factor of the covariance) and ``prior_fitted``, saved with the weights, and is
N(0, I) until fitted. ``sample(n, prior="standard")`` still decodes N(0, I). A checkpoint written before
these buffers existed loads with the N(0, I) prior and a warning. Measurements: docs/metrics.md, "Sample
quality beyond FID".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from brainlatent.models.autoencoder import ReconstructionModel
from brainlatent.models.base import constructor_config, randn_on, register_family
from brainlatent.models.layers import Arch, Norm

log = logging.getLogger(__name__)

Prior = Literal["fitted", "standard"]
_PRIOR_BUFFERS = ("prior_mean", "prior_scale_tril", "prior_fitted")

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
        self._config = constructor_config(self, locals())
        # The sampling prior N(prior_mean, L L^T), L = prior_scale_tril: N(0, I) until fit_prior() is called.
        self.register_buffer("prior_mean", torch.zeros(self.latent_dim))
        self.register_buffer("prior_scale_tril", torch.eye(self.latent_dim))
        self.register_buffer("prior_fitted", torch.zeros(()))  # 1.0 once fitted (float: buffers are broadcast)

    # -- inference ------------------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, X, Y, Z) -> mu (B, D), logvar (B, D) clamped to [LOGVAR_MIN, LOGVAR_MAX]."""
        mu, logvar = self.encoder_features(x).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def encode(self, x: torch.Tensor, *, space: str | None = None, **inversion_kwargs: Any) -> torch.Tensor:
        """The posterior mean (B, latent_dim): deterministic, as latent directions need (``space`` None or "z";
        no inversion options)."""
        self.check_encode_options(space, inversion_kwargs)
        return self.posterior(x)[0]

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I): (B, D) float32, differentiable in mu and logvar."""
        mu, logvar = mu.float(), logvar.float()
        return mu + (0.5 * logvar).exp() * randn_on(generator, tuple(mu.shape), mu.device)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 1, X, Y, Z) -> reconstruction from a posterior sample (B, 1, X, Y, Z), mu (B, D), logvar (B, D).

        The reconstruction is unclamped (what the likelihood sees); :meth:`decode` clamps to [0, 1].
        """
        mu, logvar = self.posterior(x)
        return self.decode_unclamped(self.reparameterize(mu, logvar, generator)), mu, logvar

    def sample(self, n: int, generator: torch.Generator | None = None, prior: Prior = "fitted") -> torch.Tensor:
        """``n`` new volumes (n, 1, X, Y, Z) decoded from latents of :meth:`sample_latents`."""
        return self.decode(self.sample_latents(n, generator, prior))

    def sample_latents(self, n: int, generator: torch.Generator | None = None, prior: Prior = "fitted") -> torch.Tensor:
        """(n, latent_dim) draws from the fitted prior (``"fitted"``; N(0, I) while not fitted, see
        :attr:`prior_is_fitted`) or from N(0, I) (``"standard"``). The same generator state gives the same
        standard-normal draws either way: the fitted prior maps them through ``prior_mean + L eps``."""
        if prior not in ("fitted", "standard"):
            raise ValueError(f"prior: expected 'fitted' or 'standard', got {prior!r}")
        eps = self.prior_latents(n, generator)
        if prior == "standard":
            return eps
        return self.prior_mean + eps @ self.prior_scale_tril.T

    @property
    def prior_is_fitted(self) -> bool:
        """Whether :meth:`fit_prior` has set the sampling prior (else it is N(0, I))."""
        return bool(self.prior_fitted.item())

    @torch.no_grad()
    def fit_prior(self, latents: torch.Tensor) -> None:
        """Set the sampling prior to a Gaussian fitted to ``latents`` (N, latent_dim): the posterior means of
        the training split (:meth:`encode`).

        Mean and Ledoit-Wolf covariance (scikit-learn): with ~100 training volumes in 64 dimensions the
        sample covariance underestimates the small eigenvalues (on the embedded cohort, held-out scans'
        posterior means had a mean log-likelihood of -23.8 under it, -16.9 under Ledoit-Wolf, -86.9 under
        N(0, I)); shrinkage towards a scaled identity also keeps the fit positive definite when N <= latent_dim.
        """
        self.check_latents(latents)
        if len(latents) < 2:
            raise ValueError(f"fit_prior: need at least 2 latent vectors, got {len(latents)}")
        z = latents.detach().double().cpu().numpy()
        if not np.isfinite(z).all():
            raise ValueError("fit_prior: latents contain NaN or inf")
        fit = LedoitWolf().fit(z)
        scale_tril = np.linalg.cholesky(fit.covariance_)
        self.prior_mean.copy_(torch.from_numpy(fit.location_))
        self.prior_scale_tril.copy_(torch.from_numpy(scale_tril))
        self.prior_fitted.fill_(1.0)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        # Weights saved before the fitted prior existed (registered models, checkpoints): keep this module's
        # N(0, I) defaults for the absent buffers instead of failing a strict load.
        absent = [name for name in _PRIOR_BUFFERS if prefix + name not in state_dict]
        if absent and any(key.startswith(prefix) for key in state_dict):
            log.warning("VAE weights without %s (saved before the fitted prior): sample() draws from N(0, I); "
                        "refit with fit_prior(encode(training volumes))", absent)
            for name in absent:
                state_dict[prefix + name] = getattr(self, name).detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
