"""Preprocessing geometry, intensities, splits, outputs, the dataset and the montage on tiny ellipsoid brains."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from brainlatent.anatomy import load_effect_map
from brainlatent.config import DataConfig
from brainlatent.data.cohort import AGE_GROUPS
from brainlatent.data.dataset import ProcessedData, VolumeDataset
from brainlatent.data.preprocess import (
    SUBJECT_COLUMNS,
    assign_splits,
    effect_map_grid,
    prepare,
    preprocess_image,
    read_brain,
    resample_to_grid,
)
from brainlatent.grid import Grid

SHAPE = (16, 20, 16)
FOV = (96.0, 120.0, 96.0)  # 6 mm voxels


def las_affine(shape, voxel: float) -> np.ndarray:
    """HCP-like LAS affine (x flipped) whose array centre sits at world (0, 0, 0)."""
    affine = np.diag([-voxel, voxel, voxel, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def ellipsoid(
    radii_mm=(30.0, 38.0, 30.0), center_mm=(2.0, -8.0, 10.0), voxel=1.5, shape=(64, 80, 64), value=None
) -> nib.Nifti1Image:
    """A brain-extracted phantom: ``value(world xyz (3, ...)) `` inside an ellipsoid (100 if None), 0 outside."""
    affine = las_affine(shape, voxel)
    world = np.einsum("ij,j...->i...", affine[:3, :3], np.indices(shape, dtype=float)) + affine[:3, 3, None, None, None]
    inside = ((((world.T - np.asarray(center_mm)) / np.asarray(radii_mm)) ** 2).sum(-1) < 1).T
    fill = np.full(shape, 100.0) if value is None else value(world)
    return nib.Nifti1Image(np.where(inside, fill, 0).astype(np.float32), affine)


def save(img: nib.Nifti1Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def manifest_cohort(tmp_path: Path, n: int = 12, **cfg) -> DataConfig:
    """``n`` ellipsoid subjects of varying size, cycling sex and age group, as a manifest + DataConfig."""
    rows = []
    for i in range(n):
        scale = 0.9 + 0.2 * i / max(n - 1, 1)
        img = ellipsoid(radii_mm=(24 * scale, 30 * scale, 24 * scale), voxel=2.0, shape=(40, 48, 40))
        save(img, tmp_path / "scans" / f"s{i:02d}.nii.gz")
        rows.append((f"s{i:02d}", f"scans/s{i:02d}.nii.gz", "FM"[i % 2], AGE_GROUPS[(i // 2) % 4]))
    pd.DataFrame(rows, columns=["subject", "path", "sex", "age"]).to_csv(tmp_path / "manifest.csv", index=False)
    defaults = dict(source="manifest", path=str(tmp_path / "manifest.csv"), processed_dir=str(tmp_path / "processed"),
                    shape=SHAPE, fov_mm=FOV, workers=1, qc_subjects=3)  # fmt: skip
    return DataConfig(**{**defaults, **cfg})


# ------------------------------------------------------------------------------------------ geometry
def test_head_size_survives_preprocessing(tmp_path):
    small = save(ellipsoid(), tmp_path / "small.nii.gz")
    large = save(ellipsoid(radii_mm=tuple(1.1 * r for r in (30.0, 38.0, 30.0))), tmp_path / "large.nii.gz")
    v_small, qc_small = preprocess_image(small, SHAPE, FOV)
    v_large, qc_large = preprocess_image(large, SHAPE, FOV)
    # Flat-intensity phantoms normalise to 1 inside, so the sum is the brain volume in voxels (partial volume
    # included).
    ratio = v_large.astype(float).sum() / v_small.astype(float).sum()
    assert ratio == pytest.approx(1.1**3, rel=0.03)
    assert qc_large.brain_mask_volume_mm3 / qc_small.brain_mask_volume_mm3 == pytest.approx(1.1**3, rel=0.03)
    assert qc_small.brain_mask_volume_mm3 == pytest.approx(4 / 3 * np.pi * 30 * 38 * 30, rel=0.03)
    # The explicit fit_bbox option stretches both brains to the box and erases the difference.
    b_small, _ = preprocess_image(small, SHAPE, FOV, fit_bbox=True)
    b_large, _ = preprocess_image(large, SHAPE, FOV, fit_bbox=True)
    assert b_large.astype(float).sum() / b_small.astype(float).sum() == pytest.approx(1.0, abs=0.03)


def test_centre_of_mass_is_measured_in_world_mm(tmp_path):
    path = save(ellipsoid(center_mm=(6.0, -12.0, 9.0)), tmp_path / "b.nii.gz")
    brain = read_brain(path)
    np.testing.assert_allclose(brain.center_mm, (6.0, -12.0, 9.0), atol=0.2)
    volume, qc = preprocess_image(path, SHAPE, FOV)
    # The brain sits in the middle of its box whatever its position in the scanner.
    com = np.array(ndimage.center_of_mass(volume.astype(float)))
    np.testing.assert_allclose(com, (np.asarray(SHAPE) - 1) / 2, atol=0.1)
    assert qc.fov_overflow_mm == 0


def test_output_is_ras_whatever_the_stored_orientation(tmp_path):
    # Intensity grows towards the right (+x) and anterior (+y): visible after preprocessing in RAS order.
    img = ellipsoid(value=lambda w: 100 + w[0] + 0.5 * w[1])
    las = save(img, tmp_path / "las.nii.gz")
    data, affine = np.asanyarray(img.dataobj), img.affine
    # The same world content stored as (y, x, z) with the affine's columns swapped accordingly.
    swapped = save(nib.Nifti1Image(data.transpose(1, 0, 2).copy(), affine[:, [1, 0, 2, 3]]), tmp_path / "yxz.nii.gz")
    a, _ = preprocess_image(las, SHAPE, FOV)
    b, _ = preprocess_image(swapped, SHAPE, FOV)
    np.testing.assert_allclose(a.astype(float), b.astype(float), atol=2e-3)
    x, y = SHAPE[0] // 2, SHAPE[1] // 2
    assert a[x:].astype(float).sum() > 1.2 * a[:x].astype(float).sum()  # right brighter
    assert a[:, y:].astype(float).sum() > 1.05 * a[:, :y].astype(float).sum()  # anterior brighter


def test_downsampling_is_anti_aliased():
    # A 1-voxel checkerboard (period 2 mm at 1 mm voxels) must average out on a 5 mm grid.
    shape = (60, 60, 60)
    checker = (np.indices(shape).sum(0) % 2) * 100.0 + 50.0
    affine = np.eye(4)
    grid = Grid.box((12, 12, 12), (60.0, 60.0, 60.0), (29.5, 29.5, 29.5))
    out = resample_to_grid(checker.astype(np.float32), affine, grid)
    core = out[2:-2, 2:-2, 2:-2]
    assert core.std() / core.mean() < 0.02
    # Plain trilinear sampling of the same grid aliases the checkerboard into a strong pattern.
    m = np.linalg.inv(affine) @ grid.affine
    naive = ndimage.affine_transform(checker, m[:3, :3], m[:3, 3], output_shape=grid.shape, order=1)[2:-2, 2:-2, 2:-2]
    assert naive.std() / naive.mean() > 0.2


def test_intensity_is_robustly_normalised(tmp_path):
    rng = np.random.default_rng(0)
    img = ellipsoid(value=lambda w: 300 + 40 * rng.standard_normal(w.shape[1:]))
    img.dataobj[10, 10, 10] = 1e5  # one hot voxel must not squash the contrast (it is not a brain voxel either)
    volume, qc = preprocess_image(save(img, tmp_path / "n.nii.gz"), SHAPE, FOV, percentiles=(1.0, 99.0))
    assert volume.dtype == np.float16 and volume.min() >= 0 and volume.max() <= 1
    assert 300 - 40 * 2.5 < qc.intensity_low < 300 - 40 * 2.2 and 300 + 40 * 2.2 < qc.intensity_high < 300 + 40 * 2.5
    centre = volume[6:10, 8:12, 6:10].astype(float)
    assert 0.45 < centre.mean() < 0.55  # the mean brain intensity maps mid-range


# ------------------------------------------------------------------------------------------- splits
def test_splits_are_stratified_disjoint_and_seeded():
    strata = [f"{sex}/{age}" for sex in "FM" for age in AGE_GROUPS for _ in range(10)]  # 8 strata x 10
    labels = assign_splits(strata, (0.7, 0.15, 0.15), seed=3)
    counts = pd.Series(labels).value_counts()
    assert counts.to_dict() == {"train": 56, "val": 12, "test": 12}
    per_stratum = pd.crosstab(pd.Series(strata), pd.Series(labels))
    assert per_stratum["train"].between(6, 8).all() and per_stratum["val"].between(1, 2).all()
    assert per_stratum["test"].between(1, 2).all()
    assert (assign_splits(strata, (0.7, 0.15, 0.15), seed=3) == labels).all()
    assert (assign_splits(strata, (0.7, 0.15, 0.15), seed=4) != labels).any()


def test_splits_work_with_tiny_strata():
    strata = ["F/22-25", "F/26-30", "M/31-35", "M/36+", "F/36+"]  # five strata of one subject
    labels = assign_splits(strata, (0.6, 0.2, 0.2), seed=0)
    assert sorted(pd.Series(labels).value_counts().to_dict().items()) == [("test", 1), ("train", 3), ("val", 1)]
    assert set(assign_splits(strata, (1.0, 0.0, 0.0), seed=0)) == {"train"}


# ------------------------------------------------------------------------------------------ prepare
def test_prepare_writes_the_data_contract(tmp_path):
    cfg = manifest_cohort(tmp_path, n=12)
    result = prepare(cfg)
    out = tmp_path / "processed"
    assert (result.out_dir, result.n_accepted, result.n_rejected) == (out, 12, 0)
    volumes = np.load(out / "volumes.npy", mmap_mode="r")
    assert volumes.shape == (12, *SHAPE) and volumes.dtype == np.float16
    assert 0 <= volumes.min() and volumes.max() <= 1
    subjects = pd.read_csv(out / "subjects.csv", dtype={"subject_id": str})
    assert tuple(subjects.columns) == SUBJECT_COLUMNS
    assert list(subjects["index"]) == list(range(12))
    assert set(subjects["split"]) == {"train", "val", "test"}
    # Brain volume grows with the phantom's scale (0.9 -> 1.1, i.e. x1.83 in volume).
    assert subjects["brain_mask_volume_mm3"].iloc[-1] / subjects["brain_mask_volume_mm3"].iloc[0] == pytest.approx(
        (1.1 / 0.9) ** 3, rel=0.05
    )
    # eTIV: an affine image of one shape, so it scales exactly like the mask volume.
    etiv = subjects["etiv_mm3"].to_numpy()
    assert etiv[-1] / etiv[0] == pytest.approx((1.1 / 0.9) ** 3, rel=0.02)
    grid = Grid.load(out / "grid.json")
    assert grid.shape == SHAPE
    np.testing.assert_allclose(grid.voxel_mm, 6.0)
    centers = subjects[["center_x_mm", "center_y_mm", "center_z_mm"]].to_numpy()
    np.testing.assert_allclose(grid.center_mm, centers.mean(axis=0), atol=1e-3)
    qc = json.loads((out / "qc.json").read_text())
    assert qc["counts"]["accepted"] == 12 and qc["counts"]["split"] == subjects["split"].value_counts().to_dict()
    assert qc["config"]["shape"] == list(SHAPE)
    assert (out / "qc_montage.png").stat().st_size > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".processed")]  # no temp folders left

    # Re-running is deterministic and replaces the folder.
    before = np.array(volumes)
    prepare(cfg)
    np.testing.assert_array_equal(np.load(out / "volumes.npy"), before)
    assert (pd.read_csv(out / "subjects.csv")["split"] == subjects["split"]).all()


def test_prepare_in_parallel_matches_serial(tmp_path):
    serial = prepare(manifest_cohort(tmp_path, n=6, processed_dir=str(tmp_path / "serial"))).out_dir
    parallel = prepare(manifest_cohort(tmp_path, n=6, processed_dir=str(tmp_path / "parallel"), workers=2)).out_dir
    np.testing.assert_array_equal(np.load(serial / "volumes.npy"), np.load(parallel / "volumes.npy"))


def test_relative_paths_resolve_against_project_root(tmp_path):
    cfg = manifest_cohort(tmp_path, n=4, path="manifest.csv", processed_dir="out/processed")
    result = prepare(cfg, project_root=tmp_path)
    assert result.out_dir == tmp_path / "out" / "processed" and (result.out_dir / "volumes.npy").is_file()


def test_synthetic_ground_truth_is_resampled_once_onto_the_grid_it_is_compared_on(tmp_path):
    root = tmp_path / "synthetic"
    rows = []
    for i in range(4):
        sid = f"S{i:04d}"
        brain = ellipsoid(voxel=2.0, shape=(40, 48, 40), radii_mm=(24, 30, 24))
        save(brain, root / sid / "T1w" / "T1w_acpc_dc_restore_brain.nii.gz")
        rows.append((sid, "FM"[i % 2], AGE_GROUPS[i % 4]))
    pd.DataFrame(rows, columns=["Subject", "Gender", "Age"]).to_csv(root / "unrestricted_synthetic.csv", index=False)
    (root / "ground_truth.csv").write_text("Subject,age\nS0000,24\n")
    (root / "cohort.json").write_text("{}")
    # Template-space map on its own 1 mm RAS grid: a blob at world (20, -10, 10) mm.
    shape = (80, 90, 80)
    affine = np.diag([1.0, 1, 1, 1])
    affine[:3, 3] = (-40, -50, -30)
    world = np.indices(shape).transpose(1, 2, 3, 0) + affine[:3, 3]
    blob = np.exp(-(((world - (20, -10, 10)) ** 2).sum(-1)) / (2 * 6.0**2)).astype(np.float32)
    save(nib.Nifti1Image(blob, affine), root / "effect_maps" / "sex_local.nii.gz")

    cfg = DataConfig(source="synthetic", path=str(root), processed_dir=str(tmp_path / "processed"),
                     shape=SHAPE, fov_mm=FOV, workers=1, qc_subjects=2)  # fmt: skip
    prepare(cfg)
    data = ProcessedData.open(tmp_path / "processed")
    gt = data.ground_truth_dir
    assert gt is not None and (gt / "ground_truth.csv").read_text() == "Subject,age\nS0000,24\n"
    assert (gt / "cohort.json").is_file()
    assert data.subjects["age"].iloc[0] == 24 and data.subjects["age"].iloc[1:].isna().all()
    img = nib.load(gt / "sex_local.nii.gz")
    assert img.shape == SHAPE and np.allclose(img.affine, effect_map_grid(data.grid).affine)
    assert not np.allclose(img.affine, data.grid.affine)  # the template-centred box, not the cohort's
    # The directions stage reads it as written: no second resampling.
    np.testing.assert_array_equal(load_effect_map(gt / "sex_local.nii.gz", data.grid), img.get_fdata(dtype=np.float32))
    peak_vox = np.unravel_index(np.argmax(img.get_fdata()), SHAPE)
    peak_mm = nib.affines.apply_affine(img.affine, peak_vox)
    assert np.abs(peak_mm - (20, -10, 10)).max() <= 6.0  # within a voxel of 6 mm


# ------------------------------------------------------------------------------------------ dataset
def test_processed_data_and_dataset(tmp_path):
    prepare(manifest_cohort(tmp_path, n=8))
    data = ProcessedData.open(tmp_path / "processed")
    assert len(data) == 8 and data.ground_truth_dir is None
    train = data.split_indices("train")
    parts = [data.split_indices(s) for s in ("train", "val", "test")]
    assert sorted(np.concatenate(parts).tolist()) == list(range(8))
    ds = VolumeDataset(data, "train")
    volume, index = ds[1]
    assert volume.shape == (1, *SHAPE) and volume.dtype == torch.float32 and index == train[1]
    np.testing.assert_array_equal(volume[0].numpy(), data.volumes[train[1]].astype(np.float32))
    whole = data.load_split("train")
    assert whole.shape == (len(train), 1, *SHAPE) and whole.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown split"):
        data.split_indices("validation")


def test_processed_data_names_missing_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        ProcessedData.open(tmp_path / "nothing")
    (tmp_path / "p").mkdir()
    np.save(tmp_path / "p" / "volumes.npy", np.zeros((1, 2, 2, 2), np.float16))
    with pytest.raises(ValueError, match=r"\['subjects.csv', 'grid.json'\]"):
        ProcessedData.open(tmp_path / "p")


# ------------------------------------------------------------------------------------------ viz
# ------------------------------------------------------------------------------------------ covariates
def test_given_covariates_reach_subjects_csv_under_their_names(tmp_path):
    cfg = manifest_cohort(tmp_path, n=8, covariates=("tiv", "site_scale"))
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    manifest["tiv"] = [1.4e6 + 1e4 * i for i in range(8)]
    manifest["site_scale"] = [0.5] * 8
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    prepare(cfg)
    subjects = pd.read_csv(tmp_path / "processed" / "subjects.csv", dtype={"subject_id": str})
    assert list(subjects.columns) == [*SUBJECT_COLUMNS, "tiv", "site_scale"]
    assert subjects["tiv"].tolist() == manifest["tiv"].tolist()
    assert ProcessedData.open(tmp_path / "processed").subjects["tiv"].iloc[3] == 1.43e6


def test_a_bad_covariate_value_rejects_the_subject_naming_file_line_and_column(tmp_path):
    cfg = manifest_cohort(tmp_path, n=8, covariates=("tiv",), max_rejected_fraction=0.5)
    manifest = pd.read_csv(tmp_path / "manifest.csv")
    manifest["tiv"] = ["1.5e6"] * 8
    manifest.loc[2, "tiv"] = "n/a"
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    result = prepare(cfg)
    assert result.n_accepted == 7
    [bad] = result.rejected
    assert bad.subject_id == "s02"
    assert bad.reason == f"{tmp_path / 'manifest.csv'} line 4, column 'tiv': 'n/a' is not a finite number"


def test_a_covariate_column_that_is_absent_or_reserved_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"manifest.csv: data.covariates names column\(s\) \['tiv'\]"):
        prepare(manifest_cohort(tmp_path, n=4, covariates=("tiv",)))
    with pytest.raises(ValueError, match="subjects.csv's own columns"):
        prepare(manifest_cohort(tmp_path, n=4, covariates=("etiv_mm3",)))


def test_a_processed_folder_of_an_older_prepare_asks_for_a_rerun(tmp_path):
    prepare(manifest_cohort(tmp_path, n=4))
    path = tmp_path / "processed" / "subjects.csv"
    old = pd.read_csv(path).drop(columns=["etiv_mm3"]).rename(columns={"brain_mask_volume_mm3": "brain_volume_mm3"})
    old.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['brain_mask_volume_mm3', 'etiv_mm3'\].*re-run"):
        ProcessedData.open(tmp_path / "processed")
