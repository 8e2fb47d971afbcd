"""Template anatomy and volume measurements on processed brains.

Two jobs:

1. :func:`load_template`: the 1 mm MNI152 2009a T1 template, its GM/WM probability maps and brain mask
   (shipped offline by nilearn) plus regions derived from them: the lateral ventricles (nilearn ships no
   ventricle mask), a dilated ventricle ROI, the cerebral cortex, a deep white-matter core, the regions of
   the synthetic recipes' local sex effects (:data:`LOCAL_REGIONS`), and the brain's centre of mass.
2. :func:`atlas_on_grid` maps those regions onto any processing :class:`~brainlatent.grid.Grid` and
   :func:`measure_volumes` measures brain, lateral-ventricle, cortical grey-matter and sex-region volumes
   from intensities alone. No per-subject segmentation: the same measurement applies to real scans,
   generated samples and latent traversals, as long as they are normalised like ``prepare`` does
   (percentiles of the brain voxels mapped to [0, 1]); the tissue intensities it reads against are fitted to
   the volumes (:func:`estimate_tissue_levels`), so any T1 contrast works.

Processed brains are centred on their own centre of mass, so the atlas is placed on
``grid.centered_at(template.center_mm)``: the same box centred on the template brain's centre of mass.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from brainlatent.grid import Grid

log = logging.getLogger(__name__)

# Search box (MNI mm, (min, max) per axis) around the lateral ventricles; excludes the temporal horns, which
# are too thin in the template to segment, and most of the third ventricle / cisterns.
VENTRICLE_SEARCH_BOX_MM = ((-40.0, 40.0), (-60.0, 40.0), (-10.0, 40.0))
# The ROI in which ventricle volume is measured: the template ventricles grown by this margin, so that
# ventricles enlarged by age (up to ~2.5x in the synthetic cohort) and brains shifted by size, rotation or
# deformation still fall inside it.
VENTRICLE_ROI_MARGIN_MM = 7.0
# Deep grey nuclei (caudate, putamen, pallidum, thalamus) and the infratentorial brain are not cortex.
_DEEP_NUCLEI_BOX_MM = ((-30.0, 30.0), (-38.0, 28.0), (-16.0, 22.0))

@dataclass(frozen=True)
class LocalRegion:
    """Balls of radius 1.5 sigma around bilateral centres (MNI mm): where a synthetic recipe plants its local
    sex effect (a smooth field of width ``sigma_mm`` around each centre) and where it is measured."""

    description: str
    centers_mm: tuple[tuple[float, float, float], ...]
    sigma_mm: float

    @property
    def radius_mm(self) -> float:
        return 1.5 * self.sigma_mm


# The local sex effects of the synthetic recipes (data/synthetic.py), by name.
LOCAL_REGIONS: dict[str, LocalRegion] = {
    "temporal_poles": LocalRegion("bilateral temporal poles", ((-38.0, 12.0, -30.0), (38.0, 12.0, -30.0)), 12.0),
    "occipital_poles": LocalRegion("bilateral occipital poles", ((-22.0, -92.0, 4.0), (22.0, -92.0, 4.0)), 12.0),
}
DEFAULT_SEX_REGION = "temporal_poles"  # the embedded (template) cohort's
COHORT_JSON = "cohort.json"  # a synthetic cohort's description; names its local sex region
# Intensity percentiles of the brain voxels that `prepare` maps to [0, 1] (DataConfig.intensity_percentiles).
DEFAULT_PERCENTILES = (0.5, 99.5)
# Around the ventricles CSF mixes with WM: a voxel counts as CSF from 0.53 (none) to 0.84 (all) CSF share
# (ventricle_csf_fraction; the template-contrast equivalent of tissue_fraction's band).
VENTRICLE_CSF_BAND = (0.53, 0.84)
# The deep-WM intensity reference is a quadratic in space once the WM core has this many voxels.
_MIN_BIAS_CORE_VOXELS = 30
# estimate_tissue_levels leaves out the brain's outer rim of this width (brains are centred, not registered).
LEVELS_EDGE_MM = 10.0

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
    center_mm: np.ndarray  # (3,) centre of mass of the brain mask

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.t1.shape

    @property
    def csf(self) -> np.ndarray:
        """CSF probability: what the brain mask holds besides GM and WM."""
        return self.brain_mask * np.clip(1.0 - self.gm - self.wm, 0.0, 1.0)

    def region(self, name: str) -> np.ndarray:
        """Boolean (X, Y, Z): the balls of the local region ``name`` (a key of :data:`LOCAL_REGIONS`)."""
        return _region_mask(name)


@lru_cache(maxsize=len(LOCAL_REGIONS))
def _region_mask(name: str) -> np.ndarray:
    region = local_region(name)
    tpl = load_template()
    x, y, z = np.meshgrid(*_axes(tpl.affine, tpl.shape), indexing="ij", sparse=True)
    mask = np.zeros(tpl.shape, bool)
    for cx, cy, cz in region.centers_mm:
        mask |= (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= region.radius_mm**2
    return mask


def local_region(name: str) -> LocalRegion:
    """The :class:`LocalRegion` called ``name``; ValueError naming the known ones otherwise."""
    if name not in LOCAL_REGIONS:
        raise ValueError(f"unknown local region {name!r}; expected one of {sorted(LOCAL_REGIONS)}")
    return LOCAL_REGIONS[name]


def _axes(affine: np.ndarray, shape) -> tuple[np.ndarray, ...]:
    """World mm along each axis of an axis-aligned grid."""
    return tuple(affine[k, k] * np.arange(n) + affine[k, 3] for k, n in enumerate(shape))


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
    axes = _axes(affine, t1.shape)

    ventricles = _lateral_ventricles(t1, gm, wm, mask, axes)
    # Distances only inside a crop around the ventricles: a full-volume EDT costs ~1 s per call.
    lo = np.maximum(np.argwhere(ventricles).min(0) - 25, 0)
    hi = np.argwhere(ventricles).max(0) + 26
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    dist = np.full(t1.shape, np.inf, np.float32)
    dist[crop] = ndimage.distance_transform_edt(~ventricles[crop])
    ventricle_roi = (dist <= VENTRICLE_ROI_MARGIN_MM) & mask

    wm_core = (ndimage.gaussian_filter(wm, 2.0) >= 0.9) & (dist > 12.0) & mask
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
        center_mm=center,
    )


@dataclass(frozen=True)
class TissueLevels:
    """Typical CSF, GM and WM intensities of brains normalised like ``prepare`` does (brain-voxel
    percentiles -> [0, 1]): fitted to volumes (:func:`estimate_tissue_levels`) or the template's own
    (:func:`tissue_levels`)."""

    csf: float
    gm: float
    wm: float


@lru_cache(maxsize=8)
def tissue_levels(percentiles: tuple[float, float] = DEFAULT_PERCENTILES) -> TissueLevels:
    """The MNI template's contrast at 1 mm (pure-tissue medians), normalised with ``percentiles``."""
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
    regions: dict[str, np.ndarray]  # every LOCAL_REGIONS entry, by name
    gm: np.ndarray  # tissue probabilities (inside the brain mask): the design of estimate_tissue_levels
    wm: np.ndarray
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
        regions={name: on_grid(tpl.region(name)) for name in LOCAL_REGIONS},
        gm=on_grid(tpl.gm * tpl.brain_mask),
        wm=on_grid(tpl.wm * tpl.brain_mask),
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


def ventricle_csf_fraction(v: np.ndarray, tissue: np.ndarray, levels: TissueLevels) -> np.ndarray:
    """Soft CSF fraction of normalised intensities ``v`` around the ventricles (same shape as ``tissue``).

    Around the ventricles CSF mixes with WM, and with GM at the deep nuclei: ``tissue`` is the intensity
    the non-CSF part would have there (:func:`local_tissue_level`). A voxel's CSF share of that two-part
    mixture, ``c = (tissue - v) / (tissue - csf)``, is ramped from :data:`VENTRICLE_CSF_BAND` [0] (counts as
    tissue) to [1] (counts as CSF). Unlike a band on the CSF -> GM range (what :func:`tissue_fraction`
    uses; on the template's contrast it sits at these CSF shares of CSF/WM mixtures), this keeps its
    meaning under any GM/WM contrast: rendered with GM/WM 0.55 or 0.79 instead of 0.75, the template's
    anatomy measures ventricles within 7 % of each other, where the CSF -> GM band gave -28 % .. +39 %.
    """
    return _ramp((tissue - v) / (tissue - levels.csf), *VENTRICLE_CSF_BAND)


def local_tissue_level(gm: np.ndarray, wm: np.ndarray, levels: TissueLevels) -> np.ndarray:
    """Intensity of the non-CSF part of a voxel with template GM/WM probabilities ``gm``, ``wm``: their
    levels weighted by the probabilities (WM where the template has neither, e.g. inside the ventricles)."""
    eps = 0.05
    return (gm * levels.gm + (wm + eps) * levels.wm) / (gm + wm + eps)


def estimate_tissue_levels(volumes: np.ndarray, grid: Grid) -> TissueLevels:
    """CSF, GM and WM levels of processed brains (N, X, Y, Z) or (X, Y, Z), fitted to their own intensities.

    Partial-volume model: the volumes' mean intensity inside the template brain is a mixture of the three
    tissues' levels weighted by the template's CSF/GM/WM probabilities on ``grid`` (resampled like the
    brains, so the fit sees the same partial volume), solved by least squares. The levels are the
    volumes' own contrast, whatever scanner or recipe made them; the mean over all volumes given keeps
    between-volume differences (age, sex) out of the levels. Brains are only centred, not registered, so
    the outer :data:`LEVELS_EDGE_MM` are left out: there smaller brains put background where the template
    has CSF, which pulled the CSF level below 0 (on the template cohort the fit then reproduces the
    template's measures: ventricle r 0.928 with and without; with the edge: 0.919).
    """
    volumes = np.asarray(volumes) if not isinstance(volumes, np.ndarray) else volumes
    volumes = volumes[None] if volumes.ndim == 3 else volumes
    _check_shape(volumes, grid)
    atlas = atlas_on_grid(grid)
    brain = atlas.brain > 0.5
    interior = ndimage.distance_transform_edt(brain, sampling=atlas.grid.voxel_mm) > LEVELS_EDGE_MM
    inside = np.flatnonzero((interior if interior.sum() >= 50 else brain).ravel())  # tiny grids: whole brain
    gm, wm = atlas.gm.ravel()[inside], atlas.wm.ravel()[inside]
    design = np.stack([np.clip(atlas.brain.ravel()[inside] - gm - wm, 0.0, None), gm, wm], axis=1)
    mean = np.zeros(inside.size)
    for vol in volumes:  # one at a time: memmaps stay on disk
        mean += np.asarray(vol, dtype=np.float32).ravel()[inside]
    mean /= len(volumes)
    csf, gm_level, wm_level = np.linalg.lstsq(design, mean, rcond=None)[0]
    return TissueLevels(csf=float(csf), gm=float(gm_level), wm=float(wm_level))


def _check_shape(volumes: np.ndarray, grid: Grid) -> None:
    if volumes.ndim != 4 or tuple(volumes.shape[1:]) != tuple(grid.shape):
        raise ValueError(
            f"volumes: expected shape (N, {', '.join(map(str, grid.shape))}) matching the grid, got {volumes.shape}"
        )


def _usable(levels: TissueLevels) -> bool:
    """T1 order with some contrast: CSF < GM < WM, each step at least 5 % of the range."""
    span = levels.wm - levels.csf
    return span > 0.05 and levels.gm - levels.csf > 0.05 * span and levels.wm - levels.gm > 0.05 * span


def measure_volumes(
    volumes: np.ndarray,
    grid: Grid,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    *,
    levels: TissueLevels | Literal["data", "template"] = "data",
    sex_region: str = DEFAULT_SEX_REGION,
) -> pd.DataFrame:
    """Brain, lateral-ventricle, cortical-GM and sex-region volumes (mm^3) of processed brains.

    Args:
        volumes: (N, X, Y, Z) or (X, Y, Z) intensities in [0, 1], normalised like ``prepare`` (brain-voxel
            ``percentiles`` -> [0, 1]); any float dtype, a read-only memmap is fine (read one at a time).
        grid: the processing grid (``data/processed/grid.json``); each brain centred on its centre of mass.
        percentiles: the normalisation percentiles (``DataConfig.intensity_percentiles``); used by
            ``levels="template"`` and by the fallback below.
        levels: the CSF/GM/WM intensities the tissue fraction is read against. ``"data"`` (default): fitted
            to ``volumes`` themselves (:func:`estimate_tissue_levels`), so any T1 contrast works; measure a
            cohort in one call, or pass the levels of a reference set (e.g. the real scans when measuring
            generated ones). When the fit is not a usable T1 contrast (noise, blank volumes) the template's
            levels are used, with a warning. ``"template"``: the MNI template's contrast
            (:func:`tissue_levels`), right only for brains made from it.
        sex_region: the :data:`LOCAL_REGIONS` entry measured as ``sex_region_volume_mm3`` (a synthetic
            cohort's is :func:`sex_region_of` its folder).

    Every measure sums a soft tissue or CSF fraction (no segmentation, so it applies to real scans,
    generated samples and traversals alike), times the voxel volume; ``f`` is :func:`tissue_fraction`:

    * ``brain_volume_mm3``: parenchyma, ``f`` over the whole grid;
    * ``ventricle_volume_mm3``: CSF over the (soft, dilated) lateral-ventricle ROI, by the CSF share of a
      CSF/WM mixture (:func:`ventricle_csf_fraction`), which does not depend on the GM/WM contrast;
    * ``gm_volume_mm3``: a cortical grey-matter proxy, ``f`` over the cortical ribbon ROI (cortical GM
      thinning turns ribbon voxels towards CSF). The ribbon also holds some WM, so this tracks GM changes
      but is not a GM volume in absolute terms;
    * ``sex_region_volume_mm3``: parenchyma in ``sex_region`` (a synthetic cohort's local sex effect).

    Returns a DataFrame with one row per volume and the columns of ``MEASURE_COLUMNS``.
    """
    if not isinstance(volumes, np.ndarray):
        volumes = np.asarray(volumes)
    if volumes.ndim == 3:
        volumes = volumes[None]
    _check_shape(volumes, grid)
    atlas = atlas_on_grid(grid)
    levels = _reference_levels(levels, volumes, grid, percentiles)
    region = atlas.regions.get(sex_region)
    if region is None:
        raise ValueError(f"sex_region: unknown region {sex_region!r}; expected one of {sorted(LOCAL_REGIONS)}")
    vv = grid.voxel_volume_mm3
    rois = {}
    for name, w in (("ventricle", atlas.ventricle_roi), ("cortex", atlas.cortex_roi), ("sex", region)):
        idx = np.flatnonzero(w.ravel() > 1e-3)
        rois[name] = (idx, w.ravel()[idx])
    core = np.flatnonzero(atlas.wm_core.ravel() > 0.5)
    basis = _quadratic_basis(tuple(grid.shape)) if core.size >= _MIN_BIAS_CORE_VOXELS else None
    idx = rois["ventricle"][0]
    vent_tissue = local_tissue_level(atlas.gm.ravel()[idx], atlas.wm.ravel()[idx], levels)
    rows = []
    for vol in volumes:
        v = np.asarray(vol, dtype=np.float32).ravel()
        v = _rescale_to_wm(v, core, basis, levels)
        f = tissue_fraction(v, levels)
        idx, w = rois["ventricle"]
        measured = {
            "brain_volume_mm3": float(f.sum()),
            "ventricle_volume_mm3": float(np.sum(w * ventricle_csf_fraction(v[idx], vent_tissue, levels))),
        }
        for column, name in (("gm_volume_mm3", "cortex"), ("sex_region_volume_mm3", "sex")):
            idx, w = rois[name]
            measured[column] = float(np.sum(w * f[idx]))
        rows.append({k: v * vv for k, v in measured.items()})
    return pd.DataFrame(rows, columns=list(MEASURE_COLUMNS))


def _reference_levels(levels: TissueLevels | Literal["data", "template"], volumes: np.ndarray, grid: Grid,
                      percentiles: tuple[float, float]) -> TissueLevels:
    """:func:`measure_volumes`' ``levels`` resolved: given levels as they are, ``"template"`` the template's
    contrast, ``"data"`` the levels fitted to ``volumes`` (the template's, with a warning, when the fit is not a
    T1 contrast)."""
    template_levels = tissue_levels(tuple(float(p) for p in percentiles))
    if not isinstance(levels, str):
        return levels
    if levels not in ("data", "template"):
        raise ValueError(f"levels: expected 'data', 'template' or TissueLevels, got {levels!r}")
    if levels == "template":
        return template_levels
    fitted = estimate_tissue_levels(volumes, grid)
    if _usable(fitted):
        return fitted
    log.warning("measure_volumes: the volumes' fitted tissue levels %s are not a T1 contrast; "
                "measuring with the template's", fitted)
    return template_levels


def _rescale_to_wm(v: np.ndarray, core: np.ndarray, basis: np.ndarray | None, levels: TissueLevels) -> np.ndarray:
    """Rescale a flat volume about the CSF level so that its deep WM sits at the WM level.

    The WM reference is a quadratic in space fitted to the volume's deep-WM voxels (``core``): it removes
    what percentile normalisation leaves of a smooth bias field, including a coil's linear fall-off and
    centre brightening, and contrast differences of generated volumes. Measured against a single median
    (the former reference) on the 160-subject cohorts at the default grid, ventricle r with the truth
    0.928 -> 0.938 (template recipe), 0.656 -> 0.696 (tissue recipe). Without enough WM voxels for the fit
    (``basis`` None) the median is the reference; without usable WM the volume is left as is.
    """
    if not core.size:
        return v
    median = float(np.median(v[core]))
    span = levels.wm - levels.csf
    if median <= levels.csf + 0.1 * span:  # no usable WM (blank or inverted volume): leave as is
        return v
    if basis is None:
        ref: np.ndarray | float = median
    else:
        coef = np.linalg.lstsq(basis[:, core].T, v[core].astype(np.float64), rcond=None)[0]
        # Bounded around the median: the quadratic is extrapolated to the grid's corners.
        excess = median - levels.csf
        ref = levels.csf + np.clip(basis.T @ coef - levels.csf, 0.5 * excess, 2.0 * excess)
    return (levels.csf + (v - levels.csf) * (span / (ref - levels.csf))).astype(np.float32)


@lru_cache(maxsize=4)
def _quadratic_basis(shape: tuple[int, int, int]) -> np.ndarray:
    """(10, n_voxels): 1, x, y, z and their products, in units of ~10 voxels about the grid centre."""
    x, y, z = (np.indices(shape).reshape(3, -1) - ((np.asarray(shape) - 1) / 2.0)[:, None]) / 10.0
    return np.stack([np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])


def sex_region_of(folder: str | Path | None) -> str:
    """The local sex region (a :data:`LOCAL_REGIONS` key) named by ``folder/cohort.json``: a synthetic
    cohort's root, or ``prepare``'s ``ground_truth`` copy of it. :data:`DEFAULT_SEX_REGION` when there is no
    such file (real data: no region was planted). ValueError for a cohort.json naming an unknown region."""
    path = None if folder is None else Path(folder) / COHORT_JSON
    if path is None or not path.is_file():
        return DEFAULT_SEX_REGION
    try:
        name = json.loads(path.read_text())["effects"]["sex_local"]["region"]
    except (ValueError, KeyError, TypeError):
        return DEFAULT_SEX_REGION  # cohort.json written before the recipes: the temporal poles
    if name not in LOCAL_REGIONS:
        raise ValueError(f"{path}: effects.sex_local.region {name!r} is not one of {sorted(LOCAL_REGIONS)}")
    return name
