"""Decode latents moved along a direction, and the voxel-wise group difference between two steps.

``decode`` is any callable ``Tensor (B, L) float32 -> Tensor (B, 1, X, Y, Z)`` (an autoencoder's decoder,
a GAN's generator / synthesis network in W): this module never asks which model family it holds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from scipy.stats import ttest_rel

from ..grid import Grid
from .direction import Direction

Decode = Callable[[torch.Tensor], torch.Tensor]


def symmetric_steps(max_sd: float = 3.0, n_steps: int = 7) -> np.ndarray:
    """``(n_steps,)`` evenly spaced steps from ``-max_sd`` to ``+max_sd`` (odd ``n_steps`` includes 0)."""
    if not max_sd > 0 or n_steps < 2:
        raise ValueError(f"symmetric_steps: need max_sd > 0 and n_steps >= 2, got {max_sd!r}, {n_steps!r}")
    return np.linspace(-max_sd, max_sd, n_steps)


@torch.inference_mode()
def decode_batched(
    codes: np.ndarray, decode: Decode, batch_size: int = 8, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Decode latent codes ``(N, L)`` in batches -> volumes ``(N, X, Y, Z)`` float32 on the CPU."""
    codes = np.asarray(codes, np.float32)
    if codes.ndim != 2:
        raise ValueError(f"latent codes: expected (N, L), got {codes.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out: list[np.ndarray] = []
    for start in range(0, len(codes), batch_size):
        batch = torch.from_numpy(codes[start : start + batch_size]).to(device)
        vol = decode(batch)
        if vol.ndim != 5 or vol.shape[0] != len(batch) or vol.shape[1] != 1:
            raise ValueError(f"decode must return (B, 1, X, Y, Z) for B={len(batch)}, got {tuple(vol.shape)}")
        out.append(vol[:, 0].float().cpu().numpy())
    return np.concatenate(out)


def traverse(
    latents: np.ndarray,
    direction: Direction,
    steps: np.ndarray,
    decode: Decode,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Move each subject's latent along ``direction`` and decode.

    latents ``(S, L)``; steps ``(K,)`` in SDs of the direction's projection -> volumes ``(S, K, X, Y, Z)``
    where ``[s, k]`` decodes ``latents[s] + steps[k] * direction.step_sd * direction.vector``.
    """
    latents = direction.check_latents(latents)
    codes = latents[:, None, :] + direction.offsets(steps)[None, :, :]  # (S, K, L)
    s, k, dim = codes.shape
    volumes = decode_batched(codes.reshape(s * k, dim), decode, batch_size=batch_size, device=device)
    return volumes.reshape(s, k, *volumes.shape[1:])


@dataclass(frozen=True)
class DifferenceMap:
    """Voxel-wise paired comparison of two traversal steps across subjects (arrays ``(X, Y, Z)``)."""

    mean_difference: np.ndarray  # mean over subjects of volume[hi] - volume[lo]
    t_statistic: np.ndarray  # paired t (hi vs lo); 0 where the difference is the same in every subject
    n_subjects: int
    step_lo: int
    step_hi: int

    def to_nifti(self, grid: Grid) -> dict[str, nib.Nifti1Image]:
        """``{"mean_difference": img, "t_statistic": img}`` on the reference grid (float32, RAS)."""
        if tuple(self.mean_difference.shape) != tuple(grid.shape):
            raise ValueError(f"difference map shape {self.mean_difference.shape} does not match grid {grid.shape}")
        return {
            name: nib.Nifti1Image(np.asarray(arr, np.float32), grid.affine)
            for name, arr in (("mean_difference", self.mean_difference), ("t_statistic", self.t_statistic))
        }


def group_difference_map(traversals: np.ndarray, step_lo: int = 0, step_hi: int = -1) -> DifferenceMap:
    """Mean difference and paired t-statistic between steps ``step_hi`` and ``step_lo`` (indices).

    traversals ``(S, K, X, Y, Z)`` from :func:`traverse`, ``S >= 2`` subjects. Positive values: more
    intensity at ``step_hi`` (by default the positive end of the direction: male / older).
    """
    traversals = np.asarray(traversals)
    if traversals.ndim != 5:
        raise ValueError(f"traversals: expected (S, K, X, Y, Z), got shape {traversals.shape}")
    n_subj, n_steps = traversals.shape[:2]
    if n_subj < 2:
        raise ValueError(f"group_difference_map needs >= 2 subjects for a paired t-test, got {n_subj}")
    lo, hi = (i % n_steps if -n_steps <= i < n_steps else None for i in (step_lo, step_hi))
    if lo is None or hi is None or lo == hi:
        raise ValueError(f"step indices ({step_lo}, {step_hi}) must be two different indices into {n_steps} steps")
    a_hi = traversals[:, hi].astype(np.float64)
    a_lo = traversals[:, lo].astype(np.float64)
    diff = a_hi - a_lo
    # A difference that is (numerically) identical in every subject (background; any linear decoder) has
    # no spread: t is undefined there and written as 0, which keeps the map finite for NIfTI viewers.
    undefined = diff.std(0, ddof=1) <= 1e-6 * max(float(np.abs(diff).max()), 1e-12)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's precision warning for those voxels
        t = ttest_rel(a_hi, a_lo, axis=0).statistic
    t = np.where(undefined, 0.0, np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0))
    return DifferenceMap(diff.mean(0), t, n_subj, lo, hi)
