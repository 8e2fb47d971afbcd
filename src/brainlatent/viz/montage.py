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

    fig = _black_figure(3 * panel_inches, n * panel_inches, dpi)
    for row in range(n):
        # Each row gets its own strip of the figure; nilearn lays its three cuts out inside it.
        draw_anat(fig, (0.0, 1.0 - (row + 1) / n, 1.0, 1.0 / n), as_image(vols[row], affine), cut,
                  None if titles is None else titles[row], cmap=cmap, vmin=vmin, vmax=vmax)
    return _saved(fig, path)


def comparison_montage(
    groups: Sequence[tuple[str, Sequence[nib.Nifti1Image]]],
    path: str | Path | None = None,
    *,
    vmin: float = 0.0,
    vmax: float = 1.0,
    panel_inches: float = 1.3,
    dpi: int = 100,
) -> Figure:
    """Groups of NIfTI images side by side (e.g. real scans, then each family's samples): a column of nilearn
    ortho views per group, titled, every image cut at the same world position (the first image's centre)."""
    groups = [(title, list(images)) for title, images in groups if len(images)]
    if not groups:
        raise ValueError("comparison_montage: no images to draw")
    first = groups[0][1][0]
    cut = world_mm(slice_center(np.empty(first.shape[:3]), "middle"), first.affine)
    n_rows = max(len(images) for _, images in groups)
    fig = _black_figure(3 * panel_inches * len(groups), n_rows * panel_inches + 0.3, dpi)
    top = 0.3 / (n_rows * panel_inches + 0.3)
    width, height = 1.0 / len(groups), (1.0 - top) / n_rows
    for g, (title, images) in enumerate(groups):
        fig.text((g + 0.5) * width, 1.0 - top / 2, title, color="white", ha="center", va="center", fontsize=8)
        for r, img in enumerate(images):
            draw_anat(fig, (g * width, 1.0 - top - (r + 1) * height, width, height), img, cut, vmin=vmin, vmax=vmax)
    return _saved(fig, path)


def _black_figure(width: float, height: float, dpi: int) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi, facecolor="black")
    FigureCanvasAgg(fig)
    return fig


def draw_anat(fig: Figure, rect, img: nib.Nifti1Image, cut: Sequence[float], title: str | None = None, *,
              display_mode: str = "ortho", cmap: str = "gray", vmin: float = 0.0, vmax: float = 1.0) -> None:
    """nilearn's anatomical view of ``img`` inside ``rect`` of ``fig`` (None: the whole figure): cuts through
    ``cut`` (world mm; one value per cut of ``display_mode``, e.g. three for "ortho", one for "x"), coordinates
    and L/R annotated, the fixed grey scale ``[vmin, vmax]`` on black. Every anatomical panel is drawn here."""
    plotting.plot_anat(img, figure=fig, axes=rect, display_mode=display_mode, cut_coords=list(cut), title=title,
                       annotate=True, draw_cross=False, black_bg=True, dim=0, cmap=cmap, vmin=vmin, vmax=vmax,
                       colorbar=False)


def _saved(fig: Figure, path: str | Path | None) -> Figure:
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
