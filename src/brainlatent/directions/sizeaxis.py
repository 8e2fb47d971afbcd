"""The model's own head-size axis: the latent tangent of an isotropic rescaling of the volumes.

A size-controlled direction is made orthogonal to a latent "head-size axis" (direction.py). Estimated by
regressing the size covariate on the latents (``directions.size_axis: covariate``), that axis is whatever latent
combination predicts head size in *this* cohort, and so it also holds the part of a local effect the latents
code as "a larger brain": projecting it out removes part of the local effect (docs/directions_method.md,
"Size control"). ``scaling_axis`` asks the model instead (``directions.size_axis: scaling``): for each of some
fitting subjects ``x``,

    t(x) = encode(S_s(x)) - encode(S_{1/s}(x))

where ``S_s`` rescales the volume by ``s`` in linear size about the brain's centre of mass (intensity-weighted),
and the axis is the mean of the ``t(x)``, normalised. It is defined without labels or covariates, so no effect in
the cohort (local or global, sex or planted) can move it; only the model's coding of a global size change can.

Choices
  factor ``s = 1.03``  linear, i.e. +-9% in volume: about the cohorts' male-female head-size gap (+-3% linear)
      and 1.3 SD of their head sizes (eTIV SD ~7% in volume on both cohorts of BENCHMARKS.md), so the encoder is
      asked about sizes it was trained on. A larger step extrapolates beyond them; a smaller one leaves the
      change at 7 mm voxels mostly to interpolation.
  central difference  both volumes are resampled, so the interpolation's blur is common to the two and cancels
      (``encode(S_s x) - encode(x)`` would also hold "blurred vs not"), and so does the second-order term.
  centre of mass  rescaling about another point adds a translation, and the tangent would hold it.
  resampling  ``torch.nn.functional.affine_grid`` + ``grid_sample`` (trilinear, zeros outside: the background
      of skull-stripped volumes), the library's resampler, batched on the model's device.
  mean over subjects  the tangents agree closely on the AE (``agreement``, the mean cosine of each subject's
      tangent with the axis, is written into the direction metadata and the metrics); their first principal
      direction would drop the mean's sign and weight nothing differently when they agree.

Cost: ``2 n`` encodings of ``n = directions.size_axis_subjects`` fitting subjects (seeded); one-pass encoders
(AE, VAE) take well under a second (0.05 s measured), inverting families (GAN, StyleGAN) one inversion each:
0.35-0.6 s per volume at the default 40 steps on the CPU, 40 s for the GAN's 64 on a loaded 2-core machine
(BENCHMARKS.md, "Size control against the model's scaling axis").

``global_size_map`` is the image-space twin used by the ground-truth checks (groundtruth.py, "beyond size"):
the group difference map a pure global rescaling produces, as the model renders it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SCALING_FACTOR = 1.03  # linear size; see the module docstring


@dataclass(frozen=True)
class ScalingAxis:
    """The unit latent axis of a global rescaling and how consistent the subjects' tangents are."""

    vector: np.ndarray  # (L,) unit norm; +vector = larger brain
    agreement: float  # mean cosine of each subject's tangent with ``vector`` (1 = all identical)
    n_subjects: int
    factor: float


def rescale(volumes: np.ndarray, factor: float, device: torch.device | str = "cpu") -> np.ndarray:
    """``(N, X, Y, Z)`` volumes rescaled isotropically by ``factor`` (linear; > 1 enlarges) about each volume's
    intensity-weighted centre of mass; trilinear, zeros outside the field of view. Returns float32."""
    vols = np.asarray(volumes, np.float32)
    if vols.ndim != 4:
        raise ValueError(f"volumes: expected (N, X, Y, Z), got shape {vols.shape}")
    if not factor > 0:
        raise ValueError(f"rescale factor must be positive, got {factor!r}")
    x = torch.from_numpy(vols).to(device)[:, None]  # (N, 1, X, Y, Z)
    n, shape = x.shape[0], x.shape[2:]
    # Centre of mass in grid_sample's normalised coordinates (align_corners=True: -1 and 1 are the edge voxels'
    # centres); grid_sample's last coordinate axis indexes X, ... its first indexes Z, hence the flip.
    weights = x[:, 0].clamp_min(0)
    total = weights.sum(dim=(1, 2, 3)).clamp_min(1e-12)
    centre = []
    for axis, size in enumerate(shape):
        coords = torch.linspace(-1.0, 1.0, size, device=x.device) if size > 1 else torch.zeros(1, device=x.device)
        view = [1, 1, 1]
        view[axis] = size
        centre.append((weights * coords.view(1, *view)).sum(dim=(1, 2, 3)) / total)
    centre = torch.stack(centre[::-1], dim=1)  # (N, 3) in (z, y, x) = grid order
    # output(p) = input(c + (p - c) / s): a point at distance d from c samples the input at d / s.
    theta = torch.zeros(n, 3, 4, device=x.device)
    theta[:, :, :3] = torch.eye(3, device=x.device) / factor
    theta[:, :, 3] = centre * (1.0 - 1.0 / factor)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[:, 0].cpu().numpy()


def scaling_axis(encode: Callable[[np.ndarray], np.ndarray], volumes: np.ndarray,
                 factor: float = SCALING_FACTOR, device: torch.device | str = "cpu") -> ScalingAxis:
    """The model's latent axis of a global rescaling (module docstring): ``encode`` maps ``(N, X, Y, Z)`` volumes
    to ``(N, L)`` flat latents (``LatentCodec.encode_volumes``); ``volumes`` are the subjects to average over."""
    if not factor > 1:
        raise ValueError(f"scaling axis: factor must be > 1 (linear size), got {factor!r}")
    vols = np.asarray(volumes, np.float32)
    if vols.ndim != 4 or len(vols) < 1:
        raise ValueError(f"scaling axis: expected (N >= 1, X, Y, Z) volumes, got shape {vols.shape}")
    larger = np.asarray(encode(rescale(vols, factor, device)), np.float64)
    smaller = np.asarray(encode(rescale(vols, 1.0 / factor, device)), np.float64)
    tangents = larger - smaller  # (N, L)
    mean = tangents.mean(axis=0)
    norm = np.linalg.norm(mean)
    if not (np.isfinite(norm) and norm > 0):
        raise ValueError("scaling axis: rescaling the volumes does not change their latents; the model does not "
                         "code size (use directions.size_axis: covariate)")
    vector = mean / norm
    lengths = np.linalg.norm(tangents, axis=1)
    agreement = float(np.mean((tangents @ vector)[lengths > 0] / lengths[lengths > 0]))
    return ScalingAxis(vector=vector, agreement=agreement, n_subjects=len(vols), factor=float(factor))


def global_size_map(encode: Callable[[np.ndarray], np.ndarray], decode: Callable[[np.ndarray], np.ndarray],
                    volumes: np.ndarray, factor: float = SCALING_FACTOR,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """The group difference map of a pure global rescaling, as the model renders it: the mean over ``volumes``
    ``(N, X, Y, Z)`` of ``decode(encode(S_s x)) - decode(encode(S_{1/s} x))`` (``(X, Y, Z)`` float64; + = larger).

    The reference the ground-truth checks take out of a direction's map and of the planted map before
    correlating them (``partial_map_correlation``). Through the model rather than the rescaled volumes
    themselves: a direction's difference map is a difference of decoded volumes, so its global-size component is
    one the model renders (with the decoder's smoothing), and this map is that rendering. Measured (BENCHMARKS.md,
    "Beyond global size, as the stage reports it"): it correlates 0.90 with the rescaled volumes' map, is the
    closer of the two to the raw sex directions' maps but not to the positive controls', and the tissue cohort's
    verdicts change with the choice. Given the subjects (the traversed ones, so the reference shares their
    anatomy) it depends on nothing else: not on labels, probes or ``directions.size_axis``, so raw and
    size-controlled directions, under either axis option, are compared against the same reference. Cost: ``2 N``
    encodings and decodings (inversions for GAN families).
    """
    if not factor > 1:
        raise ValueError(f"global size map: factor must be > 1 (linear size), got {factor!r}")
    vols = np.asarray(volumes, np.float32)
    if vols.ndim != 4 or len(vols) < 1:
        raise ValueError(f"global size map: expected (N >= 1, X, Y, Z) volumes, got shape {vols.shape}")
    larger = np.asarray(decode(encode(rescale(vols, factor, device))), np.float64)
    smaller = np.asarray(decode(encode(rescale(vols, 1.0 / factor, device))), np.float64)
    return (larger - smaller).mean(axis=0)
