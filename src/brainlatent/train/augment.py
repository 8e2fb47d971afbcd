"""Differentiable augmentation for the discriminator of a small-data GAN, in 3D (Zhao et al., 2020,
"Differentiable Augmentation for Data-Efficient GAN Training"; Karras et al., 2020, ADA).

With ~100 training volumes a discriminator memorises the reals and its gradients stop telling the generator
anything useful. Showing it *augmented* reals and *equally augmented* fakes (the same transforms, drawn
afresh per sample, differentiable so the generator's gradient passes through) removes that shortcut without
teaching the generator the augmentations: they are applied to both sides, never to what the generator is
asked to produce.

Transforms (``policy`` is a comma-separated subset, applied in this order):

* ``gain`` - multiply each volume by ``exp(U(-0.2, 0.2))``: a global intensity scale, as between scanners.
  Multiplicative so the background stays 0 (DiffAugment's additive brightness would light it up).
* ``translation`` - shift each volume by a whole number of voxels, up to 1/8 of each axis, filling with 0.
* ``cutout`` - zero one box of half of each axis at a random centre per volume.

No flips: left/right asymmetries are part of brain anatomy, and a flipped real is not a real.
Randomness comes from torch's global generator, which the training loop seeds per step
(``distributed.rank_rng``), so a run is reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("gain", "translation", "cutout")
GAIN_LOG_RANGE = 0.2
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def parse_policy(policy: str) -> tuple[str, ...]:
    """``"gain,translation"`` -> ("gain", "translation"); "" or "none" -> (); ValueError for unknown names."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip() and p.strip() != "none")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"augment: unknown transform(s) {unknown}; expected a comma-separated subset of {POLICIES}")
    return names


def gain(x: torch.Tensor) -> torch.Tensor:
    log_gain = (torch.rand(x.shape[0], device=x.device) * 2 - 1) * GAIN_LOG_RANGE
    return x * log_gain.exp().to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def translation(x: torch.Tensor) -> torch.Tensor:
    """Each volume shifted by its own integer offsets in [-s, s] per axis (s = 1/8 of the axis), zeros in."""
    sizes = x.shape[2:]
    shifts = [max(int(n * TRANSLATION_RATIO + 0.5), 0) for n in sizes]
    if not any(shifts):
        return x
    padded = F.pad(x, [p for s in reversed(shifts) for p in (s, s)])
    offsets = [torch.randint(0, 2 * s + 1, (x.shape[0],)).tolist() for s in shifts]
    # One slice per volume: a gather would build index tensors the size of the batch; batches are small.
    return torch.stack([
        padded[i, :, ox : ox + sizes[0], oy : oy + sizes[1], oz : oz + sizes[2]]
        for i, (ox, oy, oz) in enumerate(zip(*offsets))
    ])


def cutout(x: torch.Tensor) -> torch.Tensor:
    """Each volume with one box of half of every axis set to 0, centred anywhere (the box may leave the volume)."""
    b, sizes = x.shape[0], x.shape[2:]
    keep = torch.ones(b, 1, *sizes, dtype=x.dtype, device=x.device)
    for i in range(b):
        box = []
        for n in sizes:
            half = max(int(n * CUTOUT_RATIO / 2), 1)
            centre = int(torch.randint(0, n, ()))
            box.append(slice(max(centre - half, 0), min(centre + half, n)))
        keep[(i, slice(None), *box)] = 0
    return x * keep


_TRANSFORMS = {"gain": gain, "translation": translation, "cutout": cutout}


def augment(x: torch.Tensor, policy: tuple[str, ...]) -> torch.Tensor:
    """``x`` (B, C, X, Y, Z) through the transforms of ``policy`` (see :func:`parse_policy`), each drawn per volume."""
    for name in policy:
        x = _TRANSFORMS[name](x)
    return x


__all__ = ["POLICIES", "augment", "parse_policy"]
