"""`prepare`: cohort -> fixed-size, intensity-normalised volumes on a shared grid (the DVC `prepare` stage).

Per subject (parallel across subjects, joblib):

1. Read the NIfTI as float32 and reorient to the closest canonical RAS orientation (``as_closest_canonical``:
   flips/transposes only, so the array axes follow R, A, S and the block filter below acts along them).
2. Brain mask = voxels > 0: the inputs are brain-extracted (HCP ``*_brain``), background exactly 0. The
   native mask gives its volume in mm^3 (``brain_mask_volume_mm3``), the brain's centre of mass and its
   bounding box (world mm); an affine registration of its outline to the template gives the estimated total
   intracranial volume (``etiv_mm3``, ``data/headsize.py``).
3. Resample onto ``Grid.box(shape, fov_mm, centre of mass)``: the same box in millimetres and the same voxel
   size for every subject, so head size survives (``fit_bbox`` instead stretches each brain's bounding box
   to the box, erasing head size; off by default). Downsampling 0.7 mm -> ~5 mm aliases badly with plain
   interpolation, so we first sum integer blocks of source voxels no wider than a target voxel (an exact
   box filter, cheap because it is a reshape-free ``np.add.reduceat``), then interpolate trilinearly through
   the affines (world coordinates, so any orientation or oblique affine is handled).
4. Robust intensity normalisation: the ``intensity_percentiles`` of the native brain voxels map to [0, 1],
   clipped; stored as float16.

Bad inputs (unreadable/truncated file, 4D image, NaN/Inf voxels, all-zero image, missing file) are rejected
with a reason, printed as a warning and recorded in qc.json.

``subjects.csv`` has one row per accepted subject: :data:`SUBJECT_COLUMNS`, then the covariates given with the
cohort (``data.covariates`` and a positive control's ``planted`` label) under their own names. Ground truth
goes to ``ground_truth/``: a synthetic cohort's table, description and effect maps, or a positive control's
description and ``planted_effect.nii.gz`` (``brainlatent plant``), the maps resampled once, onto the grid the
directions stage compares them on (:func:`effect_map_grid`).

Outputs are written to a temporary folder and renamed into place, so an interrupted run never leaves a
processed folder that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from numpy.lib.format import open_memmap
from scipy import ndimage
from tqdm.auto import tqdm

from brainlatent.config import DataConfig
from brainlatent.data.cohort import AGE_GROUPS, Cohort, Rejection, Subject
from brainlatent.data.headsize import estimate_etiv
from brainlatent.data.hcp import (
    NOT_DOWNLOADED,
    SYNTHETIC_EFFECT_MAPS,
    SYNTHETIC_GROUND_TRUTH,
    load_hcp,
    load_synthetic,
)
from brainlatent.data.layout import SPLITS, SUBJECT_COLUMNS, VOLUME_DTYPE  # noqa: F401  (re-exported)
from brainlatent.data.manifest import PLANTED_LABEL, load_manifest
from brainlatent.grid import Grid

log = logging.getLogger(__name__)

# A positive control's files next to its manifest (written by `brainlatent plant`), copied to ground_truth/.
PLANT_DESCRIPTION = "planted.json"
PLANTED_EFFECT_MAP = "planted_effect.nii.gz"
# Percentiles from every 2nd voxel per axis once a brain has this many voxels: 1/8 of HCP's ~3.5 M brain
# voxels (0.7 mm) still pins the 0.5/99.5 percentiles to well under 1 % and saves ~70 ms per subject.
_PERCENTILE_SUBSAMPLE_ABOVE = 1_000_000


class BadInputError(ValueError):
    """An image that cannot be used. The message is the rejection reason recorded in qc.json."""


# ------------------------------------------------------------------------------------- one volume
@dataclass(frozen=True)
class Brain:
    """A native image in canonical RAS orientation plus what its brain mask tells us (world mm)."""

    data: np.ndarray  # (X, Y, Z) float32, array axes ~ R, A, S (may be a flipped/transposed view)
    affine: np.ndarray  # (4, 4) voxel -> world mm
    n_voxels: int
    center_mm: np.ndarray  # (3,) centre of mass of the mask
    bbox_min_mm: np.ndarray  # (3,) world bounding box of the mask (voxel edges included)
    bbox_max_mm: np.ndarray

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    @property
    def volume_mm3(self) -> float:
        return self.n_voxels * self.voxel_volume_mm3


def read_brain(path: str | Path) -> Brain:
    """Read a brain-extracted 3D NIfTI, reorient it to canonical RAS and measure its mask (voxels > 0).

    Raises BadInputError (message = rejection reason) for anything that is not a usable brain image.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"missing file: {path}")
    try:
        img = nib.load(path)
        shape = img.shape
        if len(shape) > 3 and all(s == 1 for s in shape[3:]):
            img = nib.squeeze_image(img)  # (X, Y, Z, 1) is a 3D volume saved with a time axis
        if len(img.shape) == 4:
            raise BadInputError(f"4D image of shape {tuple(shape)}; expected a single 3D volume")
        if len(img.shape) != 3:
            raise BadInputError(f"image of shape {tuple(shape)}; expected a 3D volume")
        affine = img.affine
        if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise BadInputError(f"invalid affine (singular or non-finite): {affine.tolist()}")
        data = img.get_fdata(dtype=np.float32)
    except BadInputError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoding failure (gzip, header, truncation) is a bad file
        raise BadInputError(f"corrupt or unreadable NIfTI ({type(err).__name__}: {err})") from None

    # One float32 sum detects NaN/Inf cheaply; the exact count is only computed for the error message (and
    # tells a sum that merely overflowed, from huge finite voxels, apart: no warning for that).
    with np.errstate(over="ignore", invalid="ignore"):
        total = data.sum()
    if not np.isfinite(total):
        n_bad = int(np.count_nonzero(~np.isfinite(data)))
        if n_bad:
            raise BadInputError(f"{n_bad} NaN/Inf voxel(s)")
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    data, affine = np.asanyarray(canonical.dataobj), canonical.affine  # views: no copy

    mask = data > 0
    xy = mask.sum(axis=2, dtype=np.int64)  # (X, Y); with the z marginal gives the moments and bounding box
    marginals = (xy.sum(axis=1), xy.sum(axis=0), mask.sum(axis=(0, 1), dtype=np.int64))
    n_voxels = int(marginals[0].sum())
    if n_voxels == 0:
        if not np.any(data):
            raise BadInputError("all-zero image")
        raise BadInputError("no positive voxels; expected a brain-extracted image with background 0")
    center_vox = np.array([(np.arange(m.size) * m).sum() / n_voxels for m in marginals])
    lo_vox = np.array([np.flatnonzero(m)[0] for m in marginals]) - 0.5
    hi_vox = np.array([np.flatnonzero(m)[-1] for m in marginals]) + 0.5
    edges = np.stack([lo_vox, hi_vox])  # (2, 3); the 8 corners cover oblique affines too
    corners_vox = np.array([[edges[b, k] for k, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
    corners_mm = nib.affines.apply_affine(affine, corners_vox)
    return Brain(
        data=data,
        affine=affine,
        n_voxels=n_voxels,
        center_mm=nib.affines.apply_affine(affine, center_vox),
        bbox_min_mm=corners_mm.min(axis=0),
        bbox_max_mm=corners_mm.max(axis=0),
    )


def resample_to_grid(data: np.ndarray, affine: np.ndarray, grid: Grid) -> np.ndarray:
    """Anti-aliased resampling of ``data`` (voxel -> world ``affine``) onto ``grid``; outside is 0.

    ``data`` (X, Y, Z) should be in canonical orientation (array axes ~ world axes) for the box filter to act
    along the right axes. Returns (grid.shape) float32.
    """
    data = np.asarray(data, dtype=np.float32)
    src_voxel = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # Largest integer block of source voxels not wider than a target voxel (1 = upsampling, no filter).
    factors = np.maximum(1, np.floor(grid.voxel_mm / src_voxel + 1e-3)).astype(int)
    with np.errstate(over="ignore", invalid="ignore"):  # checked just below
        blocks = _block_sums(data, factors)
    if factors.prod() > 1 and not np.isfinite(blocks).all():
        # float32 sums of finite voxels near float32's maximum overflow (inf, or NaN where they meet a huge
        # negative background); redo them in float64, which only such pathological images pay for.
        blocks = _block_sums(data, factors, np.float64)
    if factors.prod() > 1:
        blocks = blocks / np.float32(factors.prod())
    # Block j's centre sits at source voxel j*f + (f-1)/2.
    block_to_src = np.diag([*factors.astype(float), 1.0])
    block_to_src[:3, 3] = (factors - 1) / 2.0
    target_to_block = np.linalg.inv(affine @ block_to_src) @ grid.affine
    matrix = target_to_block[:3, :3]
    if np.allclose(matrix, np.diag(np.diag(matrix)), rtol=0, atol=1e-9 * np.abs(matrix).max()):
        matrix = np.diag(matrix)  # axis-aligned (the usual case): scipy's faster separable path
    return ndimage.affine_transform(
        blocks,
        matrix,
        offset=target_to_block[:3, 3],
        output_shape=grid.shape,
        order=1,
        # "grid-constant", not "constant": scipy's "constant" returns cval for any sample past the outermost
        # voxel centre instead of interpolating towards it, so a brain touching the array edge lost its last
        # half voxel and a 1e-7 mm change of the affine could flip an edge sample from ~0.4 to 0.
        mode="grid-constant",
        cval=0.0,
        prefilter=False,
    ).astype(np.float32, copy=False)


def _block_sums(data: np.ndarray, factors: np.ndarray, dtype=None) -> np.ndarray:
    """Sums of ``factors``-sized blocks of ``data`` (no sums along axes whose factor is 1)."""
    blocks = data
    # Slowest-varying memory axis first: whole slabs add up fast and shrink the array for the other axes.
    for axis in np.argsort([-abs(st) for st in data.strides], kind="stable"):
        f = factors[axis]
        if f > 1:
            # Sums over [i, i+f); the last, partial block sums fewer voxels: dividing every block by f below
            # treats the missing ones as background 0, which keeps the geometry exact without padding.
            blocks = np.add.reduceat(blocks, np.arange(0, blocks.shape[axis], f), axis=axis, dtype=dtype)
    return blocks


def intensity_range(brain: Brain, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The (low, high) percentiles of the native brain voxels; low falls back to 0 for flat images."""
    data = brain.data
    if brain.n_voxels > _PERCENTILE_SUBSAMPLE_ABOVE:
        data = data[::2, ::2, ::2]
    values = data[data > 0]
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    if hi - lo <= 1e-6 * hi:  # constant-intensity brain (phantoms, masks): map [0, hi] -> [0, 1] instead
        lo = 0.0
    return lo, hi


@dataclass(frozen=True)
class SubjectQC:
    """What preprocessing measured on one subject (everything but the volume)."""

    brain_mask_volume_mm3: float  # native mask volume
    etiv_mm3: float  # estimated total intracranial volume (data/headsize.py)
    etiv_fit_rms_mm: float  # how well the affine fitted the brain's outline
    center_mm: tuple[float, float, float]  # native mask centre of mass, world RAS
    intensity_low: float  # the intensity percentiles mapped to 0 and 1
    intensity_high: float
    fov_overflow_mm: float  # how far the brain's bounding box sticks out of the box (0 = fully inside)


def subject_grid(brain: Brain, shape, fov_mm, fit_bbox: bool) -> Grid:
    """The box a subject is resampled onto: fixed ``fov_mm`` at its centre of mass, or its bounding box."""
    if fit_bbox:
        return Grid.box(shape, brain.bbox_max_mm - brain.bbox_min_mm, (brain.bbox_min_mm + brain.bbox_max_mm) / 2)
    return Grid.box(shape, fov_mm, brain.center_mm)


def preprocess_image(
    path: str | Path,
    shape: tuple[int, int, int],
    fov_mm: tuple[float, float, float],
    percentiles: tuple[float, float] = (0.5, 99.5),
    fit_bbox: bool = False,
    head_size: bool = True,
) -> tuple[np.ndarray, SubjectQC]:
    """Read, reorient, resample and normalise one brain-extracted T1w image.

    Returns the (shape) float16 volume in [0, 1] and its QC measures (``head_size=False``: no eTIV, NaN).
    Raises BadInputError, also when the affine registration behind the eTIV folds (not a brain).
    """
    brain = read_brain(path)
    grid = subject_grid(brain, shape, fov_mm, fit_bbox)
    lo, hi = intensity_range(brain, percentiles)
    etiv_mm3 = fit_rms_mm = math.nan
    if head_size:
        try:
            head = estimate_etiv(brain.data > 0, brain.affine, brain.center_mm)
        except ValueError as err:
            raise BadInputError(f"head size: {err}") from None
        etiv_mm3, fit_rms_mm = head.etiv_mm3, head.rms_mm
    volume = resample_to_grid(brain.data, brain.affine, grid)
    volume = np.clip((volume - lo) / (hi - lo), 0.0, 1.0)
    half = grid.fov_mm / 2
    overflow = np.maximum(brain.bbox_max_mm - (grid.center_mm + half), (grid.center_mm - half) - brain.bbox_min_mm)
    qc = SubjectQC(
        brain_mask_volume_mm3=brain.volume_mm3,
        etiv_mm3=etiv_mm3,
        etiv_fit_rms_mm=fit_rms_mm,
        center_mm=tuple(float(c) for c in brain.center_mm),
        intensity_low=lo,
        intensity_high=hi,
        fov_overflow_mm=float(max(0.0, overflow.max())),
    )
    return volume.astype(VOLUME_DTYPE), qc


def _process_subject(subject: Subject, cfg: DataConfig) -> tuple[np.ndarray, SubjectQC] | str:
    """Worker: the processed subject, or the rejection reason (one bad input must not stop the cohort)."""
    try:
        return preprocess_image(subject.image_path, cfg.shape, cfg.fov_mm, cfg.intensity_percentiles, cfg.fit_bbox)
    except BadInputError as err:
        return str(err)


# ------------------------------------------------------------------------------------------ splits
def assign_splits(strata: list[str], fractions: tuple[float, float, float], seed: int) -> np.ndarray:
    """Seeded split labels (train/val/test) stratified by ``strata`` (e.g. ``"F/26-30"``), one per subject."""
    return np.array(SPLITS, dtype=object)[deal_groups(strata, fractions, seed)]


def deal_groups(strata: list[str], fractions, seed: int) -> np.ndarray:
    """Seeded group indices (0..len(fractions)-1), stratified by ``strata``, one per subject.

    Subjects are ordered by stratum (seeded random order within each) and dealt out one at a time, each to
    the group furthest below its target share so far. A stratum is a contiguous run of that order, so it
    gets its proportional share +-1 subject, and the totals match ``fractions`` to within one subject. We
    write this ourselves because per-stratum rounding and scikit-learn's stratified splitters break on
    strata of one or two subjects, which small cohorts always have.
    """
    n = len(strata)
    tie_break = np.random.default_rng(seed).permutation(n)
    order = sorted(range(n), key=lambda i: (strata[i], tie_break[i]))
    target = np.asarray(fractions, dtype=float)
    dealt = np.zeros(len(target))
    groups = np.empty(n, dtype=np.int64)
    for k, i in enumerate(order, start=1):
        # The deficits sum to 1 > 0, so a group with fraction 0 (deficit 0) is never chosen.
        g = int(np.argmax(target * k - dealt))
        dealt[g] += 1
        groups[i] = g
    return groups


# ----------------------------------------------------------------------------------------- prepare
@dataclass
class PrepareResult:
    out_dir: Path
    n_accepted: int
    n_rejected: int  # every rejection, including CSV rows of subjects not downloaded
    rejected: list[Rejection]
    grid: Grid  # the reference grid written to grid.json


def _resolve(path: str | Path, root: Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else root / path


def load_cohort(cfg: DataConfig, project_root: Path | None = None) -> Cohort:
    """The cohort ``cfg.source`` points at (paths relative to ``project_root``, default cwd)."""
    root = Path.cwd() if project_root is None else Path(project_root)
    path = _resolve(cfg.path, root)
    clash = sorted(set(cfg.covariates) & set(SUBJECT_COLUMNS))
    if clash:
        raise ValueError(f"data.covariates {clash}: these names are subjects.csv's own columns; rename them")
    if cfg.source == "synthetic":
        return load_synthetic(path, cfg.covariates)
    if cfg.source == "hcp":
        assert cfg.hcp_csv is not None  # DataConfig validation guarantees it
        return load_hcp(path, _resolve(cfg.hcp_csv, root), image=cfg.hcp_image, covariates=cfg.covariates)
    return load_manifest(path, cfg.covariates)


def prepare(cfg: DataConfig, project_root: Path | None = None) -> PrepareResult:
    """Load the cohort, preprocess every subject and write ``cfg.processed_dir`` (see the module docstring).

    Raises ValueError when no subject is left or the rejected fraction exceeds ``cfg.max_rejected_fraction``
    (nothing is written then).
    """
    started = time.perf_counter()
    root = Path.cwd() if project_root is None else Path(project_root)
    cohort = load_cohort(cfg, root)
    out_dir = _resolve(cfg.processed_dir, root)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"data.processed_dir {out_dir} exists and is not a folder")
    for r in cohort.rejected:
        if not r.reason.startswith(NOT_DOWNLOADED):
            log.warning("rejected subject %s: %s", r.subject_id or "<no id>", r.reason)
    n_not_downloaded = sum(r.reason.startswith(NOT_DOWNLOADED) for r in cohort.rejected)
    if n_not_downloaded:
        log.info("%d subject(s) of the CSV are not in %s (not downloaded)", n_not_downloaded, cfg.path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the final folder gets ordinary permissions
    try:
        accepted, qcs, rejected = _process_cohort(cohort, cfg, tmp)
        rejected = cohort.rejected + rejected
        _check_counts(len(accepted), rejected, cfg.max_rejected_fraction)
        strata = [f"{s.sex}/{s.age_group}" for s in accepted]
        splits = assign_splits(strata, cfg.split_fractions, cfg.seed)
        centers = np.array([q.center_mm for q in qcs])
        grid = Grid.box(cfg.shape, cfg.fov_mm, centers.mean(axis=0))
        grid.save(tmp / "grid.json")
        subjects = _subjects_table(accepted, qcs, splits)
        subjects.to_csv(tmp / "subjects.csv", index=False)
        volumes = np.load(tmp / "volumes.npy", mmap_mode="r")
        _write_montage(volumes, subjects, cfg.qc_subjects, grid, tmp / "qc_montage.png")
        del volumes
        if cohort.source == "synthetic":
            _write_ground_truth(_resolve(cfg.path, root), tmp / "ground_truth", effect_map_grid(grid))
        elif PLANTED_LABEL in subjects.columns:
            _write_planted_truth(_resolve(cfg.path, root).parent, tmp / "ground_truth", effect_map_grid(grid))
        qc = _qc_report(cfg, cohort, subjects, qcs, rejected, grid, time.perf_counter() - started)
        (tmp / "qc.json").write_text(json.dumps(qc, indent=2))
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %d subjects (%d rejected) into %s", len(accepted), len(rejected), out_dir)
    return PrepareResult(out_dir, len(accepted), len(rejected), rejected, grid)


def _process_cohort(
    cohort: Cohort, cfg: DataConfig, tmp: Path
) -> tuple[list[Subject], list[SubjectQC], list[Rejection]]:
    """Preprocess every subject in parallel, streaming volumes to ``tmp/volumes.npy`` (accepted rows only)."""
    n = len(cohort.subjects)
    # Rows are written as results arrive (never the whole cohort in memory), then compacted if any failed.
    staging = tmp / "volumes_all.npy"
    rows = open_memmap(staging, mode="w+", dtype=VOLUME_DTYPE, shape=(max(n, 1), *cfg.shape))
    accepted: list[tuple[int, Subject, SubjectQC]] = []
    rejected: list[Rejection] = []
    jobs = (delayed(_process_subject)(s, cfg) for s in cohort.subjects)
    parallel = Parallel(n_jobs=max(1, min(cfg.workers, n)), return_as="generator")
    results = tqdm(parallel(jobs), total=n, desc="prepare", unit="subject", disable=n == 0)
    for i, result in enumerate(results):  # joblib's generator keeps submission order
        subject = cohort.subjects[i]
        if isinstance(result, str):
            log.warning("rejected subject %s: %s", subject.subject_id, result)
            rejected.append(Rejection(subject.subject_id, result))
            continue
        volume, qc = result
        rows[i] = volume
        accepted.append((i, subject, qc))
        if qc.fov_overflow_mm > 0 and not cfg.fit_bbox:
            log.warning(
                "subject %s: brain extends %.1f mm beyond data.fov_mm %s (cut off)",
                subject.subject_id, qc.fov_overflow_mm, list(cfg.fov_mm),
            )  # fmt: skip
    rows.flush()
    keep = [i for i, _, _ in accepted]
    if not keep:  # nothing to write; prepare() reports the error
        del rows
        staging.unlink()
    elif len(keep) == n:
        del rows
        staging.rename(tmp / "volumes.npy")
    else:
        out = open_memmap(tmp / "volumes.npy", mode="w+", dtype=VOLUME_DTYPE, shape=(len(keep), *cfg.shape))
        for j, i in enumerate(keep):
            out[j] = rows[i]
        out.flush()
        del rows, out
        staging.unlink()
    return [s for _, s, _ in accepted], [q for _, _, q in accepted], rejected


def _check_counts(n_accepted: int, rejected: list[Rejection], max_fraction: float) -> None:
    counted = [r for r in rejected if not r.reason.startswith(NOT_DOWNLOADED)]
    total = n_accepted + len(counted)
    reasons = Counter(r.reason.split(":")[0] for r in counted)
    summary = ", ".join(f"{k} ({v})" for k, v in reasons.most_common())
    examples = "; ".join(f"{r.subject_id}: {r.reason}" for r in counted[:5])
    if n_accepted == 0:
        raise ValueError(
            f"no subject left to train on: {len(counted)} rejected ({summary or 'no subjects found'})"
            + (f". First: {examples}" if examples else "")
        )
    fraction = len(counted) / total
    if fraction > max_fraction:
        raise ValueError(
            f"{len(counted)} of {total} subjects rejected ({fraction:.0%}), more than "
            f"data.max_rejected_fraction={max_fraction}: {summary}. First: {examples}"
        )


def _subjects_table(subjects: list[Subject], qcs: list[SubjectQC], splits: np.ndarray) -> pd.DataFrame:
    covariates = list(dict.fromkeys(name for s in subjects for name in s.covariates))  # the loader's order
    table = pd.DataFrame(
        {
            "index": np.arange(len(subjects)),
            "subject_id": [s.subject_id for s in subjects],
            "sex": [s.sex for s in subjects],
            "age_group": [s.age_group for s in subjects],
            "age": [s.age if s.age is not None else math.nan for s in subjects],
            "brain_mask_volume_mm3": [round(q.brain_mask_volume_mm3, 1) for q in qcs],
            "etiv_mm3": [round(q.etiv_mm3, 1) for q in qcs],
            "split": splits,
            "center_x_mm": [round(q.center_mm[0], 3) for q in qcs],
            "center_y_mm": [round(q.center_mm[1], 3) for q in qcs],
            "center_z_mm": [round(q.center_mm[2], 3) for q in qcs],
        },
        columns=list(SUBJECT_COLUMNS),
    )
    for name in covariates:
        table[name] = [s.covariates[name] for s in subjects]
    if PLANTED_LABEL in table.columns:
        table[PLANTED_LABEL] = table[PLANTED_LABEL].astype(int)
    return table


def _write_montage(volumes: np.ndarray, subjects: pd.DataFrame, n: int, grid: Grid, path: Path) -> None:
    from brainlatent.viz.montage import triplanar_montage  # matplotlib only when writing figures

    picks = np.unique(np.linspace(0, len(subjects) - 1, min(n, len(subjects))).round().astype(int))
    rows = subjects.iloc[picks]
    titles = [f"{r.subject_id} {r.sex} {r.age_group} ({r.split})" for r in rows.itertuples()]
    triplanar_montage(np.asarray(volumes[picks], dtype=np.float32), titles, path, affine=grid.affine)


def effect_map_grid(grid: Grid) -> Grid:
    """The grid planted effect maps are compared on: the processing box centred on the template brain.

    Template-space maps line up with processed volumes (each centred on its own brain) when the box is centred
    on the template's brain; ``anatomy.load_effect_map`` reads a map already on this grid unchanged, so the
    maps ``prepare`` writes here are resampled once, not a second time in every directions stage.
    """
    from brainlatent.anatomy import load_template  # a few seconds once; only cohorts with ground truth

    return grid.centered_at(load_template().center_mm)


def _write_ground_truth(src_root: Path, out: Path, grid: Grid) -> None:
    """Synthetic cohort: copy ground_truth.csv (and *.json); resample the effect maps onto ``grid``."""
    out.mkdir()
    shutil.copy2(src_root / SYNTHETIC_GROUND_TRUTH, out / SYNTHETIC_GROUND_TRUTH)
    for description in src_root.glob("*.json"):  # the generator's parameters and summary
        shutil.copy2(description, out / description.name)
    maps = sorted((src_root / SYNTHETIC_EFFECT_MAPS).glob("*.nii*"))
    if not maps:
        log.warning("no effect maps in %s", src_root / SYNTHETIC_EFFECT_MAPS)
    for path in maps:
        name = path.name if path.name.endswith(".nii.gz") else f"{path.name.removesuffix('.nii')}.nii.gz"
        _write_effect_map(path, out / name, grid)


def _write_planted_truth(src_dir: Path, out: Path, grid: Grid) -> None:
    """Positive control (a manifest with a ``planted`` column): its description and its effect map."""
    description = src_dir / PLANT_DESCRIPTION
    if not description.is_file():
        log.warning("the manifest has a %r column but %s is missing: no planted ground truth", PLANTED_LABEL,
                    description)  # fmt: skip
        return
    out.mkdir()
    shutil.copy2(description, out / PLANT_DESCRIPTION)
    effect_map = src_dir / PLANTED_EFFECT_MAP
    if not effect_map.is_file():
        raise ValueError(f"{description} describes a positive control but {effect_map} is missing")
    _write_effect_map(effect_map, out / PLANTED_EFFECT_MAP, grid)


def _write_effect_map(path: Path, out: Path, grid: Grid) -> None:
    """Resample a 3D effect map (its own template affine, via world coordinates) onto ``grid``."""
    from brainlatent.viz.montage import save_nifti

    img = nib.as_closest_canonical(nib.squeeze_image(nib.load(path)))
    if img.ndim != 3:
        raise ValueError(f"{path}: effect maps must be 3D volumes, got shape {img.shape}")
    save_nifti(resample_to_grid(img.get_fdata(dtype=np.float32), img.affine, grid), grid.affine, out)


def _summary(values) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max()), "mean": float(v.mean()),
            "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0}  # fmt: skip


def _qc_report(
    cfg: DataConfig,
    cohort: Cohort,
    subjects: pd.DataFrame,
    qcs: list[SubjectQC],
    rejected: list[Rejection],
    grid: Grid,
    elapsed_s: float,
) -> dict:
    not_downloaded = sum(r.reason.startswith(NOT_DOWNLOADED) for r in rejected)
    counted = len(rejected) - not_downloaded
    return {
        "source": cohort.source,
        "path": cfg.path,
        "counts": {
            "accepted": len(subjects),
            "rejected": counted,
            "not_downloaded": not_downloaded,
            "rejected_fraction": counted / (len(subjects) + counted),
            "split": {s: int((subjects["split"] == s).sum()) for s in SPLITS},
            "sex": {s: int((subjects["sex"] == s).sum()) for s in ("F", "M")},
            "age_group": {g: int((subjects["age_group"] == g).sum()) for g in AGE_GROUPS},
        },
        "rejected": [{"subject_id": r.subject_id, "reason": r.reason} for r in rejected],
        "intensity": {
            "percentiles": list(cfg.intensity_percentiles),
            "low": _summary([q.intensity_low for q in qcs]),
            "high": _summary([q.intensity_high for q in qcs]),
        },
        **{
            column: {
                sex: _summary(subjects.loc[subjects["sex"] == sex, column])
                for sex in ("F", "M")
                if (subjects["sex"] == sex).any()
            }
            for column in ("brain_mask_volume_mm3", "etiv_mm3")
        },
        "etiv_fit_rms_mm": _summary([q.etiv_fit_rms_mm for q in qcs]),
        "fov_overflow_mm": {
            sid: round(q.fov_overflow_mm, 2)
            for sid, q in zip(subjects["subject_id"], qcs)
            if q.fov_overflow_mm > 0 and not cfg.fit_bbox
        },
        "grid": grid.to_dict(),
        "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
        "elapsed_s": round(elapsed_s, 2),
    }


def swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` folder with renames (same file system, near-atomic)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
