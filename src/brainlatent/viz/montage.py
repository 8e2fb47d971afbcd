"""Tri-planar montages of processed volumes (nilearn ``plot_anat``) and a float32 NIfTI writer.

Volumes follow the data contract (:mod:`brainlatent.viz.images`): array axes (X, Y, Z) in RAS order on the
processed grid. Each row is one volume drawn by nilearn in world coordinates: sagittal, coronal and axial cuts
with their ``x=`` / ``y=`` / ``z=`` positions in mm and L/R letters (neurological convention: the subject's
left on the left), as neuroimagers read them in nilearn and FSLeyes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from nilearn import plotting

from brainlatent.viz.images import as_image, resolve_affine, slice_center, to_numpy, world_mm


def _stack(volumes: Any) -> np.ndarray:
    vols = to_numpy(volumes)
    if vols.ndim == 3:
        vols = vols[None]
    if vols.ndim == 5 and vols.shape[1] == 1:
        vols = vols[:, 0]
    if vols.ndim != 4:
        raise ValueError(f"volumes must be (N, X, Y, Z) or (N, 1, X, Y, Z), got shape {vols.shape}")
    return vols


def triplanar_montage(
    volumes: Any,
    titles: Sequence[str] | None = None,
    path: str | Path | None = None,
    *,
    slices: tuple[int, int, int] | None = None,
    voxel_mm: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "gray",
    panel_inches: float = 1.8,
    dpi: int = 100,
) -> Figure:
    """One row per volume: nilearn's ortho view (sagittal, coronal, axial) through ``slices`` (voxel indices,
    default the centre), in world mm.

    Args:
        volumes: (N, X, Y, Z) or (N, 1, X, Y, Z) array or tensor (a single (X, Y, Z) volume is one row).
        titles: one label per row, drawn on the row.
        path: when given, the figure is also saved there (PNG, folders created).
        affine: the grid's voxel -> RAS mm matrix (``Grid.affine``): coordinates as in the NIfTI files.
        voxel_mm: used only without ``affine``: coordinates are then mm from the volume's centre.
    """
    vols = _stack(volumes)
    n = vols.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} volumes")
    affine = resolve_affine(vols.shape[1:], affine, voxel_mm)
    cut = world_mm(slice_center(vols[0], "middle" if slices is None else slices), affine)

    fig = Figure(figsize=(3 * panel_inches, n * panel_inches), dpi=dpi, facecolor="black")
    FigureCanvasAgg(fig)
    for row in range(n):
        # Each row gets its own strip of the figure; nilearn lays its three cuts out inside it.
        rect = (0.0, 1.0 - (row + 1) / n, 1.0, 1.0 / n)
        plotting.plot_anat(as_image(vols[row], affine), figure=fig, axes=rect, display_mode="ortho",
                           cut_coords=cut, title=None if titles is None else titles[row], annotate=True,
                           draw_cross=False, black_bg=True, dim=0, cmap=cmap, vmin=vmin, vmax=vmax,
                           colorbar=False)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, facecolor=fig.get_facecolor())
    return fig


def save_nifti(volume: Any, affine: np.ndarray, path: str | Path) -> Path:
    """Write an (X, Y, Z) volume (array or tensor; a leading singleton channel is dropped) as float32 NIfTI.

    ``affine`` is the voxel -> RAS mm matrix, normally ``Grid.affine``; it is stored as both qform and sform
    (code "aligned"). Returns the path written.
    """
    try:
        img = as_image(volume, affine)
    except ValueError as err:
        raise ValueError(f"save_nifti {path}: {err}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path
