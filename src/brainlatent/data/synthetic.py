"""A synthetic HCP-like cohort with planted, known sex and age effects (``brainlatent synth``).

Every subject is the 1 mm MNI152 2009a template (nilearn, offline) pulled through one composed backward
map, from the subject's scanner space to the template::

    rigid misalignment^-1 -> random smooth deformation -> global scale^-1 (about the template brain's
    centre of mass) -> local sex effect (temporal poles) -> ventricle enlargement with age -> template

and sampled once (trilinear, ``scipy.ndimage.map_coordinates``): T1, GM/WM probabilities, the ventricle
label and the brain mask share the same map, so the ground-truth volumes are measured on exactly the
geometry of the image. Age also thins cortical GM (GM turned into CSF from the pial side). A smooth bias
field, an intensity scale and Gaussian noise come last. Effect sizes and their definitions are in
docs/synthetic_cohort.md and in ``cohort.json``; they are exaggerated on purpose.

Smooth shape effects are stationary velocity fields integrated by scaling and squaring (``exp(v)``), so
they stay invertible (no folding) however strong the planted effect.

Output (HCP Young Adult layout, written to a temporary folder and renamed into place)::

    <out_dir>/<Subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz   int16, RAS affine, 0 outside the brain
    <out_dir>/unrestricted_synthetic.csv                       Subject, Gender, Age (HCP ranges)
    <out_dir>/ground_truth.csv                                 exact sex, age, scale, volumes per subject
    <out_dir>/effect_maps/{age,sex,sex_local}_effect.nii.gz    noise-free effects in template space
    <out_dir>/cohort.json                                      config, effect sizes, grid
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
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
from brainlatent.config import SynthConfig
from brainlatent.data.cohort import age_to_group
from brainlatent.data.hcp import IMAGE_PATHS, SYNTHETIC_CSV, SYNTHETIC_EFFECT_MAPS, SYNTHETIC_GROUND_TRUTH
from brainlatent.grid import Grid

log = logging.getLogger(__name__)

# HCP's T1w_acpc_dc_restore box: 260 x 311 x 260 voxels of 0.7 mm over x in [-90, 92), y in [-126, 92),
# z in [-72, 110) mm (HCP stores it LAS; we write the same box RAS). Every voxel size samples this box
# (2 mm -> 91 x 109 x 91).
HCP_BOX_ORIGIN_MM = np.array([-90.0, -126.0, -72.0])
HCP_BOX_MM = np.array([182.0, 217.7, 182.0])
IMAGE_SCALE = 1000.0  # template intensity 1 -> 1000: WM ~870, GM ~650, CSF ~280 (T1w-like int16 range)
COHORT_JSON = "cohort.json"
GROUND_TRUTH_COLUMNS = (
    "Subject", "sex", "age", "scale_factor", "ventricle_volume_mm3", "gm_volume_mm3",
    "cortical_gm_volume_mm3", "brain_volume_mm3", "icv_mm3", "intensity_scale", "rotation_deg", "translation_mm",
)  # fmt: skip

_VENTRICLE_SMOOTH_MM = 4.0  # the ventricle velocity is the gradient of the ventricle mask blurred this much
_FIELD_SPACING_MM = 2.0  # lattice of the template-space effect fields
_NUISANCE_SPACING_MM, _NUISANCE_SMOOTH_MM = 5.0, 15.0  # random deformation: smooth on ~15 mm scales
_BIAS_SPACING_MM, _BIAS_SMOOTH_MM = 10.0, 40.0  # bias field: very smooth
_SUPPORT_BLOCK = 2  # 2 mm lattice of the template's dilated brain mask (screening, see _Model.support)
_SCREEN_BLOCK_MM = 4.0  # output voxels are screened in blocks of about this size
_CHUNK_POINTS = 2_000_000  # output voxels per chunk (bounds memory at 0.7 mm)


# ------------------------------------------------------------------------------------------- grids
def output_grid(voxel_mm: float) -> Grid:
    """The subjects' native grid: HCP's T1w box sampled at ``voxel_mm`` (RAS, positive voxel sizes)."""
    shape = tuple(int(round(n)) for n in HCP_BOX_MM / voxel_mm)
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = HCP_BOX_ORIGIN_MM
    return Grid(shape, affine)


# Points are (3, M) arrays throughout: contiguous per coordinate, which is what map_coordinates wants.
def _col(v) -> np.ndarray:
    return np.asarray(v, np.float64).reshape(3, 1)


def _voxel_points(shape, flat_index: np.ndarray) -> np.ndarray:
    """Voxel coordinates (3, M) of the given flat (C-order) indices into an array of ``shape``."""
    return np.stack(np.unravel_index(flat_index, shape)).astype(np.float64)


@dataclass(frozen=True)
class _Field:
    """A field sampled on a regular lattice: ``values`` (C, nx, ny, nz), world mm = origin + spacing * ijk.

    C = 3 for displacements (mm), 1 for scalar maps. Zero outside the lattice (every field here decays to
    ~0 before the lattice edge). Sampled trilinearly.
    """

    origin: np.ndarray
    spacing: float
    values: np.ndarray

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Field values (C, M) at world points (3, M)."""
        coords = (points - _col(self.origin)) / self.spacing
        return np.stack(
            [ndimage.map_coordinates(c, coords, order=1, mode="constant", prefilter=False) for c in self.values]
        )

    def points(self) -> np.ndarray:
        """World mm (3, M) of every lattice point, C order."""
        shape = self.values.shape[1:]
        return _col(self.origin) + self.spacing * _voxel_points(shape, np.arange(int(np.prod(shape))))

    def max_norm(self) -> float:
        return float(np.sqrt((self.values**2).sum(axis=0)).max())


def _exp(velocity: _Field, t: float) -> _Field:
    """Displacement of the flow of the stationary velocity ``t * velocity`` at time 1 (scaling and squaring).

    Each squaring composes the field with itself, u <- u + u o (id + u), after scaling it down until no
    step moves more than half a lattice cell: the result is a diffeomorphism however large ``t`` is.
    """
    vmax = abs(t) * velocity.max_norm()
    if vmax == 0:
        return _Field(velocity.origin, velocity.spacing, np.zeros_like(velocity.values))
    steps = max(0, math.ceil(math.log2(vmax / (0.5 * velocity.spacing)))) + 2
    u = _Field(velocity.origin, velocity.spacing, (t / 2**steps) * velocity.values)
    pts = u.points()
    shape = velocity.values.shape
    for _ in range(steps):
        flat = u.values.reshape(3, -1)
        u = _Field(u.origin, u.spacing, (flat + u(pts + flat)).reshape(shape).astype(np.float32))
    return u


def _random_field(rng: np.random.Generator, grid: Grid, spacing: float, smooth: float, components: int) -> _Field:
    """Gaussian-smoothed white noise on a lattice covering ``grid`` (+20 mm), unit RMS per component."""
    origin = grid.affine[:3, 3] - 20.0
    n = np.ceil((grid.fov_mm + 40.0) / spacing).astype(int) + 1
    noise = rng.standard_normal((components, *n))
    values = np.stack([ndimage.gaussian_filter(c, smooth / spacing, mode="wrap") for c in noise])
    values /= np.sqrt((values**2).mean(axis=tuple(range(1, values.ndim)), keepdims=True))
    return _Field(origin, spacing, values.astype(np.float32))


# -------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class _ModelKey:
    """The settings the template-space model depends on (hashable: one cached model per process)."""

    voxel_mm: float
    local_sex_effect: float
    max_ventricle_log_growth: float


@dataclass
class _Model:
    """Everything shared by all subjects: pre-filtered template channels and the effect fields."""

    grid: Grid  # output grid
    channels: dict[str, np.ndarray]  # 1 mm template crops, anti-aliased for the output voxel size
    channel_origin: np.ndarray  # world mm of channel voxel (0, 0, 0); 1 mm voxels
    center_mm: np.ndarray  # template brain centre of mass (scaling centre)
    # Screening: output voxels come in cubes of `block` voxels; a cube is rendered only if its centre,
    # mapped to the template before the effect fields, lands where `support` (the brain mask dilated by
    # the largest effect displacement plus the cube's radius) is > 0.5. Saves ~2/3 of the work.
    support: _Field
    block: int
    ventricle_velocity: _Field
    ventricle_table: tuple[np.ndarray, np.ndarray]  # (t, log volume ratio): calibration of exp(t v)
    local_fields: dict[int, _Field]  # +1 male, -1 female: backward displacement of the local sex effect
    local_rate: float  # a: male backward map exp(-a v_local), female exp(+a v_local)
    local_ratio_measured: float  # male / female region volume, measured on the template
    gm_csf_contrast: float  # template intensity lost per unit of GM turned into CSF
    template_volumes: dict[str, float]

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


def _ventricle_velocity(tpl: anatomy.Template) -> _Field:
    """v = grad(G_sigma * ventricles): points towards the ventricles, so the backward map exp(t v) pulls
    every voxel from closer to the ventricles and they grow smoothly along their whole shape."""
    crop = _crop_to(tpl.ventricles, margin=20)  # G_4mm's gradient is ~0 beyond 20 mm
    blurred = ndimage.gaussian_filter(tpl.ventricles[crop].astype(np.float32), _VENTRICLE_SMOOTH_MM)
    step = int(_FIELD_SPACING_MM)
    grad = np.stack(np.gradient(blurred))[:, ::step, ::step, ::step]
    origin = nib.affines.apply_affine(tpl.affine, [s.start for s in crop])
    return _Field(origin, float(step), grad.astype(np.float32))


def _ventricle_table(tpl: anatomy.Template, velocity: _Field, max_log_growth: float):
    """log(V(t) / V(0)) of the template ventricles warped by exp(t v), for t on a grid up to the largest
    growth the cohort needs (V measured at 1 mm)."""
    crop = _crop_to(tpl.ventricles, margin=10)  # walls move < 6 mm at the largest growth
    vent = tpl.ventricles[crop].astype(np.float32)
    origin = nib.affines.apply_affine(tpl.affine, [s.start for s in crop])
    ijk = _voxel_points(vent.shape, np.arange(vent.size))
    pts = _col(origin) + ijk

    def log_ratio(t: float) -> float:
        coords = ijk + _exp(velocity, t)(pts)
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


def _local_velocity() -> _Field:
    """v(x) = sum_c (x - c) exp(-|x - c|^2 / 2 sigma^2) around both temporal poles: a radial expansion."""
    sigma = anatomy.SEX_REGION_SIGMA_MM
    centers = np.array(anatomy.SEX_REGION_CENTERS_MM)
    lo, hi = centers.min(axis=0) - 4 * sigma, centers.max(axis=0) + 4 * sigma
    n = np.ceil((hi - lo) / _FIELD_SPACING_MM).astype(int) + 1
    field = _Field(lo, _FIELD_SPACING_MM, np.zeros((3, *n), np.float32))
    pts = field.points()
    v = np.zeros_like(pts)
    for c in centers:
        d = pts - _col(c)
        v += d * np.exp(-(d**2).sum(axis=0) / (2 * sigma**2))
    return _Field(lo, _FIELD_SPACING_MM, v.reshape(3, *n).astype(np.float32))


def _local_rate(effect: float) -> float:
    """Rate ``a`` giving male / female region volume ``1 + effect`` to first order.

    The region is a ball of radius 1.5 sigma around each centre; d log V / da is the mean divergence of
    v over the ball, div v = g(r) (3 - r^2 / sigma^2) with g the Gaussian. Males get exp(-a v) and females
    exp(+a v) (backward maps), so log(V_m / V_f) = 2 a D.
    """
    sigma = anatomy.SEX_REGION_SIGMA_MM
    r = np.linspace(0.0, 1.5 * sigma, 2001)
    div = np.exp(-(r**2) / (2 * sigma**2)) * (3 - r**2 / sigma**2)
    mean_div = np.trapezoid(div * r**2, r) / np.trapezoid(r**2, r)
    return math.log1p(effect) / (2 * mean_div)


def _region_ratio(field_m: _Field, field_f: _Field) -> float:
    """Male / female volume of the temporal-pole balls, measured by warping them (1 mm points)."""
    sigma, centers = anatomy.SEX_REGION_SIGMA_MM, np.array(anatomy.SEX_REGION_CENTERS_MM)
    c = _col(centers[0])
    g = np.arange(-2.5 * sigma, 2.5 * sigma + 1.0)
    pts = c + np.stack(np.meshgrid(g, g, g, indexing="ij")).reshape(3, -1)

    def volume(field: _Field) -> float:
        y = pts + field(pts)
        return float((((y - c) ** 2).sum(axis=0) <= (1.5 * sigma) ** 2).sum())

    return volume(field_m) / volume(field_f)


def _outside_norm(field: _Field, tpl: anatomy.Template) -> float:
    """Largest displacement of ``field`` at lattice points outside the template brain mask (0 if none)."""
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(tpl.affine), field.points().T)).astype(int)
    valid = np.all((ijk >= 0) & (ijk < tpl.shape), axis=1)
    out = np.ones(len(ijk), bool)
    out[valid] = ~tpl.brain_mask[tuple(ijk[valid].T)]
    norms = np.sqrt((field.values.reshape(3, -1) ** 2).sum(axis=0))
    return float(norms[out].max()) if out.any() else 0.0


@lru_cache(maxsize=2)
def _model(key: _ModelKey) -> _Model:
    tpl = anatomy.load_template()
    grid = output_grid(key.voxel_mm)

    # Cortical GM thinning from the pial side: the GM lost at fraction f is f * loss, with loss weighted
    # towards voxels with little WM (q = WM / (GM + WM) ~ depth) and normalised so that the cortical GM
    # volume falls by exactly the fraction f.
    cortex_gm = tpl.cortex * tpl.gm
    outer = 1.0 - tpl.wm / np.maximum(tpl.gm + tpl.wm, 1e-3)
    loss = cortex_gm * outer / (np.sum(cortex_gm * outer) / np.sum(cortex_gm))
    t1_levels = {k: float(np.median(tpl.t1[m])) for k, m in (("gm", tpl.gm > 0.9), ("csf", tpl.csf > 0.9))}

    crop = _crop_to(tpl.brain_mask, margin=12)
    # Anti-alias once for the output voxel size: Gaussian with the FWHM of an output voxel (minus 1 mm).
    sigma = math.sqrt(max(key.voxel_mm**2 - 1.0, 0.0)) / 2.355
    raw = {
        "mask": tpl.brain_mask, "t1": tpl.t1, "gm": tpl.gm, "wm": tpl.wm,
        "ventricles": tpl.ventricles, "cortex_gm": cortex_gm, "loss": loss,
    }  # fmt: skip
    channels = {}
    for name, a in raw.items():
        a = np.ascontiguousarray(a[crop], dtype=np.float32)
        channels[name] = ndimage.gaussian_filter(a, sigma, mode="constant") if sigma > 0.1 else a
    channel_origin = nib.affines.apply_affine(tpl.affine, [s.start for s in crop])

    velocity = _ventricle_velocity(tpl)
    table = _ventricle_table(tpl, velocity, key.max_ventricle_log_growth)
    local_v = _local_velocity()
    rate = _local_rate(key.local_sex_effect)
    local = {sign: _exp(local_v, -sign * rate) for sign in (1, -1)}

    block = max(1, int(round(_SCREEN_BLOCK_MM / key.voxel_mm)))
    block_radius = block * key.voxel_mm * math.sqrt(3) / 2
    # Only displacements that reach outside the brain can pull background voxels in: the ventricle field
    # vanishes long before the brain's edge, the temporal-pole field does not.
    outside = _outside_norm(_exp(velocity, table[0][-1]), tpl) + max(_outside_norm(f, tpl) for f in local.values())
    # 2: inverse scales (up to ~1.2 at volume_sd 0.05) and the random deformation stretch the cube;
    # + one support cell.
    margin = outside + 2.0 * block_radius + _SUPPORT_BLOCK * math.sqrt(3)
    b = _SUPPORT_BLOCK
    m = np.pad(tpl.brain_mask, [(0, (-n) % b) for n in tpl.brain_mask.shape])
    blocks = m.reshape(m.shape[0] // b, b, m.shape[1] // b, b, m.shape[2] // b, b).any(axis=(1, 3, 5))
    support = ndimage.distance_transform_edt(~blocks, sampling=b) <= margin
    support_field = _Field(tpl.affine[:3, 3] + (b - 1) / 2.0, float(b), support[None].astype(np.float32))

    vv = 1.0  # template voxels are 1 mm^3
    template_volumes = {
        "ventricle_volume_mm3": float(tpl.ventricles.sum()) * vv,
        "cortical_gm_volume_mm3": float(cortex_gm.sum()) * vv,
        "gm_volume_mm3": float((tpl.gm * tpl.brain_mask).sum()) * vv,
        "brain_volume_mm3": float(((tpl.gm + tpl.wm) * tpl.brain_mask).sum()) * vv,
        "icv_mm3": float(tpl.brain_mask.sum()) * vv,
    }
    return _Model(
        grid=grid,
        channels=channels,
        channel_origin=channel_origin,
        center_mm=tpl.center_mm,
        support=support_field,
        block=block,
        ventricle_velocity=velocity,
        ventricle_table=table,
        local_fields=local,
        local_rate=rate,
        local_ratio_measured=_region_ratio(local[1], local[-1]),
        gm_csf_contrast=t1_levels["gm"] - t1_levels["csf"],
        template_volumes=template_volumes,
    )


def _model_key(cfg: SynthConfig) -> _ModelKey:
    return _ModelKey(
        voxel_mm=float(cfg.voxel_mm),
        local_sex_effect=float(cfg.local_sex_effect),
        max_ventricle_log_growth=float(cfg.ventricle_growth_per_year * (cfg.age_max - cfg.age_min)),
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
    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,) mm
    deformation: _Field | None
    bias: _Field | None  # log multiplicative bias
    intensity_scale: float
    noise_sd: float
    rng: np.random.Generator
    rotation_deg: float


def _draw_nuisance(cfg: SynthConfig, grid: Grid, seed: np.random.SeedSequence) -> _Nuisance:
    """Per-subject nuisance, drawn in a fixed order from the subject's own seed (worker-independent)."""
    rng = np.random.default_rng(seed)
    # rotation_deg / translation_mm are RMS totals (angle, length): per-axis SD is that / sqrt(3).
    angles = rng.normal(0.0, cfg.rotation_deg / math.sqrt(3), 3)
    translation = rng.normal(0.0, cfg.translation_mm / math.sqrt(3), 3)
    intensity_scale = float(np.exp(rng.normal(0.0, cfg.intensity_sd)))
    deformation = _random_field(rng, grid, _NUISANCE_SPACING_MM, _NUISANCE_SMOOTH_MM, 3)
    # Unit RMS per component -> RMS displacement length = deformation_mm.
    deformation = dataclasses.replace(deformation, values=deformation.values * (cfg.deformation_mm / math.sqrt(3)))
    bias = _random_field(rng, grid, _BIAS_SPACING_MM, _BIAS_SMOOTH_MM, 1)
    bias = dataclasses.replace(bias, values=bias.values * cfg.bias_field)
    rot = Rotation.from_euler("xyz", angles, degrees=True)
    return _Nuisance(
        rotation=rot.as_matrix(),
        translation=translation,
        deformation=deformation if cfg.deformation_mm > 0 else None,
        bias=bias if cfg.bias_field > 0 else None,
        intensity_scale=intensity_scale,
        noise_sd=cfg.noise_sd,
        rng=rng,
        rotation_deg=float(np.degrees(rot.magnitude())),
    )


def _render(
    model: _Model, sp: SubjectParams, cfg: SynthConfig, nuisance: _Nuisance | None
) -> tuple[np.ndarray, dict[str, float]]:
    """One brain on the output grid: (X, Y, Z) float32 in image units (0 outside), and its true volumes.

    Without ``nuisance`` this is the noise-free rendering of the planted biology alone (effect maps).
    """
    grid, ch, c = model.grid, model.channels, model.center_mm
    log_growth = cfg.ventricle_growth_per_year * max(sp.age - cfg.age_min, 0.0)
    age_field = _exp(model.ventricle_velocity, model.ventricle_t(log_growth)) if log_growth > 0 else None
    thinning = 1.0 - math.exp(-cfg.gm_thinning_per_year * max(sp.age - cfg.age_min, 0.0))
    local = model.local_fields.get(sp.local_sign)
    inv_scale = math.exp(-sp.log_volume / 3.0)

    # Subject voxel -> template before the effect fields: undo the rigid misalignment (folded, with the
    # grid affine, into one affine map), deform, unscale about the template brain's centre.
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
        y -= _col(c)
        y *= inv_scale
        y += _col(c)
        return y

    b = model.block
    n_blocks = -(-np.asarray(grid.shape) // b)
    centres = (b - 1) / 2 + b * _voxel_points(n_blocks, np.arange(int(n_blocks.prod())))
    hit = (model.support(aligned(centres))[0] > 0.5).reshape(n_blocks)
    hit = hit.repeat(b, 0).repeat(b, 1).repeat(b, 2)[: grid.shape[0], : grid.shape[1], : grid.shape[2]]
    candidates = np.flatnonzero(hit)
    log.debug("rendering %d of %d voxels", candidates.size, hit.size)

    out = np.zeros(int(np.prod(grid.shape)), np.float32)
    sums = dict.fromkeys(("ventricles", "gm", "cortical_gm", "brain", "mask"), 0.0)
    for start in range(0, candidates.size, _CHUNK_POINTS):
        index = candidates[start : start + _CHUNK_POINTS]
        ijk = _voxel_points(grid.shape, index)
        y = aligned(ijk)
        if local is not None:
            y += local(y)
        if age_field is not None:
            y += age_field(y)
        y -= _col(model.channel_origin)  # template channel voxel coordinates (1 mm voxels)

        def sample(name: str, coords: np.ndarray) -> np.ndarray:
            return ndimage.map_coordinates(ch[name], coords, order=1, mode="constant", prefilter=False)

        inside = np.flatnonzero(sample("mask", y) >= 0.5)
        index, ijk, coords = index[inside], ijk[:, inside], y[:, inside]
        gm, wm, lost = sample("gm", coords), sample("wm", coords), thinning * sample("loss", coords)
        sums["ventricles"] += float(sample("ventricles", coords).sum())
        sums["gm"] += float(np.clip(gm - lost, 0, None).sum())
        sums["cortical_gm"] += float(np.clip(sample("cortex_gm", coords) - lost, 0, None).sum())
        sums["brain"] += float(np.clip(gm - lost + wm, 0, None).sum())
        sums["mask"] += index.size
        value = sample("t1", coords) - lost * model.gm_csf_contrast
        if nuisance is not None:
            gain = nuisance.intensity_scale
            if nuisance.bias is not None:  # the bias field lives in scanner (subject) space
                world = grid.affine[:3, :3] @ ijk + grid.affine[:3, 3:]
                gain = gain * np.exp(nuisance.bias(world)[0])
            value = value * gain + nuisance.noise_sd * nuisance.rng.standard_normal(value.size)
        out[index] = value * IMAGE_SCALE

    vv = float(np.prod(grid.voxel_mm))
    truth = {
        "ventricle_volume_mm3": sums["ventricles"] * vv,
        "gm_volume_mm3": sums["gm"] * vv,
        "cortical_gm_volume_mm3": sums["cortical_gm"] * vv,
        "brain_volume_mm3": sums["brain"] * vv,
        "icv_mm3": sums["mask"] * vv,
    }
    return out.reshape(grid.shape), truth


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
def draw_subjects(cfg: SynthConfig) -> tuple[list[SubjectParams], list[np.random.SeedSequence]]:
    """The cohort's planted biology and one independent seed per subject, all from ``cfg.seed``.

    Exactly round(n * male_fraction) males (in random order); ages uniform on [age_min, age_max]; log brain
    volume normal with mean +-log(male_volume_ratio)/2 by sex and SD ``volume_sd``; 6-digit HCP-like ids.
    """
    cohort_seed, *subject_seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.n_subjects + 1)
    rng = np.random.default_rng(cohort_seed)
    n = cfg.n_subjects
    n_male = int(round(n * cfg.male_fraction))
    male = rng.permutation(np.arange(n) < n_male)
    ages = rng.uniform(cfg.age_min, cfg.age_max, n)
    half_log_ratio = math.log(cfg.male_volume_ratio) / 2
    log_volume = np.where(male, half_log_ratio, -half_log_ratio) + rng.normal(0.0, cfg.volume_sd, n)
    ids = np.sort(100_000 + rng.choice(900_000, size=n, replace=False))
    subjects = [
        SubjectParams(int(i), "M" if m else "F", float(a), float(lv), 1 if m else -1)
        for i, m, a, lv in zip(ids, male, ages, log_volume)
    ]
    return subjects, subject_seeds


def _effect_maps(model: _Model, cfg: SynthConfig) -> dict[str, np.ndarray]:
    """Noise-free, nuisance-free renderings differenced: the expected image change of each planted effect.

    age: (image at age_max - image at age_min) / (age_max - age_min), sex-neutral and average size, in image
    units per year (the ventricle effect is exponential in age: this is the cohort-average slope).
    sex: male minus female at mid age with each sex's mean size; sex_local: the same at template size.
    """
    mid = (cfg.age_min + cfg.age_max) / 2
    half = math.log(cfg.male_volume_ratio) / 2

    def render(age: float, log_volume: float, sign: int) -> np.ndarray:
        return _render(model, SubjectParams(0, "", age, log_volume, sign), cfg, None)[0]

    neutral_young = render(cfg.age_min, 0.0, 0)
    return {
        "reference_t1w": neutral_young,
        "age_effect": (render(cfg.age_max, 0.0, 0) - neutral_young) / (cfg.age_max - cfg.age_min),
        "sex_effect": render(mid, half, 1) - render(mid, -half, -1),
        "sex_local_effect": render(mid, 0.0, 1) - render(mid, 0.0, -1),
    }


def _summary(model: _Model, cfg: SynthConfig) -> dict:
    span = cfg.age_max - cfg.age_min
    return {
        "description": "Synthetic HCP-like cohort from the MNI152 2009a template with planted effects "
        "(docs/synthetic_cohort.md). Effects are exaggerated relative to real young adults on purpose.",
        "config": dataclasses.asdict(cfg),
        "grid": model.grid.to_dict(),
        "image_scale": IMAGE_SCALE,
        "template_brain_center_mm": model.center_mm.tolist(),
        "template_volumes": model.template_volumes,
        "effects": {
            "sex_global": {
                "male_to_female_volume_ratio": cfg.male_volume_ratio,
                "male_to_female_linear_scale": cfg.male_volume_ratio ** (1 / 3),
                "log_volume_sd": cfg.volume_sd,
                "scaling_center_mm": model.center_mm.tolist(),
            },
            "sex_local": {
                "region": "bilateral temporal poles",
                "centers_mm": [list(c) for c in anatomy.SEX_REGION_CENTERS_MM],
                "sigma_mm": anatomy.SEX_REGION_SIGMA_MM,
                "region_radius_mm": 1.5 * anatomy.SEX_REGION_SIGMA_MM,
                "male_to_female_region_volume_ratio_target": 1 + cfg.local_sex_effect,
                "male_to_female_region_volume_ratio_measured": model.local_ratio_measured,
                "velocity_rate": model.local_rate,
            },
            "age_ventricles": {
                "relative_growth_per_year": cfg.ventricle_growth_per_year,
                "law": "V(age) = V_template * exp(g * (age - age_min)), template = age_min",
                "ratio_oldest_to_youngest": math.exp(cfg.ventricle_growth_per_year * span),
            },
            "age_cortical_gm": {
                "relative_loss_per_year": cfg.gm_thinning_per_year,
                "law": "GM_cortex(age) = GM_cortex_template * exp(-g * (age - age_min)), lost from the pial side",
                "ratio_oldest_to_youngest": math.exp(-cfg.gm_thinning_per_year * span),
            },
        },
        "files": {
            "images": f"<Subject>/{IMAGE_PATHS['T1w'].as_posix()}",
            "unrestricted": SYNTHETIC_CSV,
            "ground_truth": SYNTHETIC_GROUND_TRUTH,
            "effect_maps": f"{SYNTHETIC_EFFECT_MAPS}/*.nii.gz",
        },
    }


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
    log.info("synthetic cohort: %d subjects in %s", len(rows), out)
    return out
