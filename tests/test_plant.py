"""Positive controls (data/plant.py) planted into a tiny manifest cohort of template-made brains."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from brainlatent.anatomy import load_template, local_region
from brainlatent.config import DataConfig
from brainlatent.data.plant import PlantSpec, plant
from brainlatent.data.preprocess import prepare
from test_headsize import template_box

N = 8


def template_brain(scale: float) -> nib.Nifti1Image:
    """The template's T1 inside its brain mask, scaled about its centre, on a 3 mm grid (int16, 0 outside)."""
    tpl = load_template()
    shape = (66, 80, 66)
    affine, x = template_box(shape)
    c = tpl.center_mm.reshape(3, 1)
    v = np.linalg.inv(tpl.affine)[:3, :3] @ (c + (x - c) / scale) + np.linalg.inv(tpl.affine)[:3, 3:]
    mask = ndimage.map_coordinates(tpl.brain_mask.astype(np.float32), v, order=1).reshape(shape) >= 0.5
    t1 = ndimage.map_coordinates(tpl.t1, v, order=1).reshape(shape)
    data = np.where(mask, np.clip(np.rint(1000 * t1), 1, None), 0).astype(np.int16)
    return nib.Nifti1Image(data, affine)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A manifest of N subjects (alternating sex, two age groups, scales 0.94-1.06) with a given tiv."""
    root = tmp_path_factory.mktemp("cohort")
    rows = []
    for i in range(N):
        scale = 0.94 + 0.12 * i / (N - 1)
        nib.save(template_brain(scale), root / f"s{i}.nii.gz")
        rows.append((f"s{i}", f"s{i}.nii.gz", "FM"[i % 2], (24, 33)[(i // 2) % 2], 1.5e6 * scale**3))
    pd.DataFrame(rows, columns=["subject", "path", "sex", "age", "tiv"]).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def data_config(manifest: Path, out: Path, **kw) -> DataConfig:
    return DataConfig(**{**dict(source="manifest", path=str(manifest), processed_dir=str(out), shape=(16, 20, 16),
                                workers=1, qc_subjects=2, covariates=("tiv",)), **kw})  # fmt: skip


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def mask_volume(path: Path) -> float:
    img = nib.load(path)
    return float((np.asanyarray(img.dataobj) > 0).sum() * abs(np.linalg.det(img.affine[:3, :3])))


def test_enlarging_a_region_plants_a_labelled_half_and_prepare_carries_label_and_map(cohort, tmp_path):
    before = digest(cohort.parent)
    out = tmp_path / "planted"
    result = plant(PlantSpec(effect="enlarge", region="occipital_poles", magnitude=0.3, seed=1),
                   data_config(cohort, tmp_path / "unused"), out)  # fmt: skip
    assert digest(cohort.parent) == before  # the input is never modified
    table = pd.read_csv(result.manifest, dtype={"subject": str})
    assert list(table.columns) == ["subject", "path", "sex", "age", "planted", "tiv"]
    assert (result.n_planted, result.n_control) == (4, 4)
    assert table.groupby("sex")["planted"].sum().tolist() == [2, 2]  # balanced within each sex
    source = pd.read_csv(cohort)
    assert table["tiv"].tolist() == source["tiv"].tolist()

    # Planted brains gained volume (the occipital poles x1.3 push the brain outward); controls did not.
    ratio = np.array([mask_volume(out / p) / mask_volume(cohort.parent / f"{s}.nii.gz")
                      for s, p in zip(table.subject, table.path)])  # fmt: skip
    planted = table["planted"].to_numpy() == 1
    assert np.all(ratio[planted] > 1.006) and np.all(np.abs(ratio[~planted] - 1) < 0.004)

    # The effect map, in template space, peaks at the poles.
    emap = nib.load(out / "planted_effect.nii.gz")
    peak = nib.affines.apply_affine(emap.affine, np.unravel_index(np.argmax(np.abs(emap.get_fdata())), emap.shape))
    assert min(np.linalg.norm(peak - np.array(c)) for c in local_region("occipital_poles").centers_mm) < 30
    description = json.loads((out / "planted.json").read_text())
    assert description["effect"] == "enlarge" and sorted(description["planted_subjects"]) == sorted(
        table.subject[planted]
    )
    assert description["region_volume_ratio_on_template"] == pytest.approx(1.3, abs=0.01)

    processed = tmp_path / "processed"
    prepare(data_config(result.manifest, processed))
    subjects = pd.read_csv(processed / "subjects.csv", dtype={"subject_id": str})
    assert subjects["planted"].tolist() == table["planted"].tolist()
    assert subjects["tiv"].tolist() == pytest.approx(table["tiv"].tolist())
    assert (processed / "ground_truth" / "planted_effect.nii.gz").is_file()
    assert json.loads((processed / "ground_truth" / "planted.json").read_text())["effect"] == "enlarge"
    # The same seed plants into the same subjects.
    again = plant(PlantSpec(effect="enlarge", magnitude=0.3, seed=1), data_config(cohort, tmp_path / "u"), out)
    assert pd.read_csv(again.manifest)["planted"].tolist() == table["planted"].tolist()


def test_scale_and_intensity_effects_are_what_they_say(cohort, tmp_path):
    scaled = plant(PlantSpec(effect="scale", magnitude=0.1), data_config(cohort, tmp_path / "u"), tmp_path / "s")
    table = pd.read_csv(scaled.manifest, dtype={"subject": str})
    for s, p, g in zip(table.subject, table.path, table.planted):
        ratio = mask_volume(tmp_path / "s" / p) / mask_volume(cohort.parent / f"{s}.nii.gz")
        assert ratio == pytest.approx(1.1 if g else 1.0, abs=0.015)  # 3 mm voxels: +-0.5 % of quantisation

    darker = plant(PlantSpec(effect="intensity", region="occipital_poles", magnitude=-0.2),
                   data_config(cohort, tmp_path / "u"), tmp_path / "i")  # fmt: skip
    table = pd.read_csv(darker.manifest, dtype={"subject": str})
    tpl = load_template()
    for s, p, g in zip(table.subject, table.path, table.planted):
        new, old = nib.load(tmp_path / "i" / p), nib.load(cohort.parent / f"{s}.nii.gz")
        world = nib.affines.apply_affine(new.affine, np.argwhere(np.asanyarray(new.dataobj) > 0))
        scale = (mask_volume(cohort.parent / f"{s}.nii.gz") / (tpl.brain_mask.sum())) ** (1 / 3)
        pole = tpl.center_mm + scale * (np.array(local_region("occipital_poles").centers_mm[0]) - tpl.center_mm)
        near = np.argwhere(np.asanyarray(new.dataobj) > 0)[np.linalg.norm(world - pole, axis=1) < 10]
        ratio = np.asanyarray(new.dataobj)[tuple(near.T)].mean() / np.asanyarray(old.dataobj)[tuple(near.T)].mean()
        assert ratio == pytest.approx(0.82 if g else 1.0, abs=0.04)
        assert mask_volume(tmp_path / "i" / p) == pytest.approx(mask_volume(cohort.parent / f"{s}.nii.gz"), rel=0.004)


def test_bad_requests_are_refused_by_name(cohort, tmp_path):
    cfg = data_config(cohort, tmp_path / "u")
    with pytest.raises(ValueError, match="must lie outside the input cohort's folder"):
        plant(PlantSpec(), cfg, cohort.parent.parent)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an earlier positive control"):
        plant(PlantSpec(), cfg, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="unknown local region 'frontal_poles'"):
        PlantSpec(region="frontal_poles")
    with pytest.raises(ValueError, match="magnitude must be a non-zero number above -1"):
        PlantSpec(magnitude=-1.5)
