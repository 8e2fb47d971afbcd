"""Template anatomy and volume measurements on processed brains.

Two jobs:

1. :func:`load_template`: the 1 mm MNI152 2009a T1 template, its GM/WM probability maps and brain mask
   (shipped offline by nilearn) plus regions derived from them: the lateral ventricles (nilearn ships no
   ventricle mask), a dilated ventricle ROI, the cerebral cortex, a deep white-matter core, the bilateral
   temporal-pole region of the synthetic cohort's local sex effect, and the brain's centre of mass.
2. :func:`atlas_on_grid` maps those regions onto any processing :class:`~brainlatent.grid.Grid` and
   :func:`measure_volumes` measures brain, lateral-ventricle and cortical grey-matter volumes from
   intensities alone. No per-subject segmentation: the same measurement applies to real scans, generated
   samples and latent traversals, as long as they are normalised like ``prepare`` does (percentiles of the
   brain voxels mapped to [0, 1], see :func:`tissue_levels`).

Processed brains are centred on their own centre of mass, so the atlas is placed on
``grid.centered_at(template.center_mm)``: the same box centred on the template brain's centre of mass.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from brainlatent.grid import Grid

# Search box (MNI mm, (min, max) per axis) around the lateral ventricles; excludes the temporal horns, which
# are too thin in the template to segment, and most of the third ventricle / cisterns.
VENTRICLE_SEARCH_BOX_MM = ((-40.0, 40.0), (-60.0, 40.0), (-10.0, 40.0))
# The ROI in which ventricle volume is measured: the template ventricles grown by this margin, so that
# ventricles enlarged by age (up to ~2.5x in the synthetic cohort) and brains shifted by size, rotation or
# deformation still fall inside it.
VENTRICLE_ROI_MARGIN_MM = 7.0
# Deep grey nuclei (caudate, putamen, pallidum, thalamus) and the infratentorial brain are not cortex.
_DEEP_NUCLEI_BOX_MM = ((-30.0, 30.0), (-38.0, 28.0), (-16.0, 22.0))
# Bilateral temporal poles: the region of the synthetic cohort's local (size-independent) sex effect.
SEX_REGION_CENTERS_MM: tuple[tuple[float, float, float], ...] = ((-38.0, 12.0, -30.0), (38.0, 12.0, -30.0))
SEX_REGION_SIGMA_MM = 12.0
# Intensity percentiles of the brain voxels that `prepare` maps to [0, 1] (DataConfig.intensity_percentiles).
DEFAULT_PERCENTILES = (0.5, 99.5)

MEASURE_COLUMNS = ("brain_volume_mm3", "ventricle_volume_mm3", "gm_volume_mm3", "sex_region_volume_mm3")


# ------------------------------------------------------------------------------------------ template
@dataclass(frozen=True)
class Template:
    """MNI152 2009a at 1 mm (197 x 233 x 189, RAS) and the regions derived from it.

    Maps are (X, Y, Z) float32 in [0, 1]; ROIs are bool. ``affine`` maps voxel -> MNI mm.
    """

    affine: np.ndarray
    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    brain_mask: np.ndarray
    ventricles: np.ndarray  # tight lateral ventricles (CSF)
    ventricle_roi: np.ndarray  # ventricles grown by VENTRICLE_ROI_MARGIN_MM
    cortex: np.ndarray  # cerebral cortex territory: GM probability >= 0.2 outside deep nuclei / infratentorium
    wm_core: np.ndarray  # deep white matter, away from the ventricles
    sex_region: np.ndarray  # balls of radius 1.5 sigma around SEX_REGION_CENTERS_MM
    center_mm: np.ndarray  # (3,) centre of mass of the brain mask

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.t1.shape

    @property
    def csf(self) -> np.ndarray:
        """CSF probability: what the brain mask holds besides GM and WM."""
        return self.brain_mask * np.clip(1.0 - self.gm - self.wm, 0.0, 1.0)


def _box(axes, bounds) -> np.ndarray:
    """Boolean (X, Y, Z) of the voxels whose MNI coordinates lie inside ``bounds`` ((lo, hi) per axis)."""
    inside = [(a >= lo) & (a <= hi) for a, (lo, hi) in zip(axes, bounds)]
    return inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]


def _lateral_ventricles(t1, gm, wm, mask, axes) -> np.ndarray:
    """CSF-like voxels (inside the brain, low GM + WM probability, dark T1) in the search box; the two
    largest connected components away from the midline are the left and right lateral ventricles."""
    box = tuple(
        slice(int(np.searchsorted(a, lo)), int(np.searchsorted(a, hi, side="right")))
        for a, (lo, hi) in zip(axes, VENTRICLE_SEARCH_BOX_MM)
    )
    csf_like = mask[box] & (gm[box] + wm[box] < 0.3) & (t1[box] < 0.45)
    labels, n = ndimage.label(csf_like)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    # Mean x of each component: the third ventricle and the cisterns straddle the midline, the lateral
    # ventricles do not.
    x_mm = axes[0][box[0]][:, None, None] + np.zeros(labels.shape)
    mean_x = np.bincount(labels.ravel(), weights=x_mm.ravel(), minlength=n + 1)[1:] / np.maximum(sizes, 1)
    lateral = np.flatnonzero(np.abs(mean_x) > 5.0) + 1
    if lateral.size < 2:
        raise RuntimeError("could not find the lateral ventricles in the MNI152 template")
    keep = lateral[np.argsort(sizes[lateral - 1])[::-1][:2]]
    out = np.zeros(t1.shape, bool)
    out[box] = np.isin(labels, keep)
    return out


def _cortex(gm, mask, axes) -> np.ndarray:
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    # Cerebellum and brainstem: below a plane approximating the tentorium, behind the temporal lobes.
    infratentorial = (y < -32.0) & (z < -6.0 + 0.12 * (y + 32.0))
    brainstem = (np.abs(x) < 14.0) & (y < -8.0) & (y >= -32.0) & (z < -12.0)
    return mask & (gm >= 0.2) & ~_box(axes, _DEEP_NUCLEI_BOX_MM) & ~infratentorial & ~brainstem


@lru_cache(maxsize=1)
def load_template() -> Template:
    """The 1 mm MNI152 2009a template and derived regions (cached; a few seconds the first time)."""
    from nilearn import datasets  # imported here: nilearn's import is slow and most callers never need it

    t1_img = datasets.load_mni152_template(resolution=1)
    affine = t1_img.affine.copy()
    t1 = t1_img.get_fdata(dtype=np.float32)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32) > 0.5
    assert np.allclose(np.diag(affine)[:3], 1.0) and np.count_nonzero(affine[:3, :3]) == 3  # 1 mm RAS
    axes = tuple(affine[k, k] * np.arange(n) + affine[k, 3] for k, n in enumerate(t1.shape))

    ventricles = _lateral_ventricles(t1, gm, wm, mask, axes)
    # Distances only inside a crop around the ventricles: a full-volume EDT costs ~1 s per call.
    lo = np.maximum(np.argwhere(ventricles).min(0) - 25, 0)
    hi = np.argwhere(ventricles).max(0) + 26
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    dist = np.full(t1.shape, np.inf, np.float32)
    dist[crop] = ndimage.distance_transform_edt(~ventricles[crop])
    ventricle_roi = (dist <= VENTRICLE_ROI_MARGIN_MM) & mask

    wm_core = (ndimage.gaussian_filter(wm, 2.0) >= 0.9) & (dist > 12.0) & mask
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    radius = 1.5 * SEX_REGION_SIGMA_MM
    sex_region = np.zeros(t1.shape, bool)
    for cx, cy, cz in SEX_REGION_CENTERS_MM:
        sex_region |= (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= radius**2

    ijk = np.argwhere(mask).mean(axis=0)
    center = nib.affines.apply_affine(affine, ijk)
    return Template(
        affine=affine,
        t1=t1,
        gm=gm,
        wm=wm,
        brain_mask=mask,
        ventricles=ventricles,
        ventricle_roi=ventricle_roi,
        cortex=_cortex(gm, mask, axes) & (dist > 2.0),  # GM-like partial volume at the ventricle walls
        wm_core=wm_core,
        sex_region=sex_region,
        center_mm=center,
    )


@dataclass(frozen=True)
class TissueLevels:
    """Typical CSF, GM and WM intensities of a brain normalised like ``prepare`` does (brain-voxel
    percentiles -> [0, 1]); measured on the template, whose contrast the synthetic cohort shares."""

    csf: float
    gm: float
    wm: float


@lru_cache(maxsize=8)
def tissue_levels(percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> TissueLevels:
    tpl = load_template()
    lo, hi = np.percentile(tpl.t1[tpl.brain_mask], percentiles)

    def level(sel: np.ndarray) -> float:
        return float(np.clip((np.median(tpl.t1[sel]) - lo) / (hi - lo), 0.0, 1.0))

    pure_csf = tpl.brain_mask & (tpl.gm + tpl.wm < 0.1)
    return TissueLevels(csf=level(pure_csf), gm=level(tpl.gm > 0.9), wm=level(tpl.wm > 0.9))


# --------------------------------------------------------------------------------------- resampling
def resample_array(
    data: np.ndarray, affine: np.ndarray, grid: Grid, *, order: int = 1, antialias: bool = True
) -> np.ndarray:
    """Resample ``data`` (X, Y, Z; voxel -> world ``affine``, axes aligned with the grid's) onto ``grid``.

    Outside the source is 0. With ``antialias`` a Gaussian matched to the voxel-size ratio is applied
    before trilinear sampling when downsampling (here rather than nilearn's ``resample_img``, which has
    no anti-aliasing: a 1 mm ROI sampled at 5 mm would otherwise alias into a jagged, unstable mask).
    Returns (grid.shape) float32.
    """
    data = np.asarray(data, dtype=np.float32)
    src_voxel = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if antialias:
        ratio = grid.voxel_mm / src_voxel
        # FWHM of the target voxel minus what the source voxel already integrates, in source voxels.
        sigma = np.sqrt(np.maximum(ratio**2 - 1.0, 0.0)) / 2.355
        if np.any(sigma > 0.1):
            data = ndimage.gaussian_filter(data, sigma, mode="constant", truncate=3.0)
    grid_to_src = np.linalg.inv(affine) @ grid.affine
    return ndimage.affine_transform(
        data,
        grid_to_src[:3, :3],
        offset=grid_to_src[:3, 3],
        output_shape=tuple(grid.shape),
        order=order,
        mode="constant",
        cval=0.0,
        prefilter=False,
    ).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------- atlas on grid
@dataclass(frozen=True)
class Atlas:
    """Template regions on a processing grid: soft weights in [0, 1], each (X, Y, Z) float32."""

    grid: Grid  # the processing grid centred on the template brain's centre of mass
    brain: np.ndarray
    ventricle_roi: np.ndarray
    cortex_roi: np.ndarray  # cortex grown by one voxel (cortex shifts with size and shape)
    wm_core: np.ndarray
    sex_region: np.ndarray
    t1: np.ndarray  # the template T1 itself, for display and sanity checks


def atlas_on_grid(grid: Grid) -> Atlas:
    """The template regions resampled onto ``grid.centered_at(template brain centre)`` (cached per grid)."""
    return _atlas(tuple(int(s) for s in grid.shape), tuple(np.asarray(grid.affine, float).ravel().tolist()))


@lru_cache(maxsize=8)
def _atlas(shape: tuple[int, int, int], affine_flat: tuple[float, ...]) -> Atlas:
    tpl = load_template()
    grid = Grid(shape, np.asarray(affine_flat).reshape(4, 4)).centered_at(tpl.center_mm)
    # Grow the cortex by ~one target voxel before resampling so the ROI is a band, not a thin ribbon that
    # anti-aliasing dilutes to low weights.
    grow = max(1, int(round(float(grid.voxel_mm.mean()) / 2)))
    cortex = ndimage.binary_dilation(tpl.cortex, iterations=grow)

    def on_grid(a: np.ndarray) -> np.ndarray:
        return np.clip(resample_array(a, tpl.affine, grid), 0.0, 1.0)

    return Atlas(
        grid=grid,
        brain=on_grid(tpl.brain_mask),
        ventricle_roi=on_grid(tpl.ventricle_roi),
        cortex_roi=on_grid(cortex),
        wm_core=on_grid(tpl.wm_core),
        sex_region=on_grid(tpl.sex_region),
        t1=on_grid(tpl.t1),
    )


def load_effect_map(path: str | Path, grid: Grid) -> np.ndarray:
    """A template-space NIfTI (e.g. the synthetic cohort's ``effect_maps/age_effect.nii.gz``) on ``grid``.

    Resampled (anti-aliased, trilinear) onto ``grid.centered_at(template brain centre)`` so it lines up
    with processed volumes. A map already on that grid comes back unchanged. Returns (grid.shape) float32.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"effect map not found: {path}")
    img = nib.as_closest_canonical(nib.load(path))
    if len(img.shape) != 3:
        raise ValueError(f"{path}: expected a 3D effect map, got shape {img.shape}")
    target = grid.centered_at(load_template().center_mm)
    if img.shape == tuple(target.shape) and np.allclose(img.affine, target.affine, atol=1e-4):
        return img.get_fdata(dtype=np.float32)
    return resample_array(img.get_fdata(dtype=np.float32), img.affine, target)


# ------------------------------------------------------------------------------------- measurements
def _ramp(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 below ``lo``, 1 above ``hi``, linear between: partial-volume voxels count partially."""
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


def tissue_fraction(v: np.ndarray, levels: TissueLevels) -> np.ndarray:
    """Soft "tissue rather than CSF" fraction of normalised intensities ``v`` (any shape).

    A linear ramp over the middle half of the CSF -> GM intensity range: voxels closer to CSF than to GM
    count (mostly) as CSF. The band is narrower than the full CSF -> GM range because at ~5 mm voxels
    pure CSF is rare and periventricular WM/GM partial volumes would otherwise be counted as CSF (on the
    default synthetic cohort this choice measures ventricles best: r = 0.94 with the truth vs 0.90 for
    the full range).
    """
    span = levels.gm - levels.csf
    return _ramp(v, levels.csf + 0.25 * span, levels.csf + 0.75 * span)


def measure_volumes(
    volumes: np.ndarray, grid: Grid, percentiles: tuple[float, float] = DEFAULT_PERCENTILES
) -> pd.DataFrame:
    """Brain, lateral-ventricle, cortical-GM and sex-region volumes (mm^3) of processed brains.

    Args:
        volumes: (N, X, Y, Z) or (X, Y, Z) intensities in [0, 1], normalised like ``prepare`` (brain-voxel
            ``percentiles`` -> [0, 1]); any float dtype, a read-only memmap is fine (read one at a time).
        grid: the processing grid (``data/processed/grid.json``); each brain centred on its centre of mass.
        percentiles: the normalisation percentiles (``DataConfig.intensity_percentiles``).

    Every measure sums the soft :func:`tissue_fraction` ``f`` (no segmentation, so it applies to real
    scans, generated samples and traversals alike), times the voxel volume:

    * ``brain_volume_mm3``: parenchyma, ``f`` over the whole grid;
    * ``ventricle_volume_mm3``: CSF, ``1 - f`` over the (soft, dilated) lateral-ventricle ROI;
    * ``gm_volume_mm3``: a cortical grey-matter proxy, ``f`` over the cortical ribbon ROI (cortical GM
      thinning turns ribbon voxels towards CSF). The ribbon also holds some WM, so this tracks GM changes
      but is not a GM volume in absolute terms;
    * ``sex_region_volume_mm3``: parenchyma in the temporal-pole region of the synthetic local sex effect.

    Returns a DataFrame with one row per volume and the columns of ``MEASURE_COLUMNS``.
    """
    if not isinstance(volumes, np.ndarray):
        volumes = np.asarray(volumes)
    if volumes.ndim == 3:
        volumes = volumes[None]
    if volumes.ndim != 4 or tuple(volumes.shape[1:]) != tuple(grid.shape):
        raise ValueError(
            f"volumes: expected shape (N, {', '.join(map(str, grid.shape))}) matching the grid, got {volumes.shape}"
        )
    atlas = atlas_on_grid(grid)
    levels = tissue_levels(tuple(float(p) for p in percentiles))
    vv = grid.voxel_volume_mm3
    rois = {}
    for name, w in (("ventricle", atlas.ventricle_roi), ("cortex", atlas.cortex_roi), ("sex", atlas.sex_region)):
        idx = np.flatnonzero(w.ravel() > 1e-3)
        rois[name] = (idx, w.ravel()[idx])
    core = np.flatnonzero(atlas.wm_core.ravel() > 0.5)
    rows = []
    for vol in volumes:
        v = np.asarray(vol, dtype=np.float32).ravel()
        # Intensity reference: deep WM should sit at the template's WM level. Rescaling about the CSF level
        # removes what global percentile normalisation leaves of a smooth bias field (on a 24-subject
        # synthetic cohort, ventricle r with the truth 0.83 -> 0.93) and contrast differences of
        # generated volumes.
        ref = float(np.median(v[core])) if core.size else levels.wm
        if ref > levels.csf + 0.1 * (levels.wm - levels.csf):  # else no usable WM: leave as is
            v = levels.csf + (v - levels.csf) * ((levels.wm - levels.csf) / (ref - levels.csf))
        f = tissue_fraction(v, levels)
        measured = {"brain_volume_mm3": float(f.sum())}
        for column, name, csf in (
            ("ventricle_volume_mm3", "ventricle", True),
            ("gm_volume_mm3", "cortex", False),
            ("sex_region_volume_mm3", "sex", False),
        ):
            idx, w = rois[name]
            measured[column] = float(np.sum(w * (1.0 - f[idx] if csf else f[idx])))
        rows.append({k: v * vv for k, v in measured.items()})
    return pd.DataFrame(rows, columns=list(MEASURE_COLUMNS))
