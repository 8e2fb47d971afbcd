"""Tri-planar montages of RAS volumes and a float32 NIfTI writer.

Volumes follow the data contract: array axes (X, Y, Z) = (left->right, posterior->anterior,
inferior->superior). Slices are drawn with ``origin="lower"`` after a transpose, so every panel reads the
same way whatever the radiological/neurological habit: axial (anterior up, right on the right), coronal
(superior up, right on the right), sagittal (superior up, anterior on the right). Small letters on the first
row name the right and top edges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

# (plane name, axis sliced, (horizontal axis, vertical axis), (right-edge, top-edge) labels)
_PLANES = (
    ("axial", 2, (0, 1), ("R", "A")),
    ("coronal", 1, (0, 2), ("R", "S")),
    ("sagittal", 0, (1, 2), ("A", "S")),
)


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array or a (possibly CUDA, grad-tracking) torch tensor, as float32."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def triplanar_montage(
    volumes: Any,
    titles: Sequence[str] | None = None,
    path: str | Path | None = None,
    *,
    slices: tuple[int, int, int] | None = None,
    voxel_mm: Sequence[float] | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "gray",
    panel_inches: float = 1.8,
    dpi: int = 100,
) -> Figure:
    """One row per volume, columns axial / coronal / sagittal through ``slices`` (default: the centre).

    Args:
        volumes: (N, X, Y, Z) or (N, 1, X, Y, Z) array or tensor (a single (X, Y, Z) volume is one row).
        titles: one label per row, drawn left of the row.
        path: when given, the figure is also saved there (PNG, folders created).
        voxel_mm: (3,) voxel size so anisotropic grids keep their physical aspect ratio.
    """
    vols = _to_numpy(volumes)
    if vols.ndim == 3:
        vols = vols[None]
    if vols.ndim == 5 and vols.shape[1] == 1:
        vols = vols[:, 0]
    if vols.ndim != 4:
        raise ValueError(f"volumes must be (N, X, Y, Z) or (N, 1, X, Y, Z), got shape {vols.shape}")
    n = vols.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"got {len(titles)} titles for {n} volumes")
    centre = tuple(s // 2 for s in vols.shape[1:]) if slices is None else tuple(slices)
    voxel = np.ones(3) if voxel_mm is None else np.asarray(voxel_mm, dtype=float)

    fig = Figure(figsize=(3 * panel_inches, max(n, 1) * panel_inches + 0.3), dpi=dpi, facecolor="black")
    axes = fig.subplots(max(n, 1), 3, squeeze=False)
    for row in range(n):
        for col, (plane, axis, (h, v), (right, top)) in enumerate(_PLANES):
            ax = axes[row, col]
            image = np.take(vols[row], centre[axis], axis=axis).T  # (vertical, horizontal)
            ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect=voxel[v] / voxel[h],
                      interpolation="nearest")  # fmt: skip
            ax.set_facecolor("black")  # no white hairline where the image rounds short of the axes box
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if row == 0:
                ax.set_title(plane, color="white", fontsize=9)
                ax.text(0.98, 0.5, right, transform=ax.transAxes, color="yellow", fontsize=7, ha="right")
                ax.text(0.5, 0.97, top, transform=ax.transAxes, color="yellow", fontsize=7, va="top")
            if col == 0 and titles is not None:
                ax.set_ylabel(titles[row], color="white", fontsize=7)
    fig.tight_layout(pad=0.3)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, facecolor=fig.get_facecolor())
    return fig


def save_nifti(volume: Any, affine: np.ndarray, path: str | Path) -> Path:
    """Write an (X, Y, Z) volume (array or tensor; a leading singleton channel is dropped) as float32 NIfTI.

    ``affine`` is the voxel -> RAS mm matrix, normally ``Grid.affine``. Returns the path written.
    """
    data = _to_numpy(volume)
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 3:
        raise ValueError(f"save_nifti expects an (X, Y, Z) volume, got shape {data.shape}")
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=float))
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code="aligned")
    img.set_sform(img.affine, code="aligned")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path
