"""What the adversarial families (``gan.py``, ``stylegan.py``) share: losses, penalties and the generator EMA.

* WGAN-GP (Gulrajani et al., 2017) with the ProGAN drift term, and the non-saturating logistic loss with the
  R1 penalty (Mescheder et al., 2018). Scores are cast to float32 before any reduction so the losses are safe
  under ``torch.autocast(..., dtype=torch.bfloat16)``.
* The generator EMA (Karras et al., 2018; Yazici et al., 2019): one function, one ``decay`` for every family.
* The minibatch standard-deviation layer of the critics (ProGAN): a critic that sees how much a batch varies
  can tell a collapsed generator (every sample the same brain) from real scans.

The training tasks that use them are in ``train/adversarial.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from brainlatent.models.base import rand_on


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
    alpha = rand_on(generator, (real.shape[0],) + (1,) * (real.ndim - 1), real.device).to(real.dtype)
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


class MinibatchStd(nn.Module):
    """Append one feature map: the std of each feature over a group of samples, averaged over channels
    and voxels (v1's ``minibatch_stddev_layer``, one new feature). Computed in float32.

    Groups are strided (sample i is in group ``i % (B // G)``) as in v1. ``G = min(group_size, B)`` shrunk
    to a divisor of B so the last ragged batch of an epoch still works.
    (B, C, X, Y, Z) -> (B, C + 1, X, Y, Z).
    """

    def __init__(self, group_size: int = 4, eps: float = 1e-8) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"mbstd_group_size: expected >= 1, got {group_size}")
        self.group_size, self.eps = group_size, eps

    def group(self, batch: int) -> int:
        g = min(self.group_size, batch)
        while batch % g:
            g -= 1
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, *spatial = x.shape
        g = self.group(b)
        y = x.float().reshape(g, -1, *x.shape[1:])  # (G, M, C, X, Y, Z)
        std = torch.sqrt(y.var(dim=0, unbiased=False) + self.eps)  # (M, C, X, Y, Z)
        stat = std.mean(dim=(1, 2, 3, 4)).view(-1, 1, 1, 1, 1)  # (M, 1, 1, 1, 1)
        stat = stat.repeat(g, 1, *spatial).to(x.dtype)  # (B, 1, X, Y, Z); row i -> group i % M
        return torch.cat([x, stat], dim=1)


TEMPLATE_EPS = 1e-3  # a template volume is clamped into [eps, 1 - eps] before its logit (background 0 -> -6.9)


def template_logit(mean_volume: torch.Tensor, eps: float = TEMPLATE_EPS) -> torch.Tensor:
    """The logit of a mean training volume clamped to [eps, 1 - eps]: what a template-start generator adds to
    its output before the sigmoid (``gan.TemplateGenerator``, StyleGAN's per-level templates)."""
    return torch.logit(mean_volume.float().clamp(eps, 1 - eps))
