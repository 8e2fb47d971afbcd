"""Training tasks for the adversarial families: DCGAN-style GAN and StyleGAN v1 (progressive growing).

Both use Adam with beta1 = 0 (as in ProGAN/StyleGAN), one discriminator step per batch and a generator
step every ``n_critic`` batches, a generator EMA for everything that is logged or registered, lazy R1 for
the non-saturating loss (the penalty, scaled by ``r1_every``, only every ``r1_every`` discriminator steps:
StyleGAN2's lazy regularisation; the double backward is the most expensive part of a D step), and the
same validation proxy until the evaluation stage supplies FID: ``val_proxy`` = unbiased RBF-MMD^2 (median
heuristic) between EMA samples and the validation volumes, both average-pooled 2x per axis (a cheap,
seed-fixed distribution distance in voxel space; lower is better).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from brainlatent.metrics.generative import mmd_rbf
from brainlatent.models import adversarial as losses
from brainlatent.models.base import build_model
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
    def __init__(self, family, cfg, volume_shape, device, bf16=False, channels_last=False):
        super().__init__(device, bf16, channels_last)
        self.family, self.cfg = family, cfg
        self.model = build_model(family, {**cfg.model_kwargs(), "volume_shape": list(volume_shape)}).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        betas = (0.0, 0.99)
        self.opt_g = adam(self.model.generator.parameters(), device, lr=cfg.lr_g, betas=betas)
        self.opt_d = adam(self.model.discriminator.parameters(), device, lr=cfg.lr_d, betas=betas)

    def optimizers(self):
        return {"generator": self.opt_g, "discriminator": self.opt_d}

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
            "val_proxy": float(mmd),
            "val_sample_mean_abs_err": float((fake.mean(0) - val.mean(0)).abs().mean()),
        }

    @torch.no_grad()
    def artifacts(self, fixed, generator):
        return {"samples": self.sample(len(fixed), generator).float().cpu()}


class GANTask(_AdversarialTask):
    """DCGAN-style GAN with WGAN-GP (default) or non-saturating + R1."""

    def train_step(self, x, epoch, step):
        cfg, m = self.cfg, self.model
        z = torch.randn(len(x), m.latent_dim, device=self.device)
        with torch.no_grad(), self.autocast():  # D's step never backpropagates into the generator
            fake = m.generator(z)
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():  # D must see real and bf16 fake volumes under the same precision policy
            if cfg.loss == "wgan-gp":
                d = losses.wgan_gp_d_loss(m.discriminator, x, fake, gp_weight=cfg.gp_weight)
            else:
                d = losses.ns_d_loss(m.discriminator, x, fake, r1_gamma=lazy_r1_gamma(cfg, step))
        d["loss"].backward()
        self.opt_d.step()
        out = {"d_loss": d["loss"].detach(), **{f"d_{k}": v.detach() for k, v in d.items() if k != "loss"}}
        if step % cfg.n_critic == 0:
            self.opt_g.zero_grad(set_to_none=True)
            with frozen(m.discriminator):
                with self.autocast():
                    scores = m.discriminator(m.generator(torch.randn(len(x), m.latent_dim, device=self.device)))
                g = losses.wgan_g_loss(scores) if cfg.loss == "wgan-gp" else losses.ns_g_loss(scores)
                g.backward()
            self.opt_g.step()
            m.update_ema(cfg.ema_decay)
            self.last_g = g.detach()
        out["g_loss"] = getattr(self, "last_g", torch.tensor(0.0))
        out["loss"] = out["d_loss"]
        return out


class StyleGANTask(_AdversarialTask):
    """StyleGAN v1: progressive growing with fade-in, style mixing, w_avg tracking, generator EMA.

    Schedule: level ``l`` (0 = coarsest) trains for ``epochs_per_level`` epochs, the first ``fade_fraction``
    of them fading the new level in (alpha 0 -> 1 per step); the last level trains for all remaining epochs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.level, self.alpha = 0, 1.0

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

    def train_step(self, x, epoch, step):
        cfg, m = self.cfg, self.model
        from brainlatent.models import stylegan as S

        n_steps = max(getattr(self, "steps_per_epoch", 1), 1)
        level, alpha = self.schedule(epoch + step / n_steps)
        self.level, self.alpha = level, alpha
        real = m.reals_at_level(x, level, alpha)
        G, D = m.generator, m.discriminator
        z = torch.randn(len(x), m.z_dim, device=self.device)
        with torch.no_grad(), self.autocast():  # D's step never backpropagates into the generator
            fake = G(z, level, alpha, mixing_prob=cfg.mixing_prob)
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():  # D must see real and bf16 fake volumes under the same precision policy
            d = S.discriminator_loss(
                D, real, fake, level, alpha, loss=cfg.loss, r1_gamma=lazy_r1_gamma(cfg, step),
                gp_weight=cfg.gp_weight,
            )
        d["loss"].backward()
        self.opt_d.step()
        out = {"d_loss": d["loss"].detach(), **{f"d_{k}": v.detach() for k, v in d.items() if k != "loss"}}
        if step % cfg.n_critic == 0:
            self.opt_g.zero_grad(set_to_none=True)
            z = torch.randn(len(x), m.z_dim, device=self.device)
            with frozen(D):
                with self.autocast():
                    fake, ws = G(z, level, alpha, mixing_prob=cfg.mixing_prob, return_ws=True)
                    g_loss = S.generator_loss(D, fake, level, alpha, loss=cfg.loss)
                g_loss.backward()
            self.opt_g.step()
            G.update_w_avg(ws[:, 0].detach().float(), beta=cfg.w_avg_beta)
            m.update_ema(cfg.ema_decay)
            self.last_g = g_loss.detach()
        out["g_loss"] = getattr(self, "last_g", torch.tensor(0.0))
        out["loss"] = out["d_loss"]
        return out

    def sample(self, n, generator):
        """EMA samples at the current level and alpha, upsampled to the full grid (for logging)."""
        m = self.model
        g = m.generator_ema
        z = torch.randn(n, m.z_dim, generator=generator).to(self.device)
        vol = g(z, self.level, self.alpha, psi=m.truncation_psi, noise_mode="random", generator=None)
        if tuple(vol.shape[2:]) != tuple(m.volume_shape):
            vol = F.interpolate(vol.float(), size=tuple(m.volume_shape), mode="trilinear", align_corners=False)
        return vol.clamp(0, 1)

    @torch.no_grad()
    def validate(self, val):
        metrics = super().validate(val)
        metrics["val_proxy_final_level"] = float(self.level == self.model.n_levels - 1 and self.alpha >= 1.0)
        return metrics

    @torch.no_grad()
    def artifacts(self, fixed, generator):
        out = super().artifacts(fixed, generator)
        if self.level == self.model.n_levels - 1:
            out["style_mixing"] = style_mixing_grid(self.model, generator)
            out["truncation_sweep"] = truncation_sweep(self.model, generator)
        return out

    def extra_state(self):
        return {"level": self.level, "alpha": self.alpha}

    def load_extra_state(self, state):
        self.level, self.alpha = int(state.get("level", 0)), float(state.get("alpha", 1.0))


@torch.no_grad()
def style_mixing_grid(model, generator: torch.Generator, n: int = 2) -> torch.Tensor:
    """Volumes of a style-mixing grid: source A_i, source B_j, then A_i's coarse styles with B_j's fine ones
    at a crossover halfway through the layers. Returns (n + n + n*n, 1, X, Y, Z), row-major."""
    g = model.generator_ema
    za = torch.randn(n, model.z_dim, generator=generator).to(model.device)
    zb = torch.randn(n, model.z_dim, generator=generator).to(model.device)
    wa, wb = g.mapping(za), g.mapping(zb)
    crossover = g.n_layers // 2
    vols = [model.synthesize(wa), model.synthesize(wb)]
    for i in range(n):
        mixed = g.mix_styles(wa[i : i + 1].expand(n, -1), wb, crossover)
        vols.append(g.synthesis(mixed, None, 1.0, "const"))
    return torch.cat(vols).clamp(0, 1).float().cpu()


@torch.no_grad()
def truncation_sweep(model, generator: torch.Generator, psis=(0.0, 0.25, 0.5, 0.75, 1.0)) -> torch.Tensor:
    """One z rendered at each truncation psi (psi = 0 is the average w's image). (len(psis), 1, X, Y, Z)."""
    g = model.generator_ema
    z = torch.randn(1, model.z_dim, generator=generator).to(model.device)
    ws = g.broadcast(g.mapping(z))
    vols = [g.synthesis(g.truncate(ws, psi), None, 1.0, "const") for psi in psis]
    return torch.cat(vols).clamp(0, 1).float().cpu()


def make_adversarial_task(family, cfg, volume_shape, device, bf16=False, channels_last=False) -> Task:
    if family == "gan":
        return GANTask(family, cfg, volume_shape, device, bf16, channels_last)
    if family == "stylegan":
        return StyleGANTask(family, cfg, volume_shape, device, bf16, channels_last)
    raise ValueError(f"unknown adversarial family {family!r}; expected gan or stylegan")


__all__ = ["GANTask", "StyleGANTask", "make_adversarial_task", "style_mixing_grid", "truncation_sweep"]
