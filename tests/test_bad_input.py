"""Bad inputs are rejected with a reason (qc.json + a printed warning); bad params name their key."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from brainlatent.config import ConfigError, DataConfig, load_params, params_from_dict
from brainlatent.data.hcp import IMAGE_PATHS, load_hcp
from brainlatent.data.preprocess import BadInputError, prepare, read_brain

SHAPE = (12, 12, 12)
FOV = (72.0, 72.0, 72.0)


def brain_array(shape=(24, 24, 24)) -> np.ndarray:
    idx = np.indices(shape).transpose(1, 2, 3, 0) - (np.asarray(shape) - 1) / 2
    return np.where((idx**2).sum(-1) < 9**2, 100.0 + idx[..., 2], 0.0).astype(np.float32)


def write(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0])), path)
    return path


def truncated(path: Path) -> Path:
    write(path, brain_array())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def not_gzip(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a NIfTI file" * 20)
    return path


def garbage_inside_gzip(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(np.random.default_rng(0).bytes(2000)))
    return path


def with_value(value: float):
    def make(path: Path) -> Path:
        data = brain_array()
        data[12, 12, 12] = value
        return write(path, data)

    return make


BAD_IMAGES = {
    "truncated": (truncated, "corrupt or unreadable"),
    "not gzip": (not_gzip, "corrupt or unreadable"),
    "garbage header": (garbage_inside_gzip, "corrupt or unreadable"),
    "4D": (lambda p: write(p, np.stack([brain_array()] * 2, axis=-1)), "4D image"),
    "NaN": (with_value(np.nan), "NaN/Inf"),
    "Inf": (with_value(np.inf), "NaN/Inf"),
    "all zero": (lambda p: write(p, np.zeros((24, 24, 24), np.float32)), "all-zero image"),
    "missing": (lambda p: p, "missing file"),
}


@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_read_brain_rejects(tmp_path, kind):
    make, reason = BAD_IMAGES[kind]
    with pytest.raises(BadInputError, match=reason):
        read_brain(make(tmp_path / "bad.nii.gz"))


def test_singleton_time_axis_is_a_3d_volume(tmp_path):
    brain = read_brain(write(tmp_path / "b.nii.gz", brain_array()[..., None]))
    assert brain.data.shape == (24, 24, 24)


def manifest(tmp_path: Path, n_good: int, bad: dict[str, Path] | None = None, extra_rows=()) -> Path:
    rows = []
    for i in range(n_good):
        path = write(tmp_path / "scans" / f"good{i:02d}.nii.gz", brain_array())
        rows.append((f"good{i:02d}", str(path), "FM"[i % 2], 22 + i))
    for sid, path in (bad or {}).items():
        rows.append((sid, str(path), "F", "26-30"))
    rows.extend(extra_rows)
    csv = tmp_path / "manifest.csv"
    pd.DataFrame(rows, columns=["subject", "path", "sex", "age"]).to_csv(csv, index=False)
    return csv


def config(tmp_path: Path, csv: Path, **kw) -> DataConfig:
    return DataConfig(source="manifest", path=str(csv), processed_dir=str(tmp_path / "processed"), shape=SHAPE,
                      fov_mm=FOV, workers=1, qc_subjects=2, **kw)  # fmt: skip


def test_prepare_rejects_each_bad_input_with_its_reason(tmp_path, caplog):
    bad = {kind.replace(" ", "_"): make(tmp_path / "bad" / f"{kind.replace(' ', '_')}.nii.gz")
           for kind, (make, _) in BAD_IMAGES.items()}  # fmt: skip
    extra = [("badsex", str(tmp_path / "scans" / "good00.nii.gz"), "X", 30),
             ("badage", str(tmp_path / "scans" / "good00.nii.gz"), "M", "teen"),
             ("dup", str(tmp_path / "scans" / "good00.nii.gz"), "M", 30),
             ("dup", str(tmp_path / "scans" / "good01.nii.gz"), "F", 31)]  # fmt: skip
    csv = manifest(tmp_path, n_good=10, bad=bad, extra_rows=extra)
    with caplog.at_level(logging.WARNING, logger="brainlatent.data.preprocess"):
        result = prepare(config(tmp_path, csv, max_rejected_fraction=0.6))
    assert result.n_accepted == 10 and result.n_rejected == len(BAD_IMAGES) + 3
    qc = json.loads((tmp_path / "processed" / "qc.json").read_text())
    reasons = {r["subject_id"]: r["reason"] for r in qc["rejected"]}
    for kind, (_, reason) in BAD_IMAGES.items():
        assert reason in reasons[kind.replace(" ", "_")]
        assert any(kind.replace(" ", "_") in m and reason in m for m in caplog.messages)
    assert "unknown sex" in reasons["badsex"] and "unknown Age" in reasons["badage"]
    assert "duplicate subject id" in reasons["dup"]
    assert qc["counts"]["rejected"] == len(reasons)


def test_hcp_duplicates_unknown_values_and_orphans(tmp_path):
    root = tmp_path / "HCP"
    for sid in ("100307", "100408", "100610", "101006", "555555"):
        write(root / sid / IMAGE_PATHS["T1w"], brain_array())
    pd.DataFrame(
        {"Subject": [100307, 100408, 100408, 100610, 101006], "Gender": ["F", "M", "M", "U", "M"],
         "Age": ["22-25", "26-30", "26-30", "31-35", "36-40"]}  # fmt: skip
    ).to_csv(tmp_path / "u.csv", index=False)
    cohort = load_hcp(root, tmp_path / "u.csv")
    assert [s.subject_id for s in cohort.subjects] == ["100307"]
    reasons = {r.subject_id: r.reason for r in cohort.rejected}
    assert reasons["100408"].startswith("duplicate subject id: 2 rows")
    assert "Gender" in reasons["100610"] and "'U'" in reasons["100610"]
    assert "Age" in reasons["101006"] and "'36-40'" in reasons["101006"]
    assert reasons["555555"].startswith("absent from CSV")
    assert len(reasons) == 4  # one rejection per id


def test_no_subject_left_is_an_error(tmp_path):
    bad = {"a": tmp_path / "gone.nii.gz", "b": with_value(np.nan)(tmp_path / "b.nii.gz")}
    csv = manifest(tmp_path, n_good=0, bad=bad)
    with pytest.raises(ValueError, match="no subject left.*missing file.*NaN"):
        prepare(config(tmp_path, csv, max_rejected_fraction=1.0))
    assert not (tmp_path / "processed").exists()
    assert not list(tmp_path.glob(".processed*"))


def test_too_many_rejected_keeps_the_previous_output(tmp_path):
    good = manifest(tmp_path, n_good=8)
    prepare(config(tmp_path, good))
    before = (tmp_path / "processed" / "subjects.csv").read_text()
    bad = {f"bad{i}": tmp_path / f"gone{i}.nii.gz" for i in range(2)}
    csv = manifest(tmp_path, n_good=8, bad=bad)
    with pytest.raises(ValueError, match=r"2 of 10 subjects rejected \(20%\).*max_rejected_fraction=0.1"):
        prepare(config(tmp_path, csv, max_rejected_fraction=0.1))
    assert (tmp_path / "processed" / "subjects.csv").read_text() == before
    assert not list(tmp_path.glob(".processed*"))
    assert prepare(config(tmp_path, csv, max_rejected_fraction=0.25)).n_rejected == 2


def test_missing_manifest_columns(tmp_path):
    csv = tmp_path / "m.csv"
    pd.DataFrame({"subject": ["a"], "path": ["a.nii.gz"], "gender": ["M"]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['sex', 'age'\]"):
        prepare(config(tmp_path, csv))


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"shape": [16, "16", 16]}, r"data\.shape\[1\]"),
        ({"shape": [16, 0, 16]}, r"data\.shape\[1\]"),
        ({"max_rejected_fraction": 1.5}, r"data\.max_rejected_fraction"),
        ({"workers": 0}, r"data\.workers"),
        ({"fit_bbox": "yes"}, r"data\.fit_bbox"),
        ({"source": "nifti"}, r"data\.source"),
        ({"split_fractions": [0.5, 0.2, 0.2]}, r"split_fractions must sum to 1"),
        ({"intensity_percentiles": [99, 1]}, r"intensity_percentiles"),
        ({"source": "hcp"}, r"hcp_csv"),
        ({"volume": 3}, r"volume"),
    ],
)
def test_bad_params_name_the_key(data, key):
    with pytest.raises(ConfigError, match=key):
        params_from_dict({"data": data})


def test_bad_params_file_names_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  shape: [16, 16]\n  qc_subjects: 2.5\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert "data.shape" in str(err.value) and "data.qc_subjects" in str(err.value) and str(path) in str(err.value)
