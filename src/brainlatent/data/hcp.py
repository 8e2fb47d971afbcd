"""HCP Young Adult loader (and the synthetic cohort, which uses the same layout).

Layout (one folder per subject under ``root``)::

    <root>/<Subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz        image="T1w" (native ACPC space)
    <root>/<Subject>/MNINonLinear/T1w_restore_brain.nii.gz       image="MNINonLinear" (MNI-registered)

plus HCP's *unrestricted* CSV (``Subject, Gender, Age, ...``, one row per subject, many more columns that we
ignore except those named in ``data.covariates``, e.g. ``FS_IntraCranial_Vol``: FreeSurfer's eTIV, registered
with the skull, the head-size covariate a local brain effect cannot move; ``Subject`` is an integer such as
``100307``; ``Gender`` is M/F; ``Age`` is a range 22-25, 26-30, 31-35 or 36+). The synthetic cohort writes ``<root>/unrestricted_synthetic.csv`` in the same format.

Every subject id seen (in the CSV or as an image folder) ends in ``Cohort.subjects`` or ``Cohort.rejected``:

* CSV row whose folder does not exist -> ``not downloaded`` (normal for a partial download with the full
  CSV; ``prepare`` does not count these towards ``max_rejected_fraction``);
* folder exists but the image file does not -> ``missing file``;
* unknown Gender/Age value, empty id -> rejected with the parse error;
* duplicate Subject ids -> every copy rejected (once per id): we cannot tell which row is right;
* image folder without a CSV row -> ``absent from CSV``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from brainlatent.data.cohort import Cohort, Rejection, age_to_group
from brainlatent.data.manifest import check_covariate_columns, cohort_from_table, read_table

IMAGE_PATHS: dict[str, Path] = {
    "T1w": Path("T1w") / "T1w_acpc_dc_restore_brain.nii.gz",
    "MNINonLinear": Path("MNINonLinear") / "T1w_restore_brain.nii.gz",
}
HCP_COLUMNS: tuple[str, ...] = ("Subject", "Gender", "Age")
SYNTHETIC_CSV = "unrestricted_synthetic.csv"
SYNTHETIC_GROUND_TRUTH = "ground_truth.csv"
SYNTHETIC_EFFECT_MAPS = "effect_maps"
# Reason prefix of CSV rows with no subject folder at all (see module docstring).
NOT_DOWNLOADED = "not downloaded"


def load_hcp(
    root: str | Path, csv: str | Path, image: str = "T1w", *, source: str = "hcp", covariates: tuple[str, ...] = ()
) -> Cohort:
    """Load an HCP-layout folder and its unrestricted CSV into a :class:`Cohort` (rules in the module doc).

    ``covariates``: numeric CSV columns carried per subject (a subject with a bad value is rejected, the
    reason naming file, line and column). Raises FileNotFoundError if ``root`` or ``csv`` is missing,
    ValueError for an unknown ``image`` or CSV columns missing (named in the message).
    """
    root = Path(root)
    if image not in IMAGE_PATHS:
        raise ValueError(f"unknown HCP image {image!r}; expected one of {list(IMAGE_PATHS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"HCP root folder not found: {root}")
    csv = Path(csv)
    df = read_table(csv, HCP_COLUMNS, "HCP unrestricted CSV")
    check_covariate_columns(df, covariates, csv, "HCP unrestricted CSV")
    rel = IMAGE_PATHS[image]

    ids = df["Subject"].str.strip()
    table = pd.DataFrame(
        {"subject": ids, "path": [str(root / s / rel) for s in ids], "sex": df["Gender"], "age": df["Age"],
         **{c: df[c] for c in covariates}}
    )  # fmt: skip
    # An empty id would point at root itself: let cohort_from_table reject it as an empty id.
    downloaded = [(root / s).is_dir() for s in ids]
    cohort = cohort_from_table(table[downloaded], source=source, covariates=covariates, csv_path=csv)
    for sid in dict.fromkeys(ids[[not d for d in downloaded]]):
        cohort.rejected.append(Rejection(sid, f"{NOT_DOWNLOADED}: no folder {root / sid}"))

    known = set(ids)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in known and (folder / rel).is_file():
            cohort.rejected.append(Rejection(folder.name, f"absent from CSV: {folder / rel} has no row in {csv}"))
    return cohort


def load_synthetic(root: str | Path, covariates: tuple[str, ...] = ()) -> Cohort:
    """The synthetic cohort (``brainlatent synth``): HCP layout, T1w images, ``unrestricted_synthetic.csv``.

    Exact ages come from ``ground_truth.csv`` (columns ``Subject``, ``age``) where they agree with the range.
    """
    root = Path(root)
    if not (root / SYNTHETIC_GROUND_TRUTH).is_file():
        raise FileNotFoundError(
            f"{root / SYNTHETIC_GROUND_TRUTH} not found: is {root} a synthetic cohort? (run `brainlatent synth`)"
        )
    cohort = load_hcp(root, root / SYNTHETIC_CSV, image="T1w", source="synthetic", covariates=covariates)
    # The ground truth knows each subject's exact age (the unrestricted CSV, like HCP's, only the range).
    truth = read_table(root / SYNTHETIC_GROUND_TRUTH, ("Subject", "age"), "synthetic ground truth")
    ages = dict(zip(truth["Subject"].str.strip(), pd.to_numeric(truth["age"], errors="coerce")))
    cohort.subjects = [
        dataclasses.replace(s, age=float(ages[s.subject_id]))
        if s.age is None and s.subject_id in ages and age_group_of(ages[s.subject_id]) == s.age_group
        else s
        for s in cohort.subjects
    ]
    return cohort


def age_group_of(age: float) -> str | None:
    """HCP range of an exact age, None when the age is missing or invalid."""
    try:
        return age_to_group(float(age))
    except ValueError:
        return None
