"""Training tasks for the adversarial families: DCGAN-style GAN and StyleGAN v1 (progressive growing).

Both use Adam with beta1 = 0 (as in ProGAN/StyleGAN), one discriminator step per batch and a generator
step every ``n_critic`` batches, a generator EMA for everything that is logged or registered, lazy R1 for
the non-saturating loss (the penalty, scaled by ``r1_every``, only every ``r1_every`` discriminator steps:
StyleGAN2's lazy regularisation; the double backward is the most expensive part of a D step), and the
same validation proxy until the evaluation stage supplies FID: ``val/proxy`` = unbiased RBF-MMD^2 (median
heuristic) between EMA samples and the validation volumes, both average-pooled 2x per axis (a cheap,
seed-fixed distribution distance in voxel space; lower is better).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from brainlatent.metrics.generative import mmd_rbf
from brainlatent.models import adversarial as losses
from brainlatent.models import stylegan as S
from brainlatent.models.base import build_model, randn_on
from brainlatent.train.augment import augment, parse_policy
from brainlatent.train.device import adam
from brainlatent.train.loop import Task

PROXY_SEED = 1234


def _pooled(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool3d(x.float(), kernel_size=2, ceil_mode=True).flatten(1)


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Within: ``module``'s parameters need no gradient. The generator step backpropagates through the
    discriminator only to reach the generator; the discriminator's own weight gradients, which its next
    step would discard (``zero_grad``), are not computed (stylegan2-ada-pytorch toggles them per phase)."""
    module.requires_grad_(False)
    try:
        yield module
    finally:
        module.requires_grad_(True)


def lazy_r1_gamma(cfg, step: int) -> float:
    """R1 weight for this discriminator step: ``r1_gamma * r1_every`` every ``r1_every`` steps, else 0."""
    return cfg.r1_gamma * cfg.r1_every if step % cfg.r1_every == 0 else 0.0


class _AdversarialTask(Task):
    """One training step for every adversarial family, as two phases (stylegan2-ada-pytorch's phase list):

    * discriminator, every batch: a fresh fake batch (no generator graph), the critic loss (R1 lazily),
      a D update;
    * generator, every ``n_critic`` batches: fakes scored by the frozen discriminator, a G update, then
      :meth:`after_generator_step` (the EMA; StyleGAN also tracks ``w_avg``).

    A family supplies its parts: :meth:`reals`, :meth:`fakes`, :meth:`critic_loss`, :meth:`generator_loss`.
    """

    def __init__(self, family, cfg, volume_shape, device, bf16=False, channels_last=False):
        super().__init__(device, bf16, channels_last)
        self.family, self.cfg = family, cfg
        self.model = build_model(family, {**cfg.model_kwargs(), "volume_shape": list(volume_shape)}).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        betas = (0.0, 0.99)
        self.opt_g = adam(self.model.generator.parameters(), device, lr=cfg.lr_g, betas=betas)
        self.opt_d = adam(self.model.discriminator.parameters(), device, lr=cfg.lr_d, betas=betas)
        self.augment_policy = parse_policy(cfg.augment)

    def seen_by_critic(self, x: torch.Tensor) -> torch.Tensor:
        """What the discriminator sees of a real or fake batch: its differentiable augmentation, if any."""
        return augment(x, self.augment_policy) if self.augment_policy else x

    def optimizers(self):
        return {"generator": self.opt_g, "discriminator": self.opt_d}

    # -- the family's parts ---------------------------------------------------------------------------
    def reals(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """The real batch as the discriminator sees it at this step."""
        return x

    def fakes(self, n: int) -> tuple[torch.Tensor, dict]:
        """``n`` generated volumes from fresh latents, and what :meth:`after_generator_step` needs."""
        raise NotImplementedError

    def critic_loss(self, real: torch.Tensor, fake: torch.Tensor, r1_gamma: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_generator_step(self, extras: dict) -> None:
        self.model.update_ema(self.cfg.ema_decay)

    # -- the step -------------------------------------------------------------------------------------
    def train_step(self, x, epoch, step):
        out = self.discriminator_phase(self.reals(x, epoch, step), lazy_r1_gamma(self.cfg, step))
        if step % self.cfg.n_critic == 0:
            self.last_g = self.generator_phase(len(x))
        out["g_loss"] = getattr(self, "last_g", torch.tensor(0.0))
        out["loss"] = out["d_loss"]
        return out

    def discriminator_phase(self, real: torch.Tensor, r1_gamma: float) -> dict[str, torch.Tensor]:
        with torch.no_grad(), self.autocast():  # D's step never backpropagates into the generator
            fake, _ = self.fakes(len(real))
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():  # D must see real and bf16 fake volumes under the same precision policy
            d = self.critic_loss(self.seen_by_critic(real), self.seen_by_critic(fake), r1_gamma)
        d["loss"].backward()
        self.opt_d.step()
        return {"d_loss": d["loss"].detach(), **{f"d_{k}": v.detach() for k, v in d.items() if k != "loss"}}

    def generator_phase(self, n: int) -> torch.Tensor:
        self.opt_g.zero_grad(set_to_none=True)
        with frozen(self.model.discriminator):
            with self.autocast():
                fake, extras = self.fakes(n)
                g_loss = self.generator_loss(self.seen_by_critic(fake))
            g_loss.backward()
        self.opt_g.step()
        self.after_generator_step(extras)
        return g_loss.detach()

    # -- validation and artifacts ---------------------------------------------------------------------
    @torch.no_grad()
    def proxy_samples(self, n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(PROXY_SEED)
        out = []
        for i in range(0, n, 16):
            with self.autocast():
                out.append(self.sample(min(16, n - i), gen).float().cpu())
        return torch.cat(out)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.model.sample(n, generator=generator)

    @torch.no_grad()
    def validate(self, val):
        fake = self.proxy_samples(max(len(val), 16))
        mmd = mmd_rbf(_pooled(fake).numpy(), _pooled(val).numpy())["mmd_rbf"]
        return {
            "proxy": float(mmd),
            "sample_mean_abs_err": float((fake.mean(0) - val.mean(0)).abs().mean()),
        }

    @torch.no_grad()
    def artifacts(self, fixed, generator):
        return {"samples": self.sample(len(fixed), generator).float().cpu()}


class GANTask(_AdversarialTask):
    """DCGAN-style GAN with WGAN-GP or non-saturating + R1."""

    def fit_data(self, train):
        self.model.set_template(train)  # a no-op unless gan.template (models/gan.py)

    def fakes(self, n):
        return self.model.generator(torch.randn(n, self.model.latent_dim, device=self.device)), {}

    def critic_loss(self, real, fake, r1_gamma):
        D, cfg = self.model.discriminator, self.cfg
        if cfg.loss == "wgan-gp":
            return losses.wgan_gp_d_loss(D, real, fake, gp_weight=cfg.gp_weight)
        return losses.ns_d_loss(D, real, fake, r1_gamma=r1_gamma)

    def generator_loss(self, fake):
        scores = self.model.discriminator(fake)
        return losses.wgan_g_loss(scores) if self.cfg.loss == "wgan-gp" else losses.ns_g_loss(scores)


class StyleGANTask(_AdversarialTask):
    """StyleGAN v1: progressive growing with fade-in, style mixing, w_avg tracking, generator EMA.

    Schedule: level ``l`` (0 = coarsest) trains for ``epochs_per_level`` epochs, the first ``fade_fraction``
    of them fading the new level in (alpha 0 -> 1 per step); the last level trains for all remaining epochs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.level, self.alpha = 0, 1.0

    def fit_data(self, train):
        self.model.set_template(train)  # a no-op unless stylegan.template (models/stylegan.py)

    def schedule(self, epoch: float) -> tuple[int, float]:
        """(level, alpha) at a fractional epoch."""
        per = self.cfg.epochs_per_level
        last = self.model.n_levels - 1
        level = min(int(epoch // per), last)
        if level == 0:
            return 0, 1.0
        into = epoch - level * per
        fade = max(self.cfg.fade_fraction * per, 1e-8)
        return level, float(min(1.0, into / fade))

    def on_epoch_start(self, epoch):
        self.epoch = epoch
        self.level, self.alpha = self.schedule(epoch)
        return {"resolution_level": float(self.level), "alpha": self.alpha}

    def reals(self, x, epoch, step):
        n_steps = max(getattr(self, "steps_per_epoch", 1), 1)
        self.level, self.alpha = self.schedule(epoch + step / n_steps)
        return self.model.reals_at_level(x, self.level, self.alpha)

    def fakes(self, n):
        m = self.model
        z = torch.randn(n, m.z_dim, device=self.device)
        fake, ws = m.generator(z, self.level, self.alpha, mixing_prob=self.cfg.mixing_prob, return_ws=True)
        return fake, {"ws": ws}

    def critic_loss(self, real, fake, r1_gamma):
        cfg = self.cfg
        return S.discriminator_loss(
            self.model.discriminator, real, fake, self.level, self.alpha, loss=cfg.loss, r1_gamma=r1_gamma,
            gp_weight=cfg.gp_weight,
        )

    def generator_loss(self, fake):
        return S.generator_loss(self.model.discriminator, fake, self.level, self.alpha, loss=self.cfg.loss)

    def after_generator_step(self, extras):
        # w_avg first: the EMA update copies the generator's buffers, w_avg included.
        self.model.generator.update_w_avg(extras["ws"][:, 0].detach().float(), beta=self.cfg.w_avg_beta)
        super().after_generator_step(extras)

    def sample(self, n, generator):
        """EMA samples at the current level and alpha, upsampled to the full grid (for logging). Latents *and*
        noise come from ``generator``: the validation proxy compares epochs and tuning trials on the same draws
        (the noise used to come from the global stream, so the proxy moved with the training batches)."""
        m = self.model
        g = m.generator_ema
        z = randn_on(generator, (n, m.z_dim), self.device)
        vol = g(z, self.level, self.alpha, psi=m.truncation_psi, noise_mode="random", generator=generator)
        if tuple(vol.shape[2:]) != tuple(m.volume_shape):
            vol = F.interpolate(vol.float(), size=tuple(m.volume_shape), mode="trilinear", align_corners=False)
        return vol.clamp(0, 1)

    @torch.no_grad()
    def validate(self, val):
        metrics = super().validate(val)
        metrics["proxy_final_level"] = float(self.level == self.model.n_levels - 1 and self.alpha >= 1.0)
        return metrics

    @torch.no_grad()
    def artifacts(self, fixed, generator):
        out = super().artifacts(fixed, generator)
        if self.level == self.model.n_levels - 1:
            out["style_mixing"] = self.model.style_mixing_grid(generator).float().cpu()
            out["truncation_sweep"] = self.model.truncation_sweep(generator).float().cpu()
        return out

    def extra_state(self):
        return {"level": self.level, "alpha": self.alpha}

    def load_extra_state(self, state):
        self.level, self.alpha = int(state.get("level", 0)), float(state.get("alpha", 1.0))


def make_adversarial_task(family, cfg, volume_shape, device, bf16=False, channels_last=False) -> Task:
    if family == "gan":
        return GANTask(family, cfg, volume_shape, device, bf16, channels_last)
    if family == "stylegan":
        return StyleGANTask(family, cfg, volume_shape, device, bf16, channels_last)
    raise ValueError(f"unknown adversarial family {family!r}; expected gan or stylegan")


__all__ = ["GANTask", "StyleGANTask", "make_adversarial_task"]
