"""The labels the probes predict and the covariates they control for, built from ``subjects.csv`` columns.

Labels (label 1 / higher index is the positive end of every direction, docs/directions_method.md):

  sex        binary   1 = male (M), 0 = female (F)
  age_old    binary   1 = older (31-35, 36+), 0 = younger (22-25, 26-30); see ``cohort.YOUNG_GROUPS``
  age_group  ordinal  index into ``cohort.AGE_GROUPS`` (0 = 22-25 ... 3 = 36+)
  planted    binary   1 = a known effect was planted in this subject (a positive control), 0 = untouched;
                      only when the cohort has the column (``available_targets``)

Head-size quantities (three different things, named apart):

  brain_mask_volume_mm3  the native brain-mask volume of each scan: the *baseline* probe's feature. A local
                         effect that adds tissue (a larger region in males) adds to it, so it must not be
                         the size covariate (regressing it out pushes males towards "female").
  etiv_mm3               the estimated total intracranial volume (affine registration to the template, as
                         FreeSurfer's eTIV): the default size covariate (``directions.size_covariate``); a
                         local effect barely moves it. Any numeric column given with the cohort can be used
                         instead (e.g. a ``tiv`` column, HCP's ``FS_IntraCranial_Vol``).
  brain_volume_mm3       (anatomy.MEASURE_COLUMNS) the parenchyma measured on a processed or decoded volume:
                         a traversal measure, never read from subjects.csv here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..data.cohort import AGE_GROUPS, SEXES, YOUNG_GROUPS
from .probes import Task

BRAIN_MASK_VOLUME = "brain_mask_volume_mm3"  # the raw-size baseline (subjects.csv)
DEFAULT_SIZE_COVARIATE = "etiv_mm3"
PLANTED = "planted"  # the positive-control label column (subjects.csv), written by the planting stage


@dataclass(frozen=True)
class Target:
    name: str
    task: Task
    positive: str  # what the positive end of the direction means
    column: str  # the subjects.csv column it is built from


TARGETS: dict[str, Target] = {
    "sex": Target("sex", "binary", "male", "sex"),
    "age_old": Target("age_old", "binary", "older", "age_group"),
    "age_group": Target("age_group", "ordinal", "older", "age_group"),
    PLANTED: Target(PLANTED, "binary", "planted", PLANTED),
}
# Targets every cohort has; the others exist only when their column does.
CORE_TARGETS: tuple[str, ...] = ("sex", "age_old", "age_group")


def available_targets(subjects: pd.DataFrame) -> tuple[str, ...]:
    """The targets ``subjects`` can label: the core three, and ``planted`` when the column exists."""
    return CORE_TARGETS + ((PLANTED,) if PLANTED in subjects.columns else ())


def _column(subjects: pd.DataFrame, column: str, allowed: tuple[str, ...]) -> pd.Series:
    if column not in subjects.columns:
        raise ValueError(f"subjects table: missing column {column!r} (have {list(subjects.columns)})")
    values = subjects[column].astype(str).str.strip()
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise ValueError(f"subjects table: column {column!r} has values {bad}; expected some of {list(allowed)}")
    return values


def _binary_column(subjects: pd.DataFrame, column: str) -> np.ndarray:
    if column not in subjects.columns:
        raise ValueError(f"subjects table: missing column {column!r} (have {list(subjects.columns)})")
    values = pd.to_numeric(subjects[column], errors="coerce").to_numpy(np.float64)
    bad = sorted({str(v) for v, ok in zip(subjects[column], np.isin(values, (0.0, 1.0))) if not ok})
    if bad:
        raise ValueError(f"subjects table: column {column!r} has values {bad[:5]}; expected 0 or 1 for every subject")
    return values.astype(np.int64)


def target_labels(subjects: pd.DataFrame, target: str) -> np.ndarray:
    """``(N,)`` int64 labels of ``target`` (a key of ``TARGETS``) for the rows of ``subjects``."""
    if target not in TARGETS:
        raise ValueError(f"unknown probe target {target!r}; expected one of {list(TARGETS)}")
    if target == "sex":
        return (_column(subjects, "sex", SEXES) == "M").to_numpy(np.int64)
    if target == PLANTED:
        return _binary_column(subjects, PLANTED)
    groups = _column(subjects, "age_group", AGE_GROUPS)
    if target == "age_old":
        return (~groups.isin(YOUNG_GROUPS)).to_numpy(np.int64)
    return groups.map({g: i for i, g in enumerate(AGE_GROUPS)}).to_numpy(np.int64)


def covariate(subjects: pd.DataFrame, column: str) -> np.ndarray:
    """``(N, 1)`` float64 values of the numeric ``column`` of ``subjects``: a size covariate or the raw
    brain-mask volume. ValueError naming the column when it is missing or not a positive number everywhere."""
    if column not in subjects.columns:
        raise ValueError(f"subjects table: missing column {column!r} (directions.size_covariate or the "
                         f"brain-mask baseline); have {list(subjects.columns)}")
    values = pd.to_numeric(subjects[column], errors="coerce").to_numpy(np.float64)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(f"subjects table: column {column!r} must be a positive number for every subject; "
                         f"rows {rows} hold {subjects[column].iloc[rows].tolist()}")
    return values[:, None]


def brain_mask_volume(subjects: pd.DataFrame) -> np.ndarray:
    """``(N, 1)`` native brain-mask volume in mm^3: the raw-size baseline probe's feature."""
    return covariate(subjects, BRAIN_MASK_VOLUME)
