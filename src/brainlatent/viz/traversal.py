"""Figures of latent traversals: per-subject strips, back-and-forth GIFs and difference maps.

Volumes are ``(X, Y, Z)`` arrays in RAS voxel order (the processed grid). Views in neurological convention
(the subject's right on the right): sagittal (anterior right, superior up), coronal (superior up) and
axial (anterior up). Figures use matplotlib's object API on the Agg canvas (no pyplot global state, safe
in workers and headless CI).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

VIEWS: tuple[str, ...] = ("sagittal", "coronal", "axial")


def _check_volume(volume: np.ndarray, what: str) -> np.ndarray:
    volume = np.asarray(volume, np.float32)
    if volume.ndim != 3:
        raise ValueError(f"{what}: expected an (X, Y, Z) volume, got shape {volume.shape}")
    return volume


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


def triplanar(volume: np.ndarray, center: tuple[int, int, int]) -> list[np.ndarray]:
    """Sagittal, coronal and axial slices through ``center``, transposed for ``imshow(origin="lower")``."""
    x, y, z = center
    return [volume[x, :, :].T, volume[:, y, :].T, volume[:, :, z].T]


def _aspects(voxel_mm: Sequence[float] | None) -> list[float]:
    vx, vy, vz = (1.0, 1.0, 1.0) if voxel_mm is None else (float(v) for v in voxel_mm)
    return [vz / vy, vz / vx, vy / vx]  # pixel height / width for each view


def _intensity_limits(volumes: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(volumes, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


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
    center: str | Sequence[int] = "middle",
) -> Path:
    """PNG: one subject's traversal ``(K, X, Y, Z)``; a row per view, a column per step, shared grey scale."""
    traversal = np.asarray(traversal, np.float32)
    if traversal.ndim != 4:
        raise ValueError(f"traversal: expected (K, X, Y, Z), got shape {traversal.shape}")
    k = traversal.shape[0]
    labels = _step_labels(steps, k)
    vmin, vmax = _intensity_limits(traversal)
    c = slice_center(traversal[k // 2], center)
    aspects = _aspects(voxel_mm)
    fig = Figure(figsize=(1.4 * k + 0.6, 4.4), dpi=100, facecolor="black", layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, k, squeeze=False)
    for j, volume in enumerate(traversal):
        for i, (view, image) in enumerate(zip(VIEWS, triplanar(volume, c))):
            ax = axes[i, j]
            ax.imshow(image, cmap="gray", origin="lower", vmin=vmin, vmax=vmax, aspect=aspects[i],
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(labels[j], color="white", fontsize=8)
            if j == 0:
                ax.set_ylabel(view, color="white", fontsize=8)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    return _save(fig, path)


def _render_frame(volume: np.ndarray, center, label: str, vmin: float, vmax: float, aspects) -> np.ndarray:
    fig = Figure(figsize=(6.0, 2.4), dpi=80, facecolor="black")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, image, aspect in zip(axes, triplanar(volume, center), aspects):
        ax.imshow(image, cmap="gray", origin="lower", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        ax.set_axis_off()
    fig.suptitle(label, color="white", fontsize=10)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_traversal_gif(
    traversal: np.ndarray,
    steps: Sequence[float],
    path: str | Path,
    *,
    title: str = "",
    fps: float = 4.0,
    voxel_mm: Sequence[float] | None = None,
    center: str | Sequence[int] = "middle",
) -> Path:
    """Animated GIF of a traversal ``(K, X, Y, Z)``: tri-planar frames, forwards then back, looping forever."""
    traversal = np.asarray(traversal, np.float32)
    if traversal.ndim != 4 or traversal.shape[0] < 2:
        raise ValueError(f"traversal: expected (K >= 2, X, Y, Z), got shape {traversal.shape}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    k = traversal.shape[0]
    labels = _step_labels(steps, k)
    vmin, vmax = _intensity_limits(traversal)
    c = slice_center(traversal[k // 2], center)
    aspects = _aspects(voxel_mm)
    frames = [_render_frame(v, c, f"{title}  {lab}".strip(), vmin, vmax, aspects)
              for v, lab in zip(traversal, labels)]
    order = list(range(k)) + list(range(k - 2, 0, -1))  # ping-pong without repeating the end frames
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.stack([frames[i] for i in order]), duration=1000.0 / fps, loop=0)
    return path


def save_difference_map(
    difference: np.ndarray,
    path: str | Path,
    *,
    background: np.ndarray | None = None,
    title: str = "",
    label: str = "intensity difference",
    vmax: float | None = None,
    voxel_mm: Sequence[float] | None = None,
    center: str | Sequence[int] = "peak",
) -> Path:
    """PNG: tri-planar difference (or t) map, diverging colormap with symmetric limits ``[-vmax, vmax]``.

    ``background (X, Y, Z)`` (e.g. the mean volume) is drawn in grey underneath; the map is then hidden
    where ``|value| < 5% of vmax`` so anatomy shows through. ``vmax`` defaults to the 99.9th percentile
    of ``|difference|`` (robust to single-voxel outliers).
    """
    difference = _check_volume(difference, "difference map")
    if background is not None:
        background = _check_volume(background, "background")
        if background.shape != difference.shape:
            raise ValueError(f"background {background.shape} does not match the difference map {difference.shape}")
    if vmax is None:
        vmax = float(np.percentile(np.abs(difference), 99.9))
    vmax = max(float(vmax), 1e-12)
    c = slice_center(difference, center)
    aspects = _aspects(voxel_mm)
    fig = Figure(figsize=(9.0, 3.2), dpi=100, facecolor="white", layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    bg_slices = triplanar(background, c) if background is not None else [None] * 3
    image = None
    for ax, view, diff, bg, aspect in zip(axes, VIEWS, triplanar(difference, c), bg_slices, aspects):
        if bg is not None:
            ax.imshow(bg, cmap="gray", origin="lower", aspect=aspect, interpolation="nearest")
            diff = np.ma.masked_where(np.abs(diff) < 0.05 * vmax, diff)
        image = ax.imshow(diff, cmap="RdBu_r", vmin=-vmax, vmax=vmax, origin="lower", aspect=aspect,
                          interpolation="nearest")
        ax.set_title(view, fontsize=9)
        ax.set_axis_off()
    fig.colorbar(image, ax=list(axes), shrink=0.8, label=label)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
