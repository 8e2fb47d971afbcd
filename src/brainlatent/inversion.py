"""GAN inversion: find the latent whose synthesis best matches a volume (family-agnostic).

``invert`` optimises a batch of latents with Adam so that ``synthesize(latent)`` matches the target
volumes: voxel MSE plus an optional feature loss (``feature_fn`` maps volumes to features, e.g. a
pretrained feature network). The learning-rate schedule is the StyleGAN projector's (linear warm-up,
cosine ramp-down); optional latent noise, ramped down over the first steps, helps escape poor basins.

What is optimised is the caller's choice: StyleGAN optimises w (B, w_dim) or w+ (B, n_layers, w_dim) from
``w_avg`` (see ``StyleGAN.project``); a DCGAN optimises z from zeros, the prior's mode (``GAN.latent_init``). Each sample's loss depends only on its own latent and Adam is element-wise, so a
batch inverts exactly like its samples would one by one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from monai.metrics import SSIMMetric
from torch import Tensor

Features = Tensor | Sequence[Tensor]


@dataclass
class InversionResult:
    """Outcome of :func:`invert` (all tensors detached, float32, on the target's device).

    latent: (B, ...) the optimised latents. reconstruction: (B, 1, X, Y, Z) ``synthesize(latent)``.
    psnr: (B,) dB. ssim: (B,) or None when not computed. history: per-step batch means of
    ``loss``, ``mse``, ``feature`` and the learning rate ``lr``.
    """

    latent: Tensor
    reconstruction: Tensor
    psnr: Tensor
    ssim: Tensor | None
    history: dict[str, list[float]] = field(default_factory=dict)


def lr_multiplier(t: float, rampup: float = 0.05, rampdown: float = 0.25) -> float:
    """StyleGAN projector schedule at progress ``t`` in [0, 1]: linear warm-up over the first ``rampup``
    fraction, cosine ramp-down to 0 over the last ``rampdown`` fraction."""
    down = min(1.0, (1.0 - t) / rampdown) if rampdown > 0 else 1.0
    down = 0.5 - 0.5 * math.cos(down * math.pi)
    up = min(1.0, t / rampup) if rampup > 0 else 1.0
    return down * up


def psnr(reconstruction: Tensor, target: Tensor, data_range: float | None = None) -> Tensor:
    """Per-sample PSNR (B,) in dB. ``data_range`` None: each target's own max - min."""
    rec, tgt = reconstruction.detach().float(), target.detach().float()
    mse = (rec - tgt).square().flatten(1).mean(dim=1)
    if data_range is None:
        flat = tgt.flatten(1)
        rng = flat.amax(dim=1) - flat.amin(dim=1)
    else:
        rng = torch.full_like(mse, float(data_range))
    return 10.0 * torch.log10(rng.square() / mse)


def ssim(reconstruction: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-sample 3D SSIM (B,) via MONAI, Gaussian window of at most 7 voxels (fits small volumes)."""
    win = min(7, *target.shape[2:])
    win -= 1 - win % 2  # odd window
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=win, reduction="none")
    return metric(reconstruction.detach().float(), target.detach().float()).reshape(-1)


def _ssim_range(target: Tensor, data_range: float | None) -> float:
    """MONAI's SSIM takes one range for the batch: the given one, else the batch's max - min."""
    if data_range is not None:
        return float(data_range)
    return float(target.max() - target.min()) or 1.0


def _feature_distance(a: Features, b: Features) -> Tensor:
    """Per-sample mean squared feature difference, summed over feature tensors: (B,)."""
    a_list = [a] if isinstance(a, Tensor) else list(a)
    b_list = [b] if isinstance(b, Tensor) else list(b)
    return sum((x.float() - y.float()).square().flatten(1).mean(dim=1) for x, y in zip(a_list, b_list))


def _check_inversion(target: Tensor, init_latent: Tensor, steps: int, lr: float,
                     feature_fn: Callable[[Tensor], Features] | None, feature_weight: float) -> None:
    if target.ndim != 5 or target.shape[1] != 1:
        raise ValueError(f"invert: target must be (B, 1, X, Y, Z), got {tuple(target.shape)}")
    if init_latent.shape[0] != target.shape[0]:
        raise ValueError(
            f"invert: init_latent batch ({init_latent.shape[0]}) must match target batch ({target.shape[0]})"
        )
    if steps < 1 or not lr > 0:
        raise ValueError(f"invert: steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
    if feature_weight > 0 and feature_fn is None:
        raise ValueError("invert: feature_weight > 0 needs a feature_fn")


def _objective(target: Tensor, feature_fn: Callable[[Tensor], Features] | None, feature_weight: float
               ) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """``reconstruction -> (loss, mse, feature distance)``, each (B,): voxel MSE plus the weighted feature loss
    (the target's features computed once, here)."""
    use_features = feature_fn is not None and feature_weight > 0
    target_features = None
    if use_features:
        with torch.no_grad():
            target_features = feature_fn(target)  # type: ignore[misc]

    def objective(recon: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mse = (recon - target).square().flatten(1).mean(dim=1)
        feat = _feature_distance(feature_fn(recon), target_features) if use_features else torch.zeros_like(mse)  # type: ignore[misc,arg-type]
        return mse + feature_weight * feat, mse, feat

    return objective


def invert(
    synthesize: Callable[[Tensor], Tensor],
    target: Tensor,
    init_latent: Tensor,
    steps: int = 300,
    lr: float = 0.05,
    feature_fn: Callable[[Tensor], Features] | None = None,
    feature_weight: float = 0.0,
    *,
    rampup: float = 0.05,
    rampdown: float = 0.25,
    latent_noise: float = 0.0,
    noise_ramp: float = 0.75,
    seed: int = 0,
    data_range: float | None = None,
    compute_ssim: bool = True,
) -> InversionResult:
    """Optimise latents so that ``synthesize(latent)`` matches ``target``.

    Args:
        synthesize: latents (B, ...) -> volumes (B, 1, X, Y, Z); differentiable. Only the latent is
            optimised: gradients are taken with ``torch.autograd.grad``, so the model's ``.grad`` fields
            are left untouched (no need to freeze it).
        target: (B, 1, X, Y, Z) volumes.
        init_latent: (B, ...) starting latents (copied, never modified).
        steps, lr: Adam iterations and peak learning rate.
        feature_fn, feature_weight: optional feature loss ``feature_weight * ||f(x) - f(target)||^2``.
        rampup, rampdown: learning-rate warm-up / cosine ramp-down fractions (:func:`lr_multiplier`).
        latent_noise: std of Gaussian noise added to the latent, decaying quadratically to 0 at
            ``noise_ramp`` of the run (0 disables); drawn from a generator seeded with ``seed``.
        data_range: PSNR/SSIM peak value; None uses each target's max - min (the batch's for SSIM).
        compute_ssim: report SSIM (MONAI) as well as PSNR.
    """
    _check_inversion(target, init_latent, steps, lr, feature_fn, feature_weight)
    target32 = target.detach().float()
    latent = init_latent.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([latent], lr=lr, betas=(0.9, 0.999))
    noise_gen = torch.Generator(device=latent.device).manual_seed(seed)
    objective = _objective(target32, feature_fn, feature_weight)
    history: dict[str, list[float]] = {"loss": [], "mse": [], "feature": [], "lr": []}

    # Inversion may be called from inference code running under no_grad (e.g. LatentModel.encode).
    with torch.enable_grad():
        for i in range(steps):
            t = i / steps
            step_lr = lr * lr_multiplier(t, rampup, rampdown)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            noise_scale = latent_noise * max(0.0, 1.0 - t / noise_ramp) ** 2 if noise_ramp > 0 else 0.0
            current = latent
            if noise_scale > 0:
                current = latent + noise_scale * torch.randn(
                    latent.shape, generator=noise_gen, device=latent.device
                )
            loss, mse, feat = objective(synthesize(current).float())
            # Summed over the batch: each latent's gradient is that of its own sample's loss.
            (grad,) = torch.autograd.grad(loss.sum(), latent)
            latent.grad = grad
            optimizer.step()
            history["loss"].append(loss.mean().item())
            history["mse"].append(mse.mean().item())
            history["feature"].append(feat.mean().item())
            history["lr"].append(step_lr)

    latent = latent.detach()
    with torch.no_grad():
        recon = synthesize(latent).float()
    return InversionResult(
        latent=latent,
        reconstruction=recon,
        psnr=psnr(recon, target32, data_range),
        ssim=ssim(recon, target32, _ssim_range(target32, data_range)) if compute_ssim else None,
        history=history,
    )
