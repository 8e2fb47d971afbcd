"""3D DCGAN-style GAN: generator, critic, an EMA generator, and the adversarial losses.

* Generator: z (B, D) -> linear projection to the bottleneck grid (e.g. 4x5x4 for 32x40x32, from
  :func:`layers.stage_shapes`) -> nearest-upsample + conv blocks -> sigmoid volume in [0, 1].
* Discriminator (critic): strided conv blocks -> one unbounded score per volume. No BatchNorm: gradient
  penalties are per-sample, so only per-sample normalisation (LayerNorm by default, GroupNorm) or none.
* Losses: WGAN-GP (Gulrajani et al., 2017) with the ProGAN drift term, and the non-saturating logistic loss
  with the R1 penalty (Mescheder et al., 2018). Scores are cast to float32 before any reduction so the
  losses are safe under ``torch.autocast(..., dtype=torch.bfloat16)``.
* ``decode`` / ``sample`` / ``synthesize`` use the EMA generator (Karras et al., 2018; Yazici et al., 2019).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from brainlatent.models.base import LatentModel, register_family
from brainlatent.models.layers import Decoder3d, Encoder3d, Norm, as_shape3


# ----------------------------------------------------------------------------------------------- losses
def _input_grad_sq_norm(scores: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 norm of d(sum scores)/d(inputs), differentiable (create_graph): (B,) float32."""
    # A critic that ignores its input (e.g. a constant) has no graph to it: the gradient is exactly zero.
    grad = None
    if scores.requires_grad:
        (grad,) = torch.autograd.grad(scores.float().sum(), inputs, create_graph=True, allow_unused=True)
    if grad is None:
        return torch.zeros(inputs.shape[0], device=inputs.device)
    return grad.float().square().flatten(1).sum(dim=1)


def gradient_penalty(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """WGAN-GP penalty E[(||grad_x D(x_hat)||_2 - 1)^2] at random interpolates of real and fake.

    real, fake: (B, 1, X, Y, Z). Returns a float32 scalar (unweighted). ``generator`` seeds the
    interpolation coefficients (drawn on its device).
    """
    # Under autocast the generator's output may be bfloat16 while real data is float32.
    real, fake = real.detach(), fake.detach().to(real.dtype)
    gen_device = real.device if generator is None else generator.device
    alpha = torch.rand((real.shape[0],) + (1,) * (real.ndim - 1), generator=generator, device=gen_device)
    alpha = alpha.to(device=real.device, dtype=real.dtype)
    x_hat = torch.lerp(real, fake, alpha).requires_grad_(True)
    # The epsilon keeps sqrt differentiable where the gradient vanishes.
    norm = (_input_grad_sq_norm(discriminator(x_hat), x_hat) + 1e-12).sqrt()
    return (norm - 1.0).square().mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """R1 penalty E[||grad_x D(x)||_2^2] on real data (B, 1, X, Y, Z): float32 scalar, unweighted (no gamma/2)."""
    real = real.detach().requires_grad_(True)
    return _input_grad_sq_norm(discriminator(real), real).mean()


def wgan_gp_d_loss(
    discriminator: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    gp_weight: float = 10.0,
    drift_weight: float = 1e-3,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Critic loss E[D(fake)] - E[D(real)] + gp_weight * GP + drift_weight * E[D(real)^2].

    ``fake`` is detached here. The drift term (ProGAN) keeps the critic's scores from wandering, which
    the Wasserstein loss alone leaves unconstrained. Returns ``loss`` and detached ``wasserstein``
    (the estimate E[D(real)] - E[D(fake)]), ``gp`` and ``drift``.
    """
    real_scores = discriminator(real).float()
    fake_scores = discriminator(fake.detach()).float()
    wasserstein = real_scores.mean() - fake_scores.mean()
    gp = gradient_penalty(discriminator, real, fake, generator) if gp_weight > 0 else real_scores.new_zeros(())
    drift = real_scores.square().mean()
    loss = -wasserstein + gp_weight * gp + drift_weight * drift
    return {"loss": loss, "wasserstein": wasserstein.detach(), "gp": gp.detach(), "drift": drift.detach()}


def wgan_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Generator loss -E[D(G(z))] from the critic's scores on fakes (B,) or (B, 1): float32 scalar."""
    return -fake_scores.float().mean()


def ns_d_loss(
    discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor, r1_gamma: float = 10.0
) -> dict[str, torch.Tensor]:
    """Non-saturating logistic critic loss softplus(D(fake)) + softplus(-D(real)) + r1_gamma / 2 * R1.

    ``fake`` is detached here. ``r1_gamma = 0`` skips the R1 double-backward (e.g. lazy regularisation on
    non-R1 steps). Returns ``loss`` and detached ``adv`` and ``r1``.
    """
    real = real.detach().requires_grad_(r1_gamma > 0)
    real_scores = discriminator(real).float()
    fake_scores = discriminator(fake.detach()).float()
    adv = F.softplus(fake_scores).mean() + F.softplus(-real_scores).mean()
    # R1 reuses the real scores' graph instead of a second forward pass.
    r1 = _input_grad_sq_norm(real_scores, real).mean() if r1_gamma > 0 else real_scores.new_zeros(())
    loss = adv + 0.5 * r1_gamma * r1
    return {"loss": loss, "adv": adv.detach(), "r1": r1.detach()}


def ns_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss E[softplus(-D(G(z)))]: float32 scalar."""
    return F.softplus(-fake_scores.float()).mean()


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied.

    decay 0 copies the model, decay 1 leaves ``ema`` unchanged. Both modules must share one architecture.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay: expected a value in [0, 1], got {decay}")
    ema_params, params = list(ema.parameters()), list(model.parameters())
    if len(ema_params) != len(params):
        raise ValueError("update_ema: the EMA module and the model have different architectures")
    # lerp(ema, p, 1 - decay) = decay * ema + (1 - decay) * p, one fused call over all tensors.
    torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ------------------------------------------------------------------------------------------------ model
@register_family
class GAN(LatentModel):
    """Generator, EMA generator and critic for (B, 1, X, Y, Z) volumes in [0, 1].

    Train ``generator`` and ``discriminator`` (separate optimisers), call :meth:`update_ema` after each
    generator step; ``generator_ema`` never requires gradients and is what ``decode``/``sample`` use.

    Args:
        latent_dim: size of z ~ N(0, I).
        volume_shape: (X, Y, Z).
        g_base_channels, g_max_channels: generator widths at full resolution and at the bottleneck cap.
        d_base_channels, d_max_channels: critic widths.
        min_bottleneck: the smallest allowed bottleneck axis (see :func:`layers.stage_shapes`).
        g_norm: generator normalisation ("group", "layer", "none").
        d_norm: critic normalisation ("layer", "group", "none"); never batch statistics.
    """

    family = "gan"
    generative = True

    def __init__(
        self,
        latent_dim: int = 64,
        volume_shape: Sequence[int] = (32, 40, 32),
        g_base_channels: int = 16,
        g_max_channels: int = 128,
        d_base_channels: int = 16,
        d_max_channels: int = 128,
        min_bottleneck: int = 4,
        g_norm: Norm = "group",
        d_norm: Norm = "layer",
    ):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim: expected a positive integer, got {latent_dim}")
        self.latent_dim = int(latent_dim)
        self.volume_shape = as_shape3(volume_shape)
        self._config = dict(
            latent_dim=self.latent_dim,
            volume_shape=list(self.volume_shape),
            g_base_channels=g_base_channels,
            g_max_channels=g_max_channels,
            d_base_channels=d_base_channels,
            d_max_channels=d_max_channels,
            min_bottleneck=min_bottleneck,
            g_norm=g_norm,
            d_norm=d_norm,
        )
        self.generator = Decoder3d(
            self.volume_shape, self.latent_dim, g_base_channels, g_max_channels, min_bottleneck, g_norm, "sigmoid"
        )
        self.discriminator = Encoder3d(self.volume_shape, 1, d_base_channels, d_max_channels, min_bottleneck, d_norm)
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    def update_ema(self, decay: float) -> None:
        """generator_ema <- decay * generator_ema + (1 - decay) * generator."""
        update_ema(self.generator_ema, self.generator, decay)

    # -- latent interface -----------------------------------------------------------------------------
    def synthesize(self, z: torch.Tensor) -> torch.Tensor:
        """EMA generator: (B, latent_dim) -> (B, 1, X, Y, Z) in [0, 1]; differentiable in z (for inversion)."""
        self.check_latents(z)
        return self.generator_ema(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.synthesize(z)

    def latent_init(self, n: int) -> torch.Tensor:
        """Starting latents for inversion: the prior mean, zeros (n, latent_dim)."""
        return torch.zeros(n, self.latent_dim, device=self.device)

    def encode(self, x: torch.Tensor, **inversion_kwargs: Any) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, latent_dim) by optimising z so that synthesize(z) matches x.

        Delegates to :func:`brainlatent.inversion.invert` from :meth:`latent_init` (imported here: the
        GAN trains and samples without it); ``inversion_kwargs`` (``steps``, ``lr``, ...) are passed through.
        """
        self.check_volumes(x)
        from brainlatent.inversion import invert  # lazy: only encoding needs the inversion module

        result = invert(self.synthesize, x, self.latent_init(x.shape[0]), **inversion_kwargs)
        return result.latent.detach()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` volumes (n, 1, X, Y, Z) from the EMA generator at z ~ N(0, I)."""
        return self.synthesize(self.prior_latents(n, generator))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The *training* generator (not the EMA): (B, latent_dim) -> (B, 1, X, Y, Z)."""
        self.check_latents(z)
        return self.generator(z)
