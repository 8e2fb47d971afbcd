"""Training tasks for the reconstruction families: autoencoder and VAE."""

from __future__ import annotations

import torch

from brainlatent.metrics.reconstruction import reconstruction_per_volume
from brainlatent.models.base import build_model
from brainlatent.train import distributed
from brainlatent.train.device import adam
from brainlatent.train.loop import Task


class ReconstructionTask(Task):
    """AE and VAE: Adam(W) with cosine decay; validation reports MSE / PSNR / SSIM (and the ELBO terms)."""

    shows_inputs = True

    _ddp_loss = None  # model.loss through DistributedDataParallel, under torchrun only

    def __init__(self, family: str, cfg, volume_shape, device, bf16=False, channels_last=False):
        super().__init__(device, bf16, channels_last)
        self.family, self.cfg = family, cfg
        self.model = build_model(family, {**cfg.model_kwargs(), "volume_shape": list(volume_shape)}).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.opt = adam(self.model.parameters(), device, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt, T_max=cfg.epochs, eta_min=cfg.lr * cfg.lr_min_ratio
        )
        self.kl_weight = 1.0

    def fit_data(self, train):
        if self.model.arch == "dense":  # dense models predict the deviation from the mean training volume
            self.model.set_template(train)

    @torch.no_grad()
    def on_train_end(self, train):
        if self.family == "vae":  # sample() draws from a Gaussian fitted to the training posterior means
            latents = [self.model.encode(self.prepare_batch(train[i : i + 16])).float() for i in range(0, len(train), 16)]
            self.model.fit_prior(torch.cat(latents))

    def optimizers(self):
        return {"model": self.opt}

    def schedulers(self):
        return {"model": self.sched}

    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        out = {"lr": self.opt.param_groups[0]["lr"]}
        if self.family == "vae":
            # Warm-up factor in [0, 1] at the end of this epoch (beta lives in the model); logged as
            # the effective KL weight beta * warm-up.
            self.kl_weight = self.model.kl_weight(epoch + 1)
            out["kl_weight"] = self.model.beta * self.kl_weight
        return out

    def distribute(self):
        # One plain backward per step: DDP averages the gradients, overlapping the all-reduce with it.
        self._ddp_loss = distributed.ddp_loss(self.model, self.device)

    def _loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = self._ddp_loss or self.model.loss
        if self.family == "vae":
            return loss(x, kl_weight=self.kl_weight)
        return loss(x)

    def train_step(self, x, epoch, step):
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            losses = self._loss(x)
        losses["loss"].backward()
        self.opt.step()
        return {k: v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        outs = []
        for i in range(0, len(x), batch_size):
            xb = self.prepare_batch(x[i : i + batch_size])
            with self.autocast():
                outs.append(self.model.decode(self.model.encode(xb)).float().cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def validate(self, val):
        recon = self.reconstruct(val)
        per_volume = reconstruction_per_volume(recon, val)
        metrics = {k: float(v.mean()) for k, v in per_volume.items()}
        if self.family == "vae":
            terms = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
            n = 0
            for i in range(0, len(val), 16):
                xb = self.prepare_batch(val[i : i + 16])
                with self.autocast():
                    out = self.model.loss(xb, kl_weight=1.0)
                for k in terms:
                    terms[k] += float(out[k]) * len(xb)
                n += len(xb)
            metrics.update({"elbo_loss": terms["loss"] / n, "kl": terms["kl"] / n})
        return metrics

    @torch.no_grad()
    def artifacts(self, fixed, generator):
        out = {"reconstructions": self.reconstruct(fixed)}
        if getattr(self.model, "generative", False):
            out["samples"] = self.model.sample(len(fixed), generator=generator).float().cpu()
        return out
