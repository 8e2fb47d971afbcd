"""3D DCGAN-style GAN: generator, critic and an EMA generator.

* Generator: z (B, D) -> linear projection to the bottleneck grid (e.g. 4x5x4 for 32x40x32, from
  :func:`layers.stage_shapes`) -> nearest-upsample + conv blocks -> sigmoid volume in [0, 1].
* Discriminator (critic): strided conv blocks -> one unbounded score per volume. No BatchNorm: gradient
  penalties are per-sample, so only per-sample normalisation (LayerNorm by default, GroupNorm) or none.
* Losses (WGAN-GP, non-saturating + R1) and the EMA update are shared with StyleGAN: ``adversarial.py``.
* ``decode`` / ``sample`` / ``synthesize`` use the EMA generator (Karras et al., 2018; Yazici et al., 2019).
* ``template=True``: the generator predicts a deviation, in logit space, from the mean training volume
  (:class:`TemplateGenerator`; the dense autoencoders do the same in voxel space). Training then starts from
  an average brain instead of noise, and every step is spent on how brains differ: the DCGAN trained 12
  epochs on ~100 volumes draws white blobs without it (BENCHMARKS.md, "Adversarial families: what buys brains").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from brainlatent.models.adversarial import MinibatchStd, template_logit, update_ema
from brainlatent.models.base import LatentModel, constructor_config, register_family
from brainlatent.models.layers import Decoder3d, Encoder3d, Norm, as_shape3


class TemplateGenerator(nn.Module):
    """``sigmoid(logit(template) + decoder(z))``: a generator whose zero output is the mean training volume.

    ``template_logit`` is a buffer (set by :meth:`set_template` from the training split before the first
    step, restored with the checkpoint, copied into the EMA generator); zeros until set, i.e. a plain
    sigmoid generator.
    """

    def __init__(self, decoder: nn.Module, volume_shape: tuple[int, int, int]):
        super().__init__()
        self.decoder = decoder
        self.register_buffer("template_logit", torch.zeros(1, 1, *volume_shape))

    @torch.no_grad()
    def set_template(self, volumes: torch.Tensor) -> None:
        """The voxel-wise mean of ``volumes`` (N, 1, X, Y, Z) as a logit (:func:`adversarial.template_logit`)."""
        logit = template_logit(volumes.float().mean(0, keepdim=True))
        self.template_logit.copy_(logit.to(self.template_logit.device))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z)
        return torch.sigmoid(out + self.template_logit.to(out.dtype))


def critic(volume_shape, base_channels: int, max_channels: int, min_bottleneck: int, norm: Norm,
           mbstd_group_size: int) -> Encoder3d:
    """The DCGAN critic: :class:`Encoder3d` with one score per volume; with ``mbstd_group_size > 0`` a
    minibatch-std feature map (ProGAN) joins the bottleneck before the score, so the critic sees how much
    the batch varies (a generator drawing one brain for every z is told apart from the reals)."""
    enc = Encoder3d(volume_shape, 1, base_channels, max_channels, min_bottleneck, norm)
    if mbstd_group_size > 0:
        flatten, linear = enc.head
        voxels = math.prod(enc.shapes[-1])  # the bottleneck grid; one more feature map on it
        enc.head = nn.Sequential(MinibatchStd(mbstd_group_size), flatten, nn.Linear(linear.in_features + voxels, 1))
    return enc


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
        d_mbstd_group_size: minibatch-std group of the critic (:func:`critic`); 0: none (models saved before the
            option existed).
        template: the generator predicts the deviation from the mean training volume (:class:`TemplateGenerator`;
            call :meth:`set_template` before training). False: a plain sigmoid generator (models saved
            before the option existed).
    """

    family = "gan"
    generative = True
    inverts = True

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
        d_mbstd_group_size: int = 0,
        template: bool = False,
    ):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim: expected a positive integer, got {latent_dim}")
        self.latent_dim = int(latent_dim)
        self.volume_shape = as_shape3(volume_shape)
        if template:
            decoder = Decoder3d(
                self.volume_shape, self.latent_dim, g_base_channels, g_max_channels, min_bottleneck, g_norm, "none"
            )
            self.generator: nn.Module = TemplateGenerator(decoder, self.volume_shape)
        else:
            self.generator = Decoder3d(
                self.volume_shape, self.latent_dim, g_base_channels, g_max_channels, min_bottleneck, g_norm, "sigmoid"
            )
        self.discriminator = critic(
            self.volume_shape, d_base_channels, d_max_channels, min_bottleneck, d_norm, int(d_mbstd_group_size)
        )
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        self._config = constructor_config(self, locals())

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    @torch.no_grad()
    def set_template(self, volumes: torch.Tensor) -> None:
        """Start both generators from the mean of ``volumes`` (the training split); a no-op without a template."""
        if isinstance(self.generator, TemplateGenerator):
            self.generator.set_template(volumes)
            self.generator_ema.set_template(volumes)

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

    def encode(self, x: torch.Tensor, *, space: str | None = None, **inversion_kwargs: Any) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, latent_dim) by optimising z so that synthesize(z) matches x (``space`` None or
        "z").

        Delegates to :func:`brainlatent.inversion.invert` from :meth:`latent_init` (imported here: the
        GAN trains and samples without it); ``inversion_kwargs`` (``steps``, ``lr``, ...) are passed through.
        """
        self.check_encode_options(space, inversion_kwargs)
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
