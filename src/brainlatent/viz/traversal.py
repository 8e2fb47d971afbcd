"""Figures of latent traversals and their maps: per-subject strips, back-and-forth GIFs, difference (or t) maps
as thresholded stat maps and glass-brain views, all drawn by nilearn in world coordinates.

Volumes are ``(X, Y, Z)`` arrays in RAS voxel order on the processed grid; pass ``affine=grid.affine`` so the
cut positions (``x=``, ``y=``, ``z=``, mm) are the NIfTI files' own. Without it ``voxel_mm`` gives the scale
and the coordinates are mm from the volume's centre (:func:`brainlatent.viz.images.centred_affine`).
Figures use matplotlib's object API on the Agg canvas (no pyplot global state, safe in workers and headless CI).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from nilearn import plotting

from brainlatent.viz.images import as_image, resolve_affine, slice_center, world_mm
from brainlatent.viz.montage import draw_anat

# nilearn's one-cut display modes, in the order of the strip's rows.
VIEWS: tuple[tuple[str, str], ...] = (("sagittal", "x"), ("coronal", "y"), ("axial", "z"))
# Below this fraction of the colour range a stat map is left transparent, so anatomy shows through.
DEFAULT_THRESHOLD_FRACTION = 0.05


def _check_volume(volume: np.ndarray, what: str) -> np.ndarray:
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3:
        raise ValueError(f"{what}: expected an (X, Y, Z) volume, got shape {volume.shape}")
    return volume


def _check_traversal(traversal: np.ndarray, min_steps: int = 1) -> np.ndarray:
    traversal = np.asarray(traversal, np.float32)
    if traversal.ndim != 4 or traversal.shape[0] < min_steps:
        raise ValueError(f"traversal: expected (K >= {min_steps}, X, Y, Z), got shape {traversal.shape}")
    return traversal


def _intensity_limits(volumes: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(volumes, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def _figure(width: float, height: float, dpi: int = 100, facecolor: str = "black") -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi, facecolor=facecolor)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, facecolor=fig.get_facecolor())
    return path


def _step_labels(steps: Sequence[float], n: int) -> list[str]:
    steps = np.asarray(steps, float)
    if steps.shape != (n,):
        raise ValueError(f"steps: expected {n} values (one per traversal step), got shape {steps.shape}")
    return [f"{s:+.1f} SD" for s in steps]


def save_traversal_strip(
    traversal: np.ndarray,
    steps: Sequence[float],
    path: str | Path,
    *,
    title: str = "",
    voxel_mm: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    center: str | Sequence[int] = "middle",
) -> Path:
    """PNG: one subject's traversal ``(K, X, Y, Z)``; a row per view (sagittal, coronal, axial, each cut at
    the same world position), a column per step, one grey scale for all."""
    traversal = _check_traversal(traversal)
    k = traversal.shape[0]
    labels = _step_labels(steps, k)
    affine = resolve_affine(traversal.shape[1:], affine, voxel_mm)
    vmin, vmax = _intensity_limits(traversal)
    cut = world_mm(slice_center(traversal[k // 2], center), affine)
    top = 0.3 if title else 0.0
    fig = _figure(1.4 * k, 4.2 + top)
    height = (1.0 - top / (4.2 + top)) / 3
    for j, volume in enumerate(traversal):
        img = as_image(volume, affine)
        for i, (_, mode) in enumerate(VIEWS):
            rect = (j / k, 1.0 - top / (4.2 + top) - (i + 1) * height, 1.0 / k, height)
            draw_anat(fig, rect, img, [cut[i]], labels[j] if i == 0 else None, display_mode=mode, vmin=vmin,
                      vmax=vmax)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    return _save(fig, path)


def _render_frame(img, cut, label: str, vmin: float, vmax: float) -> np.ndarray:
    fig = _figure(6.0, 2.4, dpi=80)
    draw_anat(fig, None, img, cut, label, vmin=vmin, vmax=vmax)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_traversal_gif(
    traversal: np.ndarray,
    steps: Sequence[float],
    path: str | Path,
    *,
    title: str = "",
    fps: float = 4.0,
    voxel_mm: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    center: str | Sequence[int] = "middle",
) -> Path:
    """Animated GIF of a traversal ``(K, X, Y, Z)``: nilearn ortho frames, forwards then back, looping forever.

    nilearn has no animation; we only stack its frames (imageio) and play them back and forth.
    """
    traversal = _check_traversal(traversal, min_steps=2)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    k = traversal.shape[0]
    labels = _step_labels(steps, k)
    affine = resolve_affine(traversal.shape[1:], affine, voxel_mm)
    vmin, vmax = _intensity_limits(traversal)
    cut = world_mm(slice_center(traversal[k // 2], center), affine)
    frames = [_render_frame(as_image(v, affine), cut, f"{title}  {lab}".strip(), vmin, vmax)
              for v, lab in zip(traversal, labels)]
    order = list(range(k)) + list(range(k - 2, 0, -1))  # ping-pong without repeating the end frames
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.stack([frames[i] for i in order]), duration=1000.0 / fps, loop=0)
    return path


def map_limits(stat: np.ndarray, vmax: float | None, threshold: float | None) -> tuple[float, float]:
    """``(vmax, threshold)`` of a diverging map: ``vmax`` defaults to the 99.9th percentile of the non-zero
    ``|stat|`` (robust to single-voxel outliers; zeros left out so a sparse map keeps its scale), ``threshold``
    to :data:`DEFAULT_THRESHOLD_FRACTION` of it."""
    if vmax is None:
        magnitude = np.abs(stat[np.isfinite(stat)])
        magnitude = magnitude[magnitude > 0]
        vmax = float(np.percentile(magnitude, 99.9)) if magnitude.size else 0.0
    vmax = max(float(vmax), 1e-12)
    threshold = DEFAULT_THRESHOLD_FRACTION * vmax if threshold is None else float(threshold)
    if not 0 <= threshold < vmax:
        raise ValueError(f"threshold {threshold!r} must lie in [0, vmax={vmax:.4g})")
    return vmax, threshold


@dataclass(frozen=True)
class SignedMap:
    """A signed map (difference, t) ready for nilearn: its image, the affine used and its colour limits."""

    image: nib.Nifti1Image
    affine: np.ndarray
    vmax: float
    threshold: float


def signed_map(stat: np.ndarray, what: str, *, affine: np.ndarray | None, voxel_mm: Sequence[float] | None,
               vmax: float | None, threshold: float | None) -> SignedMap:
    """``stat`` (X, Y, Z) checked, placed by ``affine`` (else ``voxel_mm``), limits from :func:`map_limits`."""
    stat = _check_volume(stat, what)
    affine = resolve_affine(stat.shape, affine, voxel_mm)
    vmax, threshold = map_limits(stat, vmax, threshold)
    return SignedMap(as_image(stat, affine), affine, vmax, threshold)


def _background(background: np.ndarray | None, shape: tuple[int, ...], affine: np.ndarray):
    if background is None:
        return None
    background = _check_volume(background, "background")
    if background.shape != shape:
        raise ValueError(f"background {background.shape} does not match the difference map {shape}")
    return as_image(background, affine)


def save_difference_map(
    difference: np.ndarray,
    path: str | Path,
    *,
    background: np.ndarray | None = None,
    title: str = "",
    label: str = "intensity difference",
    vmax: float | None = None,
    threshold: float | None = None,
    voxel_mm: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    center: str | Sequence[int] = "peak",
) -> Path:
    """PNG: a difference (or t) map as nilearn's thresholded stat map over ``background`` (e.g. the mean
    volume; none: the map alone), ortho cuts through ``center`` (default its peak ``|value|``), symmetric
    colour bar ``[-vmax, vmax]`` labelled ``label``; ``|value| < threshold`` is transparent (:func:`map_limits`)."""
    m = signed_map(difference, "difference map", affine=affine, voxel_mm=voxel_mm, vmax=vmax, threshold=threshold)
    bg = _background(background, m.image.shape, m.affine)
    cut = world_mm(slice_center(np.asarray(difference, np.float32), center), m.affine)
    fig = _figure(9.0, 3.4)
    display = plotting.plot_stat_map(
        m.image, bg_img=bg, figure=fig, display_mode="ortho",
        cut_coords=cut, threshold=m.threshold, vmax=m.vmax, symmetric_cbar=True, cmap="RdBu_r", colorbar=True,
        title=title or None, annotate=True, draw_cross=False, black_bg=True, dim=0,
        resampling_interpolation="nearest",  # coarse grids: show the voxels the statistic was computed on
    )
    _label_colorbar(display, label)
    return _save(fig, path)


def save_glass_brain(m: SignedMap, path: str | Path, *, title: str = "", label: str = "intensity difference"
                     ) -> Path:
    """PNG: a signed map (:func:`signed_map`) as nilearn's glass brain (left, front, right and top projections),
    symmetric colour bar, ``|value| < threshold`` hidden. The outline is MNI152's: meaningful for grids in
    MNI-like space (the synthetic cohorts, HCP's MNINonLinear images), only indicative for native-space (T1w)
    grids."""
    fig = _figure(9.0, 2.8, facecolor="white")
    display = plotting.plot_glass_brain(
        m.image, figure=fig, display_mode="lzry", threshold=m.threshold, vmax=m.vmax, vmin=-m.vmax,
        plot_abs=False, symmetric_cbar=True, cmap="RdBu_r", colorbar=True, title=title or None, annotate=True,
        black_bg=False, resampling_interpolation="nearest",
    )
    _label_colorbar(display, label)
    return _save(fig, path)


def _label_colorbar(display, label: str) -> None:
    """nilearn draws the colour bar but takes no label for it: name what the colours measure, under it (beside
    it the tick labels and the last cut leave no room)."""
    cbar_ax = getattr(display, "_colorbar_ax", None)
    if cbar_ax is None or not label:
        return
    colour = cbar_ax.get_yticklabels()[0].get_color() if cbar_ax.get_yticklabels() else "black"
    cbar_ax.figure.text(0.995, 0.003, f"colour: {label}", ha="right", va="bottom", color=colour, fontsize=7)
