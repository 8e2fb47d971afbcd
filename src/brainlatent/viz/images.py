"""Arrays -> NIfTI images in world coordinates, and where figures cut them: what every nilearn figure needs.

Volumes follow the data contract: array axes (X, Y, Z) = (left->right, posterior->anterior,
inferior->superior) on the processed grid, whose ``Grid.affine`` maps voxels to RAS millimetres. nilearn
draws an image in those world coordinates (``x=``, ``y=``, ``z=`` labels, L/R letters), so a figure is only
as right as the affine it is given: pass ``affine=grid.affine``. Callers that only know the voxel size get
:func:`centred_affine` (same voxel size, origin at the volume's centre): the orientation and mm scale stay
right, the coordinates are then relative to the centre of the box rather than the scanner/MNI origin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array or a (possibly CUDA, grad-tracking) torch tensor, as float32."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def centred_affine(shape: Sequence[int], voxel_mm: Sequence[float] | None = None) -> np.ndarray:
    """A RAS diagonal affine of ``voxel_mm`` (default 1 mm) whose world origin is the volume's centre."""
    voxel = np.ones(3) if voxel_mm is None else np.asarray(voxel_mm, float)
    if voxel.shape != (3,) or not np.all(voxel > 0):
        raise ValueError(f"voxel_mm must be three positive sizes, got {voxel_mm!r}")
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = -voxel * (np.asarray(shape[:3], float) - 1) / 2.0
    return affine


def resolve_affine(shape: Sequence[int], affine: np.ndarray | None, voxel_mm: Sequence[float] | None) -> np.ndarray:
    """``affine`` when given (checked), else :func:`centred_affine` of ``voxel_mm``."""
    if affine is None:
        return centred_affine(shape, voxel_mm)
    affine = np.asarray(affine, float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"affine must be an invertible 4x4 voxel -> mm matrix, got {affine.tolist()}")
    return affine


def as_image(volume: Any, affine: np.ndarray) -> nib.Nifti1Image:
    """An (X, Y, Z) volume (array or tensor; a leading singleton channel is dropped) as a float32 NIfTI image
    with both qform and sform set ("aligned"), so FSLeyes, ITK-SNAP and nilearn place it identically."""
    data = to_numpy(volume)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) volume, got shape {data.shape}")
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=float))
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code="aligned")
    img.set_sform(img.affine, code="aligned")
    return img


def slice_center(volume: np.ndarray, mode: str | Sequence[int] = "middle") -> tuple[int, int, int]:
    """Voxel the three slices pass through: ``"middle"``, ``"peak"`` (largest ``|value|``) or explicit."""
    if isinstance(mode, str):
        if mode == "middle":
            return tuple(int(s // 2) for s in volume.shape)
        if mode == "peak":
            return tuple(int(i) for i in np.unravel_index(np.argmax(np.abs(volume)), volume.shape))
        raise ValueError(f"slice centre {mode!r}: expected 'middle', 'peak' or three voxel indices")
    center = tuple(int(i) for i in mode)
    if len(center) != 3 or not all(0 <= c < s for c, s in zip(center, volume.shape)):
        raise ValueError(f"slice centre {center}: expected three indices inside {volume.shape}")
    return center


def world_mm(voxel: Sequence[int], affine: np.ndarray) -> tuple[float, float, float]:
    """World (RAS mm) position of a voxel index: what nilearn's ``cut_coords`` take."""
    if len(voxel) != 3:
        raise ValueError(f"expected three voxel indices, got {voxel!r}")
    x, y, z, _ = np.asarray(affine, float) @ np.array([*voxel, 1.0])
    return float(x), float(y), float(z)
