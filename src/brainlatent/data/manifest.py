"""CSV manifest loader, and the table -> :class:`Cohort` rules shared with the HCP loader.

A manifest is the simplest way to bring your own scans::

    subject,path,sex,age
    sub-01,scans/sub-01_T1w_brain.nii.gz,F,24
    sub-02,/data/sub-02.nii.gz,M,31-35

``path`` may be absolute or relative to the manifest's folder; ``age`` is a number of years or an HCP range
label (``22-25``, ``26-30``, ``31-35``, ``36+``); ``sex`` is M/F (male/female accepted). Images should be
brain-extracted 3D T1w volumes (background exactly 0, see ``preprocess``).

Extra columns are ignored, except the numeric **covariates** named in ``data.covariates`` (e.g. ``tiv``, a
skull-based intracranial volume from FreeSurfer or SPM) and the positive-control label :data:`PLANTED_LABEL`
(``brainlatent plant``), which is carried whenever present (0 or 1). Both keep their column name in
``subjects.csv``.

Row-level problems never abort the load: each offending subject lands in ``Cohort.rejected`` with the
reason (a bad covariate value: the file, line, column and value). Duplicate subject ids are ambiguous (which
row is right?), so *every* copy is rejected, once per id.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pandas as pd

from brainlatent.data.cohort import Cohort, Rejection, Subject, parse_age, parse_sex

MANIFEST_COLUMNS: tuple[str, ...] = ("subject", "path", "sex", "age")
# The positive-control label written by `brainlatent plant` (1 = the effect was planted in this subject).
PLANTED_LABEL = "planted"


def read_table(csv_path: str | Path, required: tuple[str, ...], what: str) -> pd.DataFrame:
    """Read a CSV as strings (ids like ``100307`` or ``007`` stay verbatim) and check required columns.

    Raises FileNotFoundError when the file is absent and ValueError naming the missing columns.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{what} not found: {csv_path}")
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark that would corrupt the first header.
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{csv_path}: not a readable CSV {what} ({err})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(
            f"{csv_path}: {what} lacks column(s) {missing}; expected at least {list(required)}, "
            f"found {list(df.columns)}"
        )
    return df


def check_covariate_columns(table: pd.DataFrame, covariates: tuple[str, ...], csv_path: Path, what: str) -> None:
    """ValueError naming the file and the covariate columns it lacks."""
    missing = [c for c in covariates if c not in table.columns]
    if missing:
        raise ValueError(
            f"{csv_path}: data.covariates names column(s) {missing} that the {what} lacks; "
            f"found {list(table.columns)}"
        )


def _covariate_values(table: pd.DataFrame, covariates: tuple[str, ...], csv_path: Path) -> list[dict | str]:
    """Per row: {name: value} of the covariates, or the rejection reason naming file, line, column, value.

    Covariates must be finite numbers; the planted label must be 0 or 1.
    """
    rows: list[dict | str] = []
    for label in table.index:  # read_table's row numbers (0 = the first data line), kept through filtering
        values: dict[str, float] = {}
        for name in covariates:
            raw = str(table.at[label, name]).strip()
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            allowed = value in (0.0, 1.0) if name == PLANTED_LABEL else math.isfinite(value)
            if not allowed:
                expected = "0 or 1" if name == PLANTED_LABEL else "a finite number"
                # Line numbers as a spreadsheet shows them: the header is line 1.
                values = f"{csv_path} line {label + 2}, column {name!r}: {raw!r} is not {expected}"
                break
            values[name] = value
        rows.append(values)
    return rows


def cohort_from_table(
    table: pd.DataFrame, source: str, covariates: tuple[str, ...] = (), csv_path: Path | None = None
) -> Cohort:
    """Turn a table with columns ``subject, path, sex, age`` (strings; path absolute) into a Cohort.

    ``covariates``: further numeric columns of ``table`` carried in ``Subject.covariates``; ``csv_path``
    names the file in their rejection reasons (line = the table's index + 2: ``read_table``'s row numbers).
    Rejections (reason text): empty id, duplicate id (all copies), unknown sex/age value, bad covariate
    value, empty path, missing image file.
    Subjects keep the table's row order.
    """
    cohort = Cohort(source=source)
    ids = [str(s).strip() for s in table["subject"]]
    counts = Counter(ids)
    reported_duplicates: set[str] = set()
    extra = _covariate_values(table, covariates, Path(csv_path or "table"))
    for sid, path, sex, age, values in zip(ids, table["path"], table["sex"], table["age"], extra):
        if not sid:
            cohort.rejected.append(Rejection("", f"empty subject id (image {path or 'unknown'})"))
            continue
        if counts[sid] > 1:
            if sid not in reported_duplicates:
                reported_duplicates.add(sid)
                cohort.rejected.append(
                    Rejection(sid, f"duplicate subject id: {counts[sid]} rows; all copies rejected")
                )
            continue
        try:
            sex_value = parse_sex(sex)
            age_group, age_years = parse_age(age)
        except ValueError as err:
            cohort.rejected.append(Rejection(sid, str(err)))
            continue
        if isinstance(values, str):
            cohort.rejected.append(Rejection(sid, values))
            continue
        if not str(path).strip():
            cohort.rejected.append(Rejection(sid, "empty image path"))
            continue
        image = Path(path)
        if not image.is_file():
            cohort.rejected.append(Rejection(sid, f"missing file: {image}"))
            continue
        cohort.subjects.append(Subject(sid, image, sex_value, age_group, age_years, values))
    return cohort


def load_manifest(csv_path: str | Path, covariates: tuple[str, ...] = ()) -> Cohort:
    """Load a ``subject, path, sex, age`` CSV manifest; relative paths resolve against its folder.

    ``covariates``: numeric columns to carry (ValueError naming the file when one is absent); the
    :data:`PLANTED_LABEL` column is carried whenever present.
    """
    csv_path = Path(csv_path)
    table = read_table(csv_path, MANIFEST_COLUMNS, "manifest")
    check_covariate_columns(table, covariates, csv_path, "manifest")
    if PLANTED_LABEL in table.columns and PLANTED_LABEL not in covariates:
        covariates = (*covariates, PLANTED_LABEL)
    base = csv_path.resolve().parent
    table = table.assign(
        path=[str(base / p.strip()) if p.strip() else "" for p in table["path"]]
    )
    return cohort_from_table(table, source="manifest", covariates=covariates, csv_path=csv_path)
