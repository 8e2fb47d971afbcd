"""The cohort model every loader produces and the rest of the code consumes.

A cohort is a list of :class:`Subject` (id, image path, sex, HCP age group, numeric age when known, the
numeric covariates given with the cohort, e.g. a skull-based ``tiv``) plus the
list of :class:`Rejection` (subjects a loader or the preprocessing could not use, with the reason). Nothing
the user had is silently dropped: every subject is either in ``subjects`` or in ``rejected``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# HCP Young Adult reports age in these ranges in its unrestricted data.
AGE_GROUPS: tuple[str, ...] = ("22-25", "26-30", "31-35", "36+")
# Binary young/old split used by the probes: the two youngest groups vs the two oldest.
YOUNG_GROUPS: frozenset[str] = frozenset({"22-25", "26-30"})
SEXES: tuple[str, ...] = ("F", "M")
_SEX_ALIASES = {"f": "F", "female": "F", "m": "M", "male": "M"}


@dataclass(frozen=True)
class Subject:
    """One scan of one subject."""

    subject_id: str
    image_path: Path
    sex: str  # "F" or "M"
    age_group: str  # one of AGE_GROUPS
    age: float | None = None  # exact age in years when the source knows it
    # Named numbers given with the cohort (``data.covariates``, a planted label), carried into subjects.csv.
    covariates: Mapping[str, float] = field(default_factory=dict, hash=False)

    @property
    def is_old(self) -> bool:
        return self.age_group not in YOUNG_GROUPS


@dataclass(frozen=True)
class Rejection:
    subject_id: str
    reason: str


@dataclass
class Cohort:
    subjects: list[Subject] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.subjects)


def parse_sex(value: object) -> str:
    """``M``/``F`` (also male/female, any case) -> ``"M"``/``"F"``; anything else is a ValueError."""
    key = str(value).strip().lower()
    if key not in _SEX_ALIASES:
        raise ValueError(f"unknown sex/Gender value {value!r}; expected M or F")
    return _SEX_ALIASES[key]


def age_to_group(age: float) -> str:
    """Map an exact age to HCP's range label (ages below 22 fall in the first group, 36+ in the last)."""
    if not math.isfinite(age) or age <= 0:
        raise ValueError(f"age must be a positive number of years, got {age!r}")
    if age < 26:
        return "22-25"
    if age < 31:
        return "26-30"
    if age < 36:
        return "31-35"
    return "36+"


def parse_age(value: object) -> tuple[str, float | None]:
    """An HCP range label (``"26-30"``, ``"36+"``) or a number of years -> (age group, exact age or None)."""
    text = str(value).strip()
    if text in AGE_GROUPS:
        return text, None
    try:
        age = float(text)
    except ValueError:
        raise ValueError(
            f"unknown Age value {value!r}; expected one of {list(AGE_GROUPS)} or a number of years"
        ) from None
    return age_to_group(age), age
