"""HCP and CSV-manifest loaders on generated trees with real-export quirks."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainlatent.data.hcp import IMAGE_PATHS, NOT_DOWNLOADED, load_hcp, load_synthetic
from brainlatent.data.manifest import load_manifest


def _nifti(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), path)
    return path


def _hcp_csv(path: Path, rows: list[tuple]) -> Path:
    """An unrestricted-CSV look-alike: integer ids, M/F, age ranges, plus columns we must ignore."""
    df = pd.DataFrame(rows, columns=["Subject", "Gender", "Age"])
    df.insert(1, "Release", "S1200")
    df["Acquisition"] = "Q01"
    df["FS_IntraCranial_Vol"] = 1.5e6
    df.to_csv(path, index=False)
    return path


@pytest.fixture()
def hcp_tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "HCP"
    for sid in ("100307", "100408", "101915"):
        _nifti(root / sid / IMAGE_PATHS["T1w"])
    _nifti(root / "100307" / IMAGE_PATHS["MNINonLinear"])
    (root / "102008" / "T1w").mkdir(parents=True)  # downloaded, but no T1w image
    csv = _hcp_csv(
        tmp_path / "unrestricted.csv",
        [(100307, "F", "26-30"), (100408, "M", "31-35"), (101915, "F", "36+"), (102008, "M", "22-25"),
         (103111, "M", "22-25")],  # fmt: skip
    )
    return root, csv


def test_hcp_loader_keeps_ids_and_labels(hcp_tree):
    root, csv = hcp_tree
    cohort = load_hcp(root, csv)
    assert cohort.source == "hcp"
    assert [s.subject_id for s in cohort.subjects] == ["100307", "100408", "101915"]
    assert [(s.sex, s.age_group, s.age) for s in cohort.subjects] == [
        ("F", "26-30", None), ("M", "31-35", None), ("F", "36+", None)
    ]  # fmt: skip
    assert cohort.subjects[0].image_path == root / "100307" / "T1w" / "T1w_acpc_dc_restore_brain.nii.gz"
    reasons = {r.subject_id: r.reason for r in cohort.rejected}
    assert reasons["102008"].startswith("missing file")
    assert reasons["103111"].startswith(NOT_DOWNLOADED)
    assert len(cohort.subjects) + len(cohort.rejected) == 5


def test_hcp_loader_mni_option(hcp_tree):
    root, csv = hcp_tree
    cohort = load_hcp(root, csv, image="MNINonLinear")
    assert [s.subject_id for s in cohort.subjects] == ["100307"]
    assert cohort.subjects[0].image_path.parts[-2:] == ("MNINonLinear", "T1w_restore_brain.nii.gz")
    assert {r.subject_id for r in cohort.rejected} == {"100408", "101915", "102008", "103111"}


def test_hcp_loader_folder_without_csv_row_is_rejected(hcp_tree):
    root, csv = hcp_tree
    _nifti(root / "999999" / IMAGE_PATHS["T1w"])
    (root / "effect_maps").mkdir()  # unrelated folders are not subjects
    cohort = load_hcp(root, csv)
    assert [r.reason for r in cohort.rejected if r.subject_id == "999999"][0].startswith("absent from CSV")
    assert "effect_maps" not in {r.subject_id for r in cohort.rejected}


def test_hcp_loader_errors_name_the_problem(hcp_tree, tmp_path):
    root, csv = hcp_tree
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"Subject": [1], "Sex": ["M"]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"\['Gender', 'Age'\]"):
        load_hcp(root, bad)
    with pytest.raises(ValueError, match="unknown HCP image"):
        load_hcp(root, csv, image="T2w")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_hcp(root, tmp_path / "nope.csv")


def test_synthetic_loader_reads_its_csv(tmp_path):
    root = tmp_path / "synthetic"
    _nifti(root / "S0001" / IMAGE_PATHS["T1w"])
    pd.DataFrame({"Subject": ["S0001"], "Gender": ["M"], "Age": ["26-30"]}).to_csv(
        root / "unrestricted_synthetic.csv", index=False
    )
    with pytest.raises(FileNotFoundError, match="ground_truth.csv"):
        load_synthetic(root)
    (root / "ground_truth.csv").write_text("Subject,sex,age\nS0001,M,28.5\n")
    cohort = load_synthetic(root)
    assert cohort.source == "synthetic" and [s.subject_id for s in cohort.subjects] == ["S0001"]
    assert (cohort.subjects[0].age_group, cohort.subjects[0].age) == ("26-30", 28.5)  # exact age from the truth


def test_manifest_relative_paths_and_ages(tmp_path):
    folder = tmp_path / "study"
    _nifti(folder / "scans" / "a.nii.gz")
    absolute = _nifti(tmp_path / "elsewhere" / "b.nii.gz")
    _nifti(folder / "scans" / "c.nii.gz")
    pd.DataFrame(
        {
            "subject": ["a", "b", "c", "d"],
            "path": ["scans/a.nii.gz", str(absolute), "scans/c.nii.gz", "scans/missing.nii.gz"],
            "sex": ["female", "M", "f", "M"],
            "age": ["24.5", "31-35", "36", "30"],
            "site": ["x", "y", "z", "w"],
        }
    ).to_csv(folder / "manifest.csv", index=False)
    cohort = load_manifest(folder / "manifest.csv")
    assert cohort.source == "manifest"
    got = {s.subject_id: (s.image_path, s.sex, s.age_group, s.age) for s in cohort.subjects}
    assert got == {
        "a": ((folder / "scans" / "a.nii.gz").resolve(), "F", "22-25", 24.5),
        "b": (absolute, "M", "31-35", None),
        "c": ((folder / "scans" / "c.nii.gz").resolve(), "F", "36+", 36.0),
    }
    assert [(r.subject_id, r.reason.split(":")[0]) for r in cohort.rejected] == [("d", "missing file")]


def test_manifest_missing_columns_are_named(tmp_path):
    csv = tmp_path / "m.csv"
    pd.DataFrame({"subject": ["a"], "path": ["a.nii.gz"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"\['sex', 'age'\]"):
        load_manifest(csv)


def test_hcp_covariates_are_carried_and_a_bad_value_names_file_line_and_column(hcp_tree):
    root, csv = hcp_tree
    df = pd.read_csv(csv, dtype=str)
    df.loc[2, "FS_IntraCranial_Vol"] = ""  # 101915, the third data line (line 4 of the file)
    df.loc[0, "FS_IntraCranial_Vol"] = "1612345.5"
    df.to_csv(csv, index=False)
    cohort = load_hcp(root, csv, covariates=("FS_IntraCranial_Vol",))
    assert [(s.subject_id, dict(s.covariates)) for s in cohort.subjects] == [
        ("100307", {"FS_IntraCranial_Vol": 1612345.5}), ("100408", {"FS_IntraCranial_Vol": 1.5e6})
    ]  # fmt: skip
    reasons = {r.subject_id: r.reason for r in cohort.rejected}
    assert reasons["101915"] == f"{csv} line 4, column 'FS_IntraCranial_Vol': '' is not a finite number"
    with pytest.raises(ValueError, match=r"unrestricted.csv: data.covariates names column\(s\) \['tiv'\]"):
        load_hcp(root, csv, covariates=("tiv",))


def test_a_manifest_planted_label_is_carried_and_must_be_0_or_1(tmp_path):
    for i in range(3):
        _nifti(tmp_path / f"s{i}.nii.gz")
    pd.DataFrame(
        {"subject": ["a", "b", "c"], "path": [f"s{i}.nii.gz" for i in range(3)], "sex": ["F", "M", "F"],
         "age": [24, 30, 33], "planted": ["1", "0", "2"]}
    ).to_csv(tmp_path / "m.csv", index=False)  # fmt: skip
    cohort = load_manifest(tmp_path / "m.csv")
    assert [dict(s.covariates) for s in cohort.subjects] == [{"planted": 1.0}, {"planted": 0.0}]
    assert cohort.rejected[0].reason == f"{tmp_path / 'm.csv'} line 4, column 'planted': '2' is not 0 or 1"
