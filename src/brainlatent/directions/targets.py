"""The labels the probes predict, built from ``subjects.csv`` columns (``sex``, ``age_group``).

  sex        binary   1 = male (M), 0 = female (F)
  age_old    binary   1 = older (31-35, 36+), 0 = younger (22-25, 26-30); see ``cohort.YOUNG_GROUPS``
  age_group  ordinal  index into ``cohort.AGE_GROUPS`` (0 = 22-25 ... 3 = 36+)

Label 1 / higher index is the positive end of every direction (docs/directions_method.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..data.cohort import AGE_GROUPS, SEXES, YOUNG_GROUPS
from .probes import Task


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
}


def _column(subjects: pd.DataFrame, column: str, allowed: tuple[str, ...]) -> pd.Series:
    if column not in subjects.columns:
        raise ValueError(f"subjects table: missing column {column!r} (have {list(subjects.columns)})")
    values = subjects[column].astype(str).str.strip()
    bad = sorted(set(values) - set(allowed))
    if bad:
        raise ValueError(f"subjects table: column {column!r} has values {bad}; expected some of {list(allowed)}")
    return values


def target_labels(subjects: pd.DataFrame, target: str) -> np.ndarray:
    """``(N,)`` int64 labels of ``target`` (a key of ``TARGETS``) for the rows of ``subjects``."""
    if target not in TARGETS:
        raise ValueError(f"unknown probe target {target!r}; expected one of {list(TARGETS)}")
    if target == "sex":
        return (_column(subjects, "sex", SEXES) == "M").to_numpy(np.int64)
    groups = _column(subjects, "age_group", AGE_GROUPS)
    if target == "age_old":
        return (~groups.isin(YOUNG_GROUPS)).to_numpy(np.int64)
    return groups.map({g: i for i, g in enumerate(AGE_GROUPS)}).to_numpy(np.int64)


def brain_volume(subjects: pd.DataFrame) -> np.ndarray:
    """``(N, 1)`` native brain volume in mm^3 (the size covariate and the size baseline)."""
    if "brain_volume_mm3" not in subjects.columns:
        raise ValueError("subjects table: missing column 'brain_volume_mm3'")
    vol = pd.to_numeric(subjects["brain_volume_mm3"], errors="coerce").to_numpy(np.float64)
    if not np.all(np.isfinite(vol) & (vol > 0)):
        raise ValueError("subjects table: 'brain_volume_mm3' must be a positive number for every subject")
    return vol[:, None]
