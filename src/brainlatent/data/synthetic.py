"""Synthetic HCP-like cohorts with planted, known sex and age effects (``brainlatent synth``).

Two recipes (``synth.recipe``) make brains in different ways, so that no default of the project is tuned to
how one cohort was made (docs/synthetic_cohort.md):

* ``template`` (the embedded cohort): the MNI152 2009a template T1 with its own intensities;
* ``tissue``: T1 contrast rendered from the template's GM/WM/CSF probability maps with another scanner's
  tissue intensities, partial-volume blur, a coil-like bias field and Rician noise; larger deformations,
  anisotropic head shapes and a hemispheric torque; a local sex effect elsewhere (occipital poles) that adds
  brain volume; age as slower ventricle growth, frontal-weighted sulcal widening and WM T1 darkening.

Every subject is the 1 mm template's maps (nilearn, offline) pulled through one composed backward map, from
the subject's scanner space to the template::

    rigid misalignment^-1 -> random smooth deformation -> head shape and global scale^-1 (about the template
    brain's centre of mass) -> local sex effect -> ventricle enlargement with age -> template

and sampled once (trilinear, ``scipy.ndimage.map_coordinates``): the image's channels, GM/WM probabilities,
the ventricle label, the sex region and the brain mask share the same map, so the ground-truth volumes are
measured on exactly the geometry of the image. Age also turns cortical GM into CSF from the pial side. The
recipe's intensity model, partial-volume blur, bias field, intensity scale and noise come last. Effect sizes
and their definitions are in docs/synthetic_cohort.md and in ``cohort.json``; they are exaggerated on purpose.

Output (HCP Young Adult layout, written to a temporary folder and renamed into place)::

    <out_dir>/<Subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz   int16, RAS affine, 0 outside the brain
    <out_dir>/unrestricted_synthetic.csv                       Subject, Gender, Age (HCP ranges), FS_IntraCranial_Vol
    <out_dir>/ground_truth.csv                                 exact sex, age, scale, volumes per subject
    <out_dir>/effect_maps/{age,sex,sex_local}_effect.nii.gz    noise-free effects in template space
    <out_dir>/cohort.json                                      recipe, config, effect sizes, grid
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from scipy import ndimage
from scipy.spatial.transform import Rotation
from tqdm.auto import tqdm

from brainlatent import anatomy
from brainlatent.config import SynthConfig, TemplateRecipeConfig, TissueRecipeConfig
from brainlatent.data import fields
from brainlatent.data.cohort import age_to_group
from brainlatent.data.fields import LatticeField, col, voxel_points
from brainlatent.data.hcp import IMAGE_PATHS, SYNTHETIC_CSV, SYNTHETIC_EFFECT_MAPS, SYNTHETIC_GROUND_TRUTH
from brainlatent.grid import Grid

log = logging.getLogger(__name__)

# HCP's T1w_acpc_dc_restore box: 260 x 311 x 260 voxels of 0.7 mm over x in [-90, 92), y in [-126, 92),
# z in [-72, 110) mm (HCP stores it LAS; we write the same box RAS). Every voxel size samples this box
# (2 mm -> 91 x 109 x 91).
HCP_BOX_ORIGIN_MM = np.array([-90.0, -126.0, -72.0])
HCP_BOX_MM = np.array([182.0, 217.7, 182.0])
IMAGE_SCALE = 1000.0  # template recipe: intensity 1 -> 1000: WM ~870, GM ~650, CSF ~280 (T1w-like int16)
COHORT_JSON = anatomy.COHORT_JSON
# The unrestricted CSV's skull-based head size (HCP's column name) and its measurement error (SD of its log).
HEAD_SIZE_COLUMN = "FS_IntraCranial_Vol"
HEAD_SIZE_ERROR = 0.02
_HEAD_SIZE_STREAM = 0x1C5  # a random stream of its own: drawing it leaves every image unchanged
GROUND_TRUTH_COLUMNS = (
    "Subject", "sex", "age", "scale_factor", "ventricle_volume_mm3", "gm_volume_mm3",
    "cortical_gm_volume_mm3", "parenchyma_volume_mm3", "brain_mask_volume_mm3", "sex_region_volume_mm3",
    "intensity_scale",
    "rotation_deg", "translation_mm",
)  # fmt: skip
# Where each recipe plants its local sex effect (anatomy.LOCAL_REGIONS).
RECIPE_REGIONS = {"template": "temporal_poles", "tissue": "occipital_poles"}

_VENTRICLE_SMOOTH_MM = 4.0  # the ventricle velocity is the gradient of the ventricle mask blurred this much
_FIELD_SPACING_MM = 2.0  # lattice of the template-space effect fields
_SOURCE_SPACING_MM = 3.0  # the tissue recipe's volume-adding field spans the whole brain: a coarser lattice
# Random deformation (lattice spacing, smoothness in mm): ~15 mm scales (template), ~25 mm (tissue).
_DEFORMATION_LATTICE = {"template": (5.0, 15.0), "tissue": (6.0, 25.0)}
_BIAS_SPACING_MM, _BIAS_SMOOTH_MM = 10.0, 40.0  # template recipe's bias field: very smooth, random
_COIL_RADIUS_MM = 70.0  # tissue recipe's bias: log gain terms have SD bias_field at this distance
_TORQUE_RADIUS_MM = 60.0  # tissue recipe's torque_mm is the shift at this distance from the midline
# Tissue recipe's sulcal widening weight 1 + A tanh((y - y_centre) / L): frontal pole ~3x the occipital.
_FRONTAL_AMPLITUDE, _FRONTAL_LENGTH_MM = 0.5, 30.0
_SUPPORT_BLOCK = 2  # 2 mm lattice of the template's dilated brain mask (screening, see _Model.support)
_SCREEN_BLOCK_MM = 4.0  # output voxels are screened in blocks of about this size
# How much a screening block can stretch under the subject's inverse scale, head shape and deformation.
_BLOCK_STRETCH = {"template": 2.0, "tissue": 2.5}
_CHUNK_POINTS = 2_000_000  # output voxels per chunk (bounds memory at 0.7 mm)


# ------------------------------------------------------------------------------------------- grids
def output_grid(voxel_mm: float) -> Grid:
    """The subjects' native grid: HCP's T1w box sampled at ``voxel_mm`` (RAS, positive voxel sizes)."""
    shape = tuple(int(round(n)) for n in HCP_BOX_MM / voxel_mm)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = HCP_BOX_ORIGIN_MM
    return Grid(shape, affine)


def _chunks(index: np.ndarray):
    for start in range(0, index.size, _CHUNK_POINTS):
        yield slice(start, start + _CHUNK_POINTS)


# -------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class _ModelKey:
    """The settings the template-space model depends on (hashable: one cached model per process)."""

    recipe: str
    voxel_mm: float
    local_sex_effect: float
    max_ventricle_log_growth: float


@dataclass
class _Model:
    """Everything shared by all subjects of a recipe: pre-filtered template channels and the effect fields."""

    recipe: str
    grid: Grid  # output grid
    channels: dict[str, np.ndarray]  # 1 mm template crops, anti-aliased for the output voxel size
    channel_origin: np.ndarray  # world mm of channel voxel (0, 0, 0); 1 mm voxels
    center_mm: np.ndarray  # template brain centre of mass (scaling centre)
    # Screening: output voxels come in cubes of `block` voxels; a cube is rendered only if its centre,
    # mapped to the template before the effect fields, lands where `support` (the brain mask dilated by
    # the largest effect displacement plus the cube's radius) is > 0.5. Saves ~2/3 of the work.
    support: LatticeField
    block: int
    ventricle_velocity: LatticeField
    ventricle_table: tuple[np.ndarray, np.ndarray]  # (t, log volume ratio): calibration of exp(t v)
    region_name: str  # anatomy.LOCAL_REGIONS key of the local sex effect
    local_fields: dict[int, LatticeField]  # sign (+1 male, -1 female) -> backward displacement; absent: none
    local_rate: float  # a: male backward map exp(-a v_local) (template recipe: female exp(+a v_local))
    local_ratio_measured: float  # male / female region volume, measured on the template
    gm_csf_contrast: float  # template T1 intensity lost per unit of GM turned into CSF
    template_volumes: dict[str, float]

    @property
    def region(self) -> anatomy.LocalRegion:
        return anatomy.local_region(self.region_name)

    def ventricle_t(self, log_growth: float) -> float:
        """Flow time of the ventricle field giving ventricles ``exp(log_growth)`` times the template's."""
        t, logv = self.ventricle_table
        if log_growth <= 0:
            return 0.0
        return float(np.interp(log_growth, logv, t))


def _crop_to(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _ventricle_velocity(tpl: anatomy.Template) -> LatticeField:
    """v = grad(G_sigma * ventricles): points towards the ventricles, so the backward map exp(t v) pulls
    every voxel from closer to the ventricles and they grow smoothly along their whole shape."""
    crop = _crop_to(tpl.ventricles, margin=20)  # G_4mm's gradient is ~0 beyond 20 mm
    blurred = ndimage.gaussian_filter(tpl.ventricles[crop].astype(np.float32), _VENTRICLE_SMOOTH_MM)
    step = int(_FIELD_SPACING_MM)
    grad = np.stack(np.gradient(blurred))[:, ::step, ::step, ::step]
    origin = nib.affines.apply_affine(tpl.affine, [s.start for s in crop])
    return LatticeField(origin, float(step), grad.astype(np.float32))


def _ventricle_table(tpl: anatomy.Template, velocity: LatticeField, max_log_growth: float):
    """log(V(t) / V(0)) of the template ventricles warped by exp(t v), for t on a grid up to the largest
    growth the cohort needs (V measured at 1 mm)."""
    crop = _crop_to(tpl.ventricles, margin=10)  # walls move < 6 mm at the largest growth
    vent = tpl.ventricles[crop].astype(np.float32)
    origin = nib.affines.apply_affine(tpl.affine, [s.start for s in crop])
    ijk = voxel_points(vent.shape, np.arange(vent.size))
    pts = col(origin) + ijk

    def log_ratio(t: float) -> float:
        coords = ijk + fields.exp(velocity, t)(pts)
        warped = ndimage.map_coordinates(vent, coords, order=1, mode="constant", prefilter=False)
        return float(np.log(warped.sum() / vent.sum()))

    dt = 1.0 / velocity.max_norm()  # moves the ventricle wall by ~1 mm
    ts, logs = [0.0], [0.0]
    while logs[-1] < max_log_growth * 1.02:
        if len(ts) > 60:
            raise ValueError(
                f"synth: ventricle growth of {math.exp(max_log_growth):.2f}x over the age range is beyond what "
                "a smooth deformation of the template ventricles can produce; lower ventricle_growth_per_year"
            )
        ts.append(ts[-1] + dt)
        logs.append(log_ratio(ts[-1]))
    return np.array(ts), np.maximum.accumulate(np.array(logs))


def _region_volume(region: anatomy.LocalRegion, field: LatticeField | None) -> float:
    """Subject-space volume (mm^3, 1 mm points) of the first ball of ``region`` under the backward map
    ``id + field`` (``None``: the identity)."""
    c = col(region.centers_mm[0])
    g = np.arange(-2.5 * region.sigma_mm, 2.5 * region.sigma_mm + 1.0)
    pts = c + np.stack(np.meshgrid(g, g, g, indexing="ij")).reshape(3, -1)
    y = pts if field is None else pts + field(pts)
    return float((((y - c) ** 2).sum(axis=0) <= region.radius_mm**2).sum())


def local_effect(recipe: str, effect: float, tpl: anatomy.Template, region: anatomy.LocalRegion):
    """(backward displacement per sign, rate, measured male / female region volume ratio).

    template: a volume-neutral radial expansion (the region grows, a shell around it gives way), males
    exp(-a v) and females exp(+a v), so log(V_m / V_f) = 2 a D with D the mean divergence over the ball.
    tissue: Gaussian sources (the region grows and pushes everything outward, adding brain volume), males
    exp(-a v), females unchanged; the first-order rate is corrected on the measured ratio.
    """
    if effect == 0:
        return {}, 0.0, 1.0
    if recipe == "template":
        velocity = fields.radial_velocity(region.centers_mm, region.sigma_mm, _FIELD_SPACING_MM)
        rate = math.log1p(effect) / (2 * fields.radial_mean_divergence(region.sigma_mm, region.radius_mm))
        local = {sign: fields.exp(velocity, -sign * rate) for sign in (1, -1)}
        return local, rate, _region_volume(region, local[1]) / _region_volume(region, local[-1])
    # The source field is non-compact: its lattice covers the brain and a margin beyond any point we warp.
    ijk = np.argwhere(tpl.brain_mask)
    lo = nib.affines.apply_affine(tpl.affine, ijk.min(axis=0)) - 40.0
    hi = nib.affines.apply_affine(tpl.affine, ijk.max(axis=0)) + 40.0
    velocity = fields.source_velocity(region.centers_mm, region.sigma_mm, lo, hi, _SOURCE_SPACING_MM)
    target = math.log1p(effect)
    rate = target / fields.source_mean_divergence(region.sigma_mm, region.radius_mm)
    female = _region_volume(region, None)
    for attempt in range(3):
        male = fields.exp(velocity, -rate)
        ratio = _region_volume(region, male) / female
        if abs(math.log(ratio) - target) < 0.01 * abs(target) or attempt == 2:
            return {1: male}, rate, ratio
        rate *= target / math.log(ratio)
    raise AssertionError("unreachable")


def _outside_norm(field: LatticeField, tpl: anatomy.Template) -> float:
    """Largest displacement of ``field`` at lattice points outside the template brain mask (0 if none)."""
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(tpl.affine), field.points().T)).astype(int)
    valid = np.all((ijk >= 0) & (ijk < tpl.shape), axis=1)
    out = np.ones(len(ijk), bool)
    out[valid] = ~tpl.brain_mask[tuple(ijk[valid].T)]
    norms = np.sqrt((field.values.reshape(3, -1) ** 2).sum(axis=0))
    return float(norms[out].max()) if out.any() else 0.0


def _gm_loss_map(tpl: anatomy.Template, recipe: str) -> tuple[np.ndarray, np.ndarray]:
    """(cortical GM, loss): GM lost at fraction f is f * loss, weighted towards voxels with little WM
    (q = WM / (GM + WM) ~ depth: thinning from the pial side; tissue recipe: frontal lobes first) and
    normalised so that the cortical GM volume falls by exactly the fraction f."""
    cortex_gm = tpl.cortex * tpl.gm
    weight = 1.0 - tpl.wm / np.maximum(tpl.gm + tpl.wm, 1e-3)
    if recipe == "tissue":
        y = nib.affines.apply_affine(tpl.affine, np.c_[np.zeros(tpl.shape[1]), np.arange(tpl.shape[1]),
                                                          np.zeros(tpl.shape[1])])[:, 1]  # fmt: skip
        frontal = 1.0 + _FRONTAL_AMPLITUDE * np.tanh((y - tpl.center_mm[1]) / _FRONTAL_LENGTH_MM)
        weight = weight * frontal[None, :, None]
    loss = cortex_gm * weight / (np.sum(cortex_gm * weight) / np.sum(cortex_gm))
    return cortex_gm, loss.astype(np.float32)


@lru_cache(maxsize=2)
def _model(key: _ModelKey) -> _Model:
    tpl = anatomy.load_template()
    grid = output_grid(key.voxel_mm)
    region_name = RECIPE_REGIONS[key.recipe]
    region = anatomy.local_region(region_name)
    cortex_gm, loss = _gm_loss_map(tpl, key.recipe)
    t1_levels = {k: float(np.median(tpl.t1[m])) for k, m in (("gm", tpl.gm > 0.9), ("csf", tpl.csf > 0.9))}

    crop = _crop_to(tpl.brain_mask, margin=12)
    # Anti-alias once for the output voxel size: Gaussian with the FWHM of an output voxel (minus 1 mm).
    sigma = math.sqrt(max(key.voxel_mm**2 - 1.0, 0.0)) / 2.355
    raw = {
        "mask": tpl.brain_mask, "gm": tpl.gm, "wm": tpl.wm, "ventricles": tpl.ventricles,
        "cortex_gm": cortex_gm, "loss": loss, "region": tpl.region(region_name),
    }  # fmt: skip
    if key.recipe == "template":  # the tissue recipe renders its contrast from the GM/WM maps instead
        raw["t1"] = tpl.t1
    channels = {}
    for name, a in raw.items():
        a = np.ascontiguousarray(a[crop], dtype=np.float32)
        channels[name] = ndimage.gaussian_filter(a, sigma, mode="constant") if sigma > 0.1 else a
    channel_origin = nib.affines.apply_affine(tpl.affine, [s.start for s in crop])

    velocity = _ventricle_velocity(tpl)
    table = _ventricle_table(tpl, velocity, key.max_ventricle_log_growth)
    local, rate, ratio = local_effect(key.recipe, key.local_sex_effect, tpl, region)

    block = max(1, int(round(_SCREEN_BLOCK_MM / key.voxel_mm)))
    block_radius = block * key.voxel_mm * math.sqrt(3) / 2
    # Only displacements that reach outside the brain can pull background voxels in: the ventricle field
    # vanishes long before the brain's edge, the local sex fields do not.
    outside = _outside_norm(fields.exp(velocity, table[0][-1]), tpl)
    outside += max((_outside_norm(f, tpl) for f in local.values()), default=0.0)
    margin = outside + _BLOCK_STRETCH[key.recipe] * block_radius + _SUPPORT_BLOCK * math.sqrt(3)
    b = _SUPPORT_BLOCK
    m = np.pad(tpl.brain_mask, [(0, (-n) % b) for n in tpl.brain_mask.shape])
    blocks = m.reshape(m.shape[0] // b, b, m.shape[1] // b, b, m.shape[2] // b, b).any(axis=(1, 3, 5))
    support = ndimage.distance_transform_edt(~blocks, sampling=b) <= margin
    support_field = LatticeField(tpl.affine[:3, 3] + (b - 1) / 2.0, float(b), support[None].astype(np.float32))

    parenchyma = (tpl.gm + tpl.wm) * tpl.brain_mask  # template voxels are 1 mm^3
    template_volumes = {
        "ventricle_volume_mm3": float(tpl.ventricles.sum()),
        "cortical_gm_volume_mm3": float(cortex_gm.sum()),
        "gm_volume_mm3": float((tpl.gm * tpl.brain_mask).sum()),
        "parenchyma_volume_mm3": float(parenchyma.sum()),
        "brain_mask_volume_mm3": float(tpl.brain_mask.sum()),
        "sex_region_volume_mm3": float(parenchyma[tpl.region(region_name)].sum()),
    }
    return _Model(
        recipe=key.recipe,
        grid=grid,
        channels=channels,
        channel_origin=channel_origin,
        center_mm=tpl.center_mm,
        support=support_field,
        block=block,
        ventricle_velocity=velocity,
        ventricle_table=table,
        region_name=region_name,
        local_fields=local,
        local_rate=rate,
        local_ratio_measured=ratio,
        gm_csf_contrast=t1_levels["gm"] - t1_levels["csf"],
        template_volumes=template_volumes,
    )


def _model_key(cfg: SynthConfig) -> _ModelKey:
    p = cfg.recipe_config
    return _ModelKey(
        recipe=cfg.recipe,
        voxel_mm=float(cfg.voxel_mm),
        local_sex_effect=float(p.local_sex_effect),
        max_ventricle_log_growth=float(p.ventricle_growth_per_year * (cfg.age_max - cfg.age_min)),
    )


# ------------------------------------------------------------------------------------ one subject
@dataclass(frozen=True)
class SubjectParams:
    """The planted biology of one subject (drawn for the whole cohort from ``cfg.seed``)."""

    subject: int
    sex: str  # "F" or "M"
    age: float
    log_volume: float  # log brain-volume ratio to the template; linear scale = exp(log_volume / 3)
    local_sign: int  # +1 male, -1 female, 0 neither (effect maps)


@dataclass(frozen=True)
class _Nuisance:
    """Per-subject variation that is not a planted effect (anatomy and acquisition)."""

    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,) mm
    deformation: LatticeField | None
    shape: np.ndarray  # (3, 3) head shape about the brain centre, subject = c + shape (template - c)
    log_bias: Callable[[np.ndarray], np.ndarray] | None  # world points (3, M) -> log gain (M,)
    intensity_scale: float
    tissue_gain: np.ndarray  # (3,) CSF, GM, WM intensity factors (tissue recipe)
    rng: np.random.Generator
    rotation_deg: float


class _LatticeBias:
    """Template recipe: log gain = a smooth random field (scanner space)."""

    def __init__(self, field: LatticeField):
        self.field = field

    def __call__(self, world: np.ndarray) -> np.ndarray:
        return self.field(world)[0]


class _CoilBias:
    """Tissue recipe: log gain = a linear gradient along a random direction (a receive coil's fall-off) plus
    a radial term (centre brightening or darkening, as at high field), about the template brain centre."""

    def __init__(self, center: np.ndarray, direction: np.ndarray, linear: float, radial: float):
        self.center, self.direction, self.linear, self.radial = col(center), col(direction), linear, radial

    def __call__(self, world: np.ndarray) -> np.ndarray:
        d = (world - self.center) / _COIL_RADIUS_MM
        return self.linear * (self.direction * d).sum(axis=0) + self.radial * ((d**2).sum(axis=0) - 0.5)


def _draw_rigid(rng: np.random.Generator, rotation_deg: float, translation_mm: float):
    # rotation_deg / translation_mm are RMS totals (angle, length): per-axis SD is that / sqrt(3).
    angles = rng.normal(0.0, rotation_deg / math.sqrt(3), 3)
    translation = rng.normal(0.0, translation_mm / math.sqrt(3), 3)
    return Rotation.from_euler("xyz", angles, degrees=True), translation


def _draw_deformation(rng, grid: Grid, recipe: str, rms_mm: float) -> LatticeField:
    spacing, smooth = _DEFORMATION_LATTICE[recipe]
    # Unit RMS per component -> RMS displacement length = rms_mm.
    return fields.random_field(rng, grid, spacing, smooth, 3).scaled(rms_mm / math.sqrt(3))


def _draw_nuisance(cfg: SynthConfig, grid: Grid, seed: np.random.SeedSequence) -> _Nuisance:
    """Per-subject nuisance, drawn in a fixed order from the subject's own seed (worker-independent)."""
    rng = np.random.default_rng(seed)
    p = cfg.recipe_config
    rot, translation = _draw_rigid(rng, p.rotation_deg, p.translation_mm)
    intensity_scale = float(np.exp(rng.normal(0.0, p.intensity_sd)))
    deformation = _draw_deformation(rng, grid, cfg.recipe, p.deformation_mm)
    shape, tissue_gain = np.eye(3), np.ones(3)
    if isinstance(p, TemplateRecipeConfig):
        bias = _LatticeBias(fields.random_field(rng, grid, _BIAS_SPACING_MM, _BIAS_SMOOTH_MM, 1).scaled(p.bias_field))
    else:
        direction = rng.standard_normal(3)
        linear, radial = rng.normal(0.0, p.bias_field, 2)
        bias = _CoilBias(anatomy.load_template().center_mm, direction / np.linalg.norm(direction), linear, radial)
        # Head shape: volume-preserving axis lengths, then the torque (right hemisphere forward, left back).
        log_lengths = rng.normal(0.0, p.head_shape_sd, 3)
        shear = np.eye(3)
        shear[1, 0] = rng.normal(p.torque_mm, p.torque_sd_mm) / _TORQUE_RADIUS_MM
        shape = np.diag(np.exp(log_lengths - log_lengths.mean())) @ shear
        tissue_gain = np.exp(rng.normal(0.0, p.tissue_intensity_sd, 3))
    return _Nuisance(
        rotation=rot.as_matrix(),
        translation=translation,
        deformation=deformation if p.deformation_mm > 0 else None,
        shape=shape,
        log_bias=bias if p.bias_field > 0 else None,
        intensity_scale=intensity_scale,
        tissue_gain=tissue_gain,
        rng=rng,
        rotation_deg=float(np.degrees(rot.magnitude())),
    )


# Intensity models: noise-free image values (image units) from the sampled channels at the output voxels.
def _shade_template(model, p, cfg, sp, nuisance, s, gm, wm, lost) -> np.ndarray:
    return (s["t1"] - lost * model.gm_csf_contrast) * IMAGE_SCALE


def _shade_tissue(model, p: TissueRecipeConfig, cfg, sp, nuisance, s, gm, wm, lost) -> np.ndarray:
    csf_i, gm_i, wm_i = np.array([p.csf_intensity, p.gm_intensity, p.wm_intensity]) * (
        nuisance.tissue_gain if nuisance is not None else 1.0
    )
    wm_i -= p.wm_contrast_loss_per_year * max(sp.age - cfg.age_min, 0.0) * (wm_i - gm_i)  # WM T1 darkening
    csf = np.clip(s["mask"] - gm - wm, 0.0, None)  # lost GM became CSF; at the mask's edge, partly background
    return csf_i * csf + gm_i * gm + wm_i * wm


def _finish_template(image, brain, grid, p: TemplateRecipeConfig, nuisance) -> None:
    """Gain (global scale x bias field) and Gaussian noise on the brain voxels ``brain`` (flat, sorted)."""
    if nuisance is None:
        return
    flat = image.reshape(-1)
    for part in _chunks(brain):
        index = brain[part]
        gain = np.full(index.size, nuisance.intensity_scale)
        if nuisance.log_bias is not None:  # the bias field lives in scanner (subject) space
            ijk = voxel_points(grid.shape, index)
            gain *= np.exp(nuisance.log_bias(grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:]))
        noise = p.noise_sd * IMAGE_SCALE * nuisance.rng.standard_normal(index.size)
        flat[index] = flat[index] * gain + noise


def _finish_tissue(image, brain, grid, p: TissueRecipeConfig, nuisance) -> None:
    """Partial-volume blur (the point-spread function, within the brain), bias field, Rician noise, gain."""
    flat = image.reshape(-1)
    sigma = p.psf_fwhm_mm / 2.355 / float(grid.voxel_mm[0])
    if sigma > 0.1:
        # Normalised convolution: blurs the tissue contrast without darkening the brain's edge with the
        # zero background (a brain-extracted image is cut after the scanner's blur, not blurred with air).
        inside = np.zeros(flat.size, np.float32)
        inside[brain] = 1.0
        blurred = ndimage.gaussian_filter(image, sigma, mode="constant")
        weight = ndimage.gaussian_filter(inside.reshape(image.shape), sigma, mode="constant")
        flat[brain] = blurred.reshape(-1)[brain] / weight.reshape(-1)[brain]
    if nuisance is None:
        return
    sd = p.noise_sd * p.wm_intensity
    for part in _chunks(brain):
        index = brain[part]
        signal = flat[index].astype(np.float64)
        if nuisance.log_bias is not None:
            ijk = voxel_points(grid.shape, index)
            signal *= np.exp(nuisance.log_bias(grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:]))
        real = signal + sd * nuisance.rng.standard_normal(index.size)
        imaginary = sd * nuisance.rng.standard_normal(index.size)
        flat[index] = np.hypot(real, imaginary) * nuisance.intensity_scale  # magnitude image: Rician


_SHADE = {"template": _shade_template, "tissue": _shade_tissue}
_FINISH = {"template": _finish_template, "tissue": _finish_tissue}


def _age_loss(p, years: float) -> float:
    """Fraction of cortical GM turned into CSF after ``years``."""
    rate = p.gm_thinning_per_year if isinstance(p, TemplateRecipeConfig) else p.sulcal_widening_per_year
    return 1.0 - math.exp(-rate * max(years, 0.0))


def _render(
    model: _Model, sp: SubjectParams, cfg: SynthConfig, nuisance: _Nuisance | None
) -> tuple[np.ndarray, dict[str, float]]:
    """One brain on the output grid: (X, Y, Z) float32 in image units (0 outside), and its true volumes.

    Without ``nuisance`` this is the noise-free rendering of the planted biology alone (effect maps).
    """
    p = cfg.recipe_config
    grid, ch = model.grid, model.channels
    years = sp.age - cfg.age_min
    log_growth = p.ventricle_growth_per_year * max(years, 0.0)
    age_field = fields.exp(model.ventricle_velocity, model.ventricle_t(log_growth)) if log_growth > 0 else None
    thinning = _age_loss(p, years)
    local = model.local_fields.get(sp.local_sign)
    aligned = _subject_to_template(model, sp, nuisance)
    candidates = _candidate_voxels(model, aligned)

    image = np.zeros(grid.shape, np.float32)
    flat = image.reshape(-1)
    shade = _SHADE[model.recipe]
    sums = dict.fromkeys(("ventricles", "gm", "cortical_gm", "brain", "mask", "region"), 0.0)
    brain = []
    for part in _chunks(candidates):
        index = candidates[part]
        y = aligned(voxel_points(grid.shape, index))
        if local is not None:
            y += local(y)
        if age_field is not None:
            y += age_field(y)
        y -= col(model.channel_origin)  # template channel voxel coordinates (1 mm voxels)

        def sample(name: str, coords: np.ndarray) -> np.ndarray:
            return ndimage.map_coordinates(ch[name], coords, order=1, mode="constant", prefilter=False)

        mask = sample("mask", y)
        inside = np.flatnonzero(mask >= 0.5)
        index, coords = index[inside], y[:, inside]
        s = {name: sample(name, coords) for name in ch if name != "mask"}
        s["mask"] = mask[inside]
        lost = thinning * s["loss"]
        gm, wm = np.clip(s["gm"] - lost, 0, None), s["wm"]
        sums["ventricles"] += float(s["ventricles"].sum())
        sums["gm"] += float(gm.sum())
        sums["cortical_gm"] += float(np.clip(s["cortex_gm"] - lost, 0, None).sum())
        sums["brain"] += float((gm + wm).sum())
        sums["region"] += float((s["region"] * (gm + wm)).sum())
        sums["mask"] += index.size
        flat[index] = shade(model, p, cfg, sp, nuisance, s, gm, wm, lost)
        brain.append(index)

    _FINISH[model.recipe](image, np.concatenate(brain) if brain else np.zeros(0, np.int64), grid, p, nuisance)
    vv = float(np.prod(grid.voxel_mm))
    truth = {
        "ventricle_volume_mm3": sums["ventricles"] * vv,
        "gm_volume_mm3": sums["gm"] * vv,
        "cortical_gm_volume_mm3": sums["cortical_gm"] * vv,
        "parenchyma_volume_mm3": sums["brain"] * vv,
        "brain_mask_volume_mm3": sums["mask"] * vv,
        "sex_region_volume_mm3": sums["region"] * vv,
    }
    return image, truth


def _subject_to_template(
    model: _Model, sp: SubjectParams, nuisance: _Nuisance | None
) -> Callable[[np.ndarray], np.ndarray]:
    """Subject voxels (3, N) -> template world points (3, N) before the effect fields: undo the rigid
    misalignment (folded, with the grid affine, into one affine map), deform, unshape and unscale about the
    template brain's centre."""
    grid, c = model.grid, model.center_mm
    # Subject -> template about the brain centre: undo the head shape and the global scale.
    unshape = math.exp(-sp.log_volume / 3.0) * np.linalg.inv(nuisance.shape if nuisance is not None else np.eye(3))
    to_aligned = grid.affine.copy()
    if nuisance is not None:  # y = R^T (x - c - tau) + c with x = A ijk + a
        rigid_inv = np.eye(4)
        rigid_inv[:3, :3] = nuisance.rotation.T
        rigid_inv[:3, 3] = c - nuisance.rotation.T @ (c + nuisance.translation)
        to_aligned = rigid_inv @ to_aligned

    def aligned(ijk: np.ndarray) -> np.ndarray:
        y = to_aligned[:3, :3] @ ijk + to_aligned[:3, 3:]
        if nuisance is not None and nuisance.deformation is not None:
            y += nuisance.deformation(y)
        return col(c) + unshape @ (y - col(c))

    return aligned


def _candidate_voxels(model: _Model, aligned: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Flat indices of the output voxels worth rendering: those in ``model.block``-sized blocks whose centre
    ``aligned`` maps into the template's support (the rest of the grid stays background)."""
    grid, b = model.grid, model.block
    n_blocks = -(-np.asarray(grid.shape) // b)
    centres = (b - 1) / 2 + b * voxel_points(n_blocks, np.arange(int(n_blocks.prod())))
    hit = (model.support(aligned(centres))[0] > 0.5).reshape(n_blocks)
    hit = hit.repeat(b, 0).repeat(b, 1).repeat(b, 2)[: grid.shape[0], : grid.shape[1], : grid.shape[2]]
    candidates = np.flatnonzero(hit)
    log.debug("rendering %d of %d voxels", candidates.size, hit.size)
    return candidates


def _write_nifti(data: np.ndarray, grid: Grid, path: Path) -> None:
    img = nib.Nifti1Image(data, grid.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(grid.affine, code=1)
    img.set_sform(grid.affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _make_subject(cfg: SynthConfig, sp: SubjectParams, seed: np.random.SeedSequence, root: Path) -> dict:
    """Worker: render, write ``<root>/<Subject>/T1w/...`` and return the subject's ground-truth row."""
    model = _model(_model_key(cfg))
    nuisance = _draw_nuisance(cfg, model.grid, seed)
    image, truth = _render(model, sp, cfg, nuisance)
    # Brain voxels stay >= 1 so that "> 0" is exactly the brain mask, as in HCP's *_brain images.
    brain = image != 0
    data = np.zeros(image.shape, np.int16)
    data[brain] = np.clip(np.rint(image[brain]), 1, np.iinfo(np.int16).max).astype(np.int16)
    _write_nifti(data, model.grid, root / str(sp.subject) / IMAGE_PATHS["T1w"])
    return {
        "Subject": sp.subject,
        "sex": sp.sex,
        "age": round(sp.age, 3),
        "scale_factor": math.exp(sp.log_volume / 3.0),
        **truth,
        "intensity_scale": nuisance.intensity_scale,
        "rotation_deg": nuisance.rotation_deg,
        "translation_mm": float(np.linalg.norm(nuisance.translation)),
    }


# ------------------------------------------------------------------------------------ the cohort
def _mean_log_volume(cfg: SynthConfig) -> float:
    """The cohort's mean log brain volume relative to the template (template recipe: the template's own)."""
    p = cfg.recipe_config
    return math.log(p.mean_volume_ratio) if isinstance(p, TissueRecipeConfig) else 0.0


def draw_subjects(cfg: SynthConfig) -> tuple[list[SubjectParams], list[np.random.SeedSequence]]:
    """The cohort's planted biology and one independent seed per subject, all from ``cfg.seed``.

    Exactly round(n * male_fraction) males (in random order); ages uniform on [age_min, age_max]; log brain
    volume normal with mean (the recipe's mean) +-log(male_volume_ratio)/2 by sex and SD ``volume_sd``;
    6-digit HCP-like ids.
    """
    p = cfg.recipe_config
    cohort_seed, *subject_seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.n_subjects + 1)
    rng = np.random.default_rng(cohort_seed)
    n = cfg.n_subjects
    n_male = int(round(n * cfg.male_fraction))
    male = rng.permutation(np.arange(n) < n_male)
    ages = rng.uniform(cfg.age_min, cfg.age_max, n)
    half_log_ratio = math.log(p.male_volume_ratio) / 2
    log_volume = (
        _mean_log_volume(cfg) + np.where(male, half_log_ratio, -half_log_ratio) + rng.normal(0.0, p.volume_sd, n)
    )
    ids = np.sort(100_000 + rng.choice(900_000, size=n, replace=False))
    subjects = [
        SubjectParams(int(i), "M" if m else "F", float(a), float(lv), 1 if m else -1)
        for i, m, a, lv in zip(ids, male, ages, log_volume)
    ]
    return subjects, subject_seeds


def _effect_maps(model: _Model, cfg: SynthConfig) -> dict[str, np.ndarray]:
    """Noise-free, nuisance-free renderings differenced: the expected image change of each planted effect.

    age: (image at age_max - image at age_min) / (age_max - age_min), sex-neutral and of the cohort's mean
    size, in image units per year (the ventricle effect is exponential in age: this is the cohort-average
    slope). sex: male minus female at mid age with each sex's mean size; sex_local: the same at the mean size.
    """
    p = cfg.recipe_config
    mid = (cfg.age_min + cfg.age_max) / 2
    mean, half = _mean_log_volume(cfg), math.log(p.male_volume_ratio) / 2

    def render(age: float, log_volume: float, sign: int) -> np.ndarray:
        return _render(model, SubjectParams(0, "", age, log_volume, sign), cfg, None)[0]

    neutral_young = render(cfg.age_min, mean, 0)
    return {
        "reference_t1w": neutral_young,
        "age_effect": (render(cfg.age_max, mean, 0) - neutral_young) / (cfg.age_max - cfg.age_min),
        "sex_effect": render(mid, mean + half, 1) - render(mid, mean - half, -1),
        "sex_local_effect": render(mid, mean, 1) - render(mid, mean, -1),
    }


def _recipe_effects(model: _Model, cfg: SynthConfig) -> dict:
    """The recipe's planted effects for cohort.json (definitions in docs/synthetic_cohort.md)."""
    p, span = cfg.recipe_config, cfg.age_max - cfg.age_min
    region = model.region
    effects = {
        "sex_global": {
            "male_to_female_volume_ratio": p.male_volume_ratio,
            "male_to_female_linear_scale": p.male_volume_ratio ** (1 / 3),
            "mean_volume_ratio_to_template": math.exp(_mean_log_volume(cfg)),
            "log_volume_sd": p.volume_sd,
            "scaling_center_mm": model.center_mm.tolist(),
        },
        "sex_local": {
            "region": model.region_name,  # anatomy.LOCAL_REGIONS key: anatomy.sex_region_of reads it back
            "description": region.description,
            "centers_mm": [list(c) for c in region.centers_mm],
            "sigma_mm": region.sigma_mm,
            "region_radius_mm": region.radius_mm,
            "male_to_female_region_volume_ratio_target": 1 + p.local_sex_effect,
            "male_to_female_region_volume_ratio_measured": model.local_ratio_measured,
            "velocity_rate": model.local_rate,
            "adds_brain_volume": model.recipe == "tissue",
        },
        "age_ventricles": {
            "relative_growth_per_year": p.ventricle_growth_per_year,
            "law": "V(age) = V_template * exp(g * (age - age_min)), template = age_min",
            "ratio_oldest_to_youngest": math.exp(p.ventricle_growth_per_year * span),
        },
    }
    if isinstance(p, TemplateRecipeConfig):
        effects["age_cortical_gm"] = {
            "relative_loss_per_year": p.gm_thinning_per_year,
            "law": "GM_cortex(age) = GM_cortex_template * exp(-g * (age - age_min)), lost from the pial side",
            "ratio_oldest_to_youngest": math.exp(-p.gm_thinning_per_year * span),
        }
        return effects
    effects["age_sulcal_widening"] = {
        "relative_loss_per_year": p.sulcal_widening_per_year,
        "law": "GM_cortex(age) = GM_cortex_template * exp(-g * (age - age_min)), lost from the pial side "
        f"into sulcal CSF, weighted 1 + {_FRONTAL_AMPLITUDE} tanh((y - y_centre) / {_FRONTAL_LENGTH_MM} mm)",
        "ratio_oldest_to_youngest": math.exp(-p.sulcal_widening_per_year * span),
    }
    effects["age_wm_contrast"] = {
        "relative_loss_per_year": p.wm_contrast_loss_per_year,
        "law": "I_WM(age) = I_WM - c (age - age_min) (I_WM - I_GM): WM T1 darkening, no volume change",
        "gm_wm_contrast_ratio_oldest_to_youngest": 1 - p.wm_contrast_loss_per_year * span,
    }
    return effects


def _summary(model: _Model, cfg: SynthConfig) -> dict:
    if cfg.recipe == "template":
        intensities = {"image_scale": IMAGE_SCALE}
        description = "the MNI152 2009a template T1 warped, with its own intensities"
    else:
        p = cfg.tissue
        intensities = {"tissue_intensities": {"csf": p.csf_intensity, "gm": p.gm_intensity, "wm": p.wm_intensity}}
        description = "T1 contrast rendered from the MNI152 2009a tissue probability maps"
    return {
        "description": f"Synthetic HCP-like cohort, recipe '{cfg.recipe}': {description}, with planted effects "
        "(docs/synthetic_cohort.md). Effects are exaggerated relative to real young adults on purpose.",
        "recipe": cfg.recipe,
        "config": dataclasses.asdict(cfg),
        "grid": model.grid.to_dict(),
        **intensities,
        "template_brain_center_mm": model.center_mm.tolist(),
        "template_volumes": model.template_volumes,
        "effects": _recipe_effects(model, cfg),
        "files": {
            "images": f"<Subject>/{IMAGE_PATHS['T1w'].as_posix()}",
            "unrestricted": SYNTHETIC_CSV,
            "ground_truth": SYNTHETIC_GROUND_TRUTH,
            "effect_maps": f"{SYNTHETIC_EFFECT_MAPS}/*.nii.gz",
        },
    }


def skull_based_head_size(cfg: SynthConfig, model: _Model, rows: list[dict]) -> list[float]:
    """``FS_IntraCranial_Vol`` (mm^3) per subject, as HCP's unrestricted CSV carries it (FreeSurfer's eTIV,
    registered with the skull): the template's brain-mask volume times the subject's planted global scale cubed,
    with a log-normal measurement error of :data:`HEAD_SIZE_ERROR`. A local brain effect does not move the skull,
    so it is not in this number, unlike every size measured on a skull-stripped image (docs/synthetic_cohort.md).
    Drawn from its own random stream: the images are the same with or without it."""
    rng = np.random.default_rng([cfg.seed, _HEAD_SIZE_STREAM])
    scale3 = np.array([r["scale_factor"] for r in rows]) ** 3
    error = np.exp(rng.normal(0.0, HEAD_SIZE_ERROR, len(rows)))
    return np.round(model.template_volumes["brain_mask_volume_mm3"] * scale3 * error, 1).tolist()


def synthesize(cfg: SynthConfig, out_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Write the synthetic cohort described by ``cfg`` to ``out_dir`` (default ``cfg.out_dir``).

    Deterministic given ``cfg.seed`` and independent of ``cfg.workers``. The cohort is built in a sibling
    temporary folder and renamed into place, so an interrupted run leaves any previous cohort untouched.
    Returns the output folder.
    """
    out = Path(cfg.out_dir if out_dir is None else out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"synth.out_dir: {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        subjects, seeds = draw_subjects(cfg)
        jobs = (delayed(_make_subject)(cfg, sp, seed, tmp) for sp, seed in zip(subjects, seeds))
        with Parallel(n_jobs=cfg.workers, return_as="generator") as parallel:
            results = parallel(jobs)  # with workers > 1 the subjects start now, in the background
            model = _model(_model_key(cfg))
            for name, data in _effect_maps(model, cfg).items():
                _write_nifti(data.astype(np.float32), model.grid, tmp / SYNTHETIC_EFFECT_MAPS / f"{name}.nii.gz")
            rows = list(tqdm(results, total=len(subjects), desc="synthesize", disable=not progress))

        pd.DataFrame(
            {
                "Subject": [r["Subject"] for r in rows],
                "Gender": [r["sex"] for r in rows],
                "Age": [age_to_group(r["age"]) for r in rows],
                HEAD_SIZE_COLUMN: skull_based_head_size(cfg, model, rows),
            }
        ).to_csv(tmp / SYNTHETIC_CSV, index=False)
        pd.DataFrame(rows, columns=list(GROUND_TRUTH_COLUMNS)).to_csv(
            tmp / SYNTHETIC_GROUND_TRUTH, index=False, float_format="%.6g"
        )

        (tmp / COHORT_JSON).write_text(json.dumps(_summary(model, cfg), indent=2))

        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("synthetic cohort (%s recipe): %d subjects in %s", cfg.recipe, len(rows), out)
    return out
