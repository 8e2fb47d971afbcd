"""Template regions, their mapping onto processing grids, and intensity-based volume measurements."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from brainlatent import anatomy
from brainlatent.grid import Grid

# prepare's default box; the centre is arbitrary (the atlas is re-centred on the template brain).
GRID = Grid.box((32, 40, 32), (176.0, 220.0, 176.0), (3.0, -10.0, 20.0))


@pytest.fixture(scope="module")
def tpl() -> anatomy.Template:
    return anatomy.load_template()


@pytest.fixture(scope="module")
def template_volume(tpl) -> np.ndarray:
    """The template as `prepare` would deliver it: on the grid, brain percentiles mapped to [0, 1]."""
    lo, hi = np.percentile(tpl.t1[tpl.brain_mask], anatomy.DEFAULT_PERCENTILES)
    return np.clip((anatomy.atlas_on_grid(GRID).t1 - lo) / (hi - lo), 0.0, 1.0)


def test_template_regions(tpl):
    assert tpl.shape == (197, 233, 189)
    _, n = ndimage.label(tpl.ventricles)
    assert n == 2  # left and right lateral ventricles
    assert 8_000 < tpl.ventricles.sum() < 25_000  # mm^3 (1 mm voxels); young adults ~7-20 ml
    assert np.array_equal(tpl.ventricles, tpl.ventricles[::-1])  # the 2009a template is symmetric
    assert tpl.t1[tpl.ventricles].mean() < 0.4 < 0.8 < tpl.t1[tpl.wm_core].mean()
    assert (tpl.ventricles <= tpl.ventricle_roi).all() and (tpl.ventricle_roi <= tpl.brain_mask).all()
    assert tpl.ventricle_roi.sum() > 4 * tpl.ventricles.sum()
    assert not (tpl.wm_core & tpl.ventricle_roi).any() and not (tpl.cortex & tpl.ventricles).any()
    assert (tpl.cortex <= tpl.brain_mask).all() and tpl.gm[tpl.cortex].mean() > 0.5
    np.testing.assert_allclose(tpl.center_mm, [0.0, -22.0, 9.5], atol=1.0)


def test_tissue_levels_are_ordered():
    levels = anatomy.tissue_levels()
    assert 0.0 <= levels.csf < 0.2 < levels.gm < 0.8 < levels.wm <= 1.0


def test_atlas_on_grid_is_centred_on_the_template_brain(tpl):
    atlas = anatomy.atlas_on_grid(GRID)
    assert anatomy.atlas_on_grid(GRID) is atlas  # cached
    np.testing.assert_allclose(atlas.grid.center_mm, tpl.center_mm)
    np.testing.assert_allclose(atlas.grid.voxel_mm, GRID.voxel_mm)
    rois = (atlas.brain, atlas.ventricle_roi, atlas.cortex_roi, atlas.wm_core, atlas.gm, atlas.wm,
            *atlas.regions.values())
    for roi in rois:
        assert roi.shape == GRID.shape and roi.min() >= 0.0 and roi.max() <= 1.0
    # Anti-aliased resampling keeps volumes.
    assert atlas.brain.sum() * GRID.voxel_volume_mm3 == pytest.approx(tpl.brain_mask.sum(), rel=0.01)
    assert atlas.ventricle_roi.sum() * GRID.voxel_volume_mm3 == pytest.approx(tpl.ventricle_roi.sum(), rel=0.05)
    # The ventricle ROI lands where the template ventricles are.
    ijk = ndimage.center_of_mass(atlas.ventricle_roi)
    expected = nib.affines.apply_affine(tpl.affine, ndimage.center_of_mass(tpl.ventricle_roi))
    np.testing.assert_allclose(nib.affines.apply_affine(atlas.grid.affine, ijk), expected, atol=1.0)


def test_resample_array_keeps_mass_and_position():
    data = np.zeros((40, 40, 40), np.float32)
    data[10:20, 15:30, 20:28] = 1.0
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    grid = Grid.box((12, 12, 12), (48.0, 48.0, 48.0), (19.5, 19.5, 19.5))
    out = anatomy.resample_array(data, affine, grid)
    assert out.sum() * grid.voxel_volume_mm3 == pytest.approx(data.sum(), rel=0.02)
    center = nib.affines.apply_affine(grid.affine, ndimage.center_of_mass(out))
    np.testing.assert_allclose(center, ndimage.center_of_mass(data), atol=0.3)


# -------------------------------------------------------------------------------- measurements
def test_template_measures_like_the_template(tpl, template_volume):
    m = anatomy.measure_volumes(template_volume[None], GRID)
    assert list(m.columns) == list(anatomy.MEASURE_COLUMNS) and len(m) == 1
    parenchyma = ((tpl.gm + tpl.wm) * tpl.brain_mask).sum()
    assert m.brain_volume_mm3[0] == pytest.approx(parenchyma, rel=0.05)
    # 5.5 mm voxels blur the thin ventricles into their walls: the soft measure sees about half of them.
    assert 0.3 * tpl.ventricles.sum() < m.ventricle_volume_mm3[0] < 1.5 * tpl.ventricles.sum()
    assert m.gm_volume_mm3[0] > 0 and m.sex_region_volume_mm3[0] > 0


def test_darker_ventricle_roi_measures_larger_ventricles(template_volume):
    atlas = anatomy.atlas_on_grid(GRID)
    levels = anatomy.tissue_levels()
    near = atlas.ventricle_roi > 0.9
    volumes = []
    for csf_fraction in (0.0, 0.2, 0.4, 0.6):  # turn tissue there into CSF, more and more
        v = template_volume.copy()
        v[near] = (1 - csf_fraction) * v[near] + csf_fraction * levels.csf
        volumes.append(v)
    m = anatomy.measure_volumes(np.stack(volumes), GRID)
    assert np.all(np.diff(m.ventricle_volume_mm3) > 0)
    assert np.all(np.diff(m.brain_volume_mm3) < 0)
    np.testing.assert_allclose(m.gm_volume_mm3, m.gm_volume_mm3[0], rtol=0.02)  # the cortex is elsewhere


def test_thinner_cortex_measures_less_grey_matter(template_volume):
    atlas = anatomy.atlas_on_grid(GRID)
    levels = anatomy.tissue_levels()
    ribbon = (atlas.cortex_roi > 0.5) & (atlas.wm_core == 0) & (atlas.ventricle_roi == 0)
    thin = template_volume.copy()
    thin[ribbon] = levels.csf + 0.7 * (thin[ribbon] - levels.csf)  # GM partly turned into CSF
    m = anatomy.measure_volumes(np.stack([template_volume, thin]), GRID)
    assert m.gm_volume_mm3[1] < 0.95 * m.gm_volume_mm3[0]
    assert m.ventricle_volume_mm3[1] == pytest.approx(m.ventricle_volume_mm3[0], rel=0.05)


def test_measure_ignores_a_global_contrast_change(template_volume):
    levels = anatomy.tissue_levels()
    brighter = np.clip(levels.csf + 1.08 * (template_volume - levels.csf), 0, 1)  # e.g. other normalisation
    m = anatomy.measure_volumes(np.stack([template_volume, brighter]), GRID)
    np.testing.assert_allclose(m.iloc[1], m.iloc[0], rtol=0.03)


def test_measure_accepts_float16_memmap_and_single_volume(tmp_path, template_volume):
    path = tmp_path / "volumes.npy"
    np.save(path, np.stack([template_volume, template_volume]).astype(np.float16))
    from_memmap = anatomy.measure_volumes(np.load(path, mmap_mode="r"), GRID)
    single = anatomy.measure_volumes(template_volume, GRID)
    assert len(from_memmap) == 2 and len(single) == 1
    np.testing.assert_allclose(from_memmap.iloc[0], single.iloc[0], rtol=1e-3)


def test_measure_rejects_volumes_off_the_grid():
    with pytest.raises(ValueError, match=r"expected shape \(N, 32, 40, 32\)"):
        anatomy.measure_volumes(np.zeros((2, 16, 16, 16), np.float32), GRID)


# --------------------------------------------------------------------------------- effect maps
def test_load_effect_map_lines_up_with_the_atlas(tmp_path, tpl):
    # A template-space map at 2 mm (like the synthetic cohort's effect maps): the ventricles.
    affine = tpl.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    path = tmp_path / "effect.nii.gz"
    nib.save(nib.Nifti1Image(tpl.ventricles[::2, ::2, ::2].astype(np.float32), affine), path)
    on_grid = anatomy.load_effect_map(path, GRID)
    assert on_grid.shape == GRID.shape
    atlas = anatomy.atlas_on_grid(GRID)
    assert np.corrcoef(on_grid.ravel(), atlas.ventricle_roi.ravel())[0, 1] > 0.6
    # A map already on the (template-centred) grid comes back unchanged.
    again = tmp_path / "on_grid.nii.gz"
    nib.save(nib.Nifti1Image(on_grid, atlas.grid.affine), again)
    np.testing.assert_array_equal(anatomy.load_effect_map(again, GRID), on_grid)


def test_load_effect_map_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="effect map not found"):
        anatomy.load_effect_map(tmp_path / "missing.nii.gz", GRID)
    path = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), path)
    with pytest.raises(ValueError, match="expected a 3D effect map"):
        anatomy.load_effect_map(path, GRID)


# ------------------------------------------------------------------------ other contrasts, regions
def _prepared(t1: np.ndarray, tpl) -> np.ndarray:
    """A 1 mm brain as `prepare` would deliver it on GRID: brain percentiles -> [0, 1], anti-aliased."""
    lo, hi = np.percentile(t1[tpl.brain_mask], anatomy.DEFAULT_PERCENTILES)
    grid = anatomy.atlas_on_grid(GRID).grid
    return np.clip((anatomy.resample_array(t1, tpl.affine, grid) - lo) / (hi - lo), 0.0, 1.0)


def _rendered(tpl, intensities) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The template's anatomy rendered from its tissue maps with CSF, GM, WM ``intensities``, as `prepare`
    delivers it, and those intensities after prepare's normalisation."""
    intensities = np.asarray(intensities, float)
    t1 = (intensities[0] * tpl.csf + intensities[1] * tpl.gm + intensities[2] * tpl.wm) * tpl.brain_mask
    lo, hi = np.percentile(t1[tpl.brain_mask], anatomy.DEFAULT_PERCENTILES)
    return _prepared(t1, tpl), tuple((intensities - lo) / (hi - lo))


@pytest.fixture(scope="module")
def other_contrast(tpl) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Another scanner's contrast: GM/WM 0.55, CSF/WM 0.15 (the template's: ~0.75 and ~0.3)."""
    return _rendered(tpl, (150.0, 550.0, 1000.0))


def test_tissue_levels_are_fitted_to_the_data(other_contrast, template_volume):
    volume, expected = other_contrast
    fitted = anatomy.estimate_tissue_levels(volume, GRID)
    np.testing.assert_allclose([fitted.csf, fitted.gm, fitted.wm], expected, atol=0.06)
    template = anatomy.tissue_levels()
    assert abs(fitted.gm - template.gm) > 0.1  # a contrast the template's levels would misread
    on_template = anatomy.estimate_tissue_levels(template_volume, GRID)
    np.testing.assert_allclose([on_template.csf, on_template.gm, on_template.wm],
                               [template.csf, template.gm, template.wm], atol=0.08)


def test_measures_do_not_depend_on_the_contrast(tpl, other_contrast):
    """The same anatomy under three contrasts measures the same with levels fitted to each; the template's
    fixed levels misread the other contrasts."""
    reference = anatomy.measure_volumes(_rendered(tpl, (280.0, 650.0, 870.0))[0], GRID)  # the template's ratios
    for volume in (other_contrast[0], _rendered(tpl, (400.0, 750.0, 950.0))[0]):  # darker, then flatter
        np.testing.assert_allclose(anatomy.measure_volumes(volume, GRID).iloc[0], reference.iloc[0], rtol=0.1)
    fixed = anatomy.measure_volumes(other_contrast[0], GRID, levels="template")
    assert fixed.ventricle_volume_mm3[0] > 1.3 * reference.ventricle_volume_mm3[0]
    assert fixed.brain_volume_mm3[0] < 0.97 * reference.brain_volume_mm3[0]


def test_ventricles_grow_under_another_contrast(other_contrast):
    volume, (csf, _, _) = other_contrast
    near = anatomy.atlas_on_grid(GRID).ventricle_roi > 0.9
    volumes = []
    for csf_fraction in (0.0, 0.2, 0.4, 0.6):
        v = volume.copy()
        v[near] = (1 - csf_fraction) * v[near] + csf_fraction * csf
        volumes.append(v)
    m = anatomy.measure_volumes(np.stack(volumes), GRID)
    assert np.all(np.diff(m.ventricle_volume_mm3) > 0) and np.all(np.diff(m.brain_volume_mm3) < 0)
    # Levels of a reference set, passed explicitly (e.g. real scans when measuring generated ones): each
    # volume then measures as it does against that set, whatever else is in the call.
    levels = anatomy.estimate_tissue_levels(volume, GRID)
    against = anatomy.measure_volumes(np.stack(volumes), GRID, levels=levels)
    assert np.all(np.diff(against.ventricle_volume_mm3) > 0)
    np.testing.assert_allclose(against.iloc[0], anatomy.measure_volumes(volume, GRID).iloc[0], rtol=1e-6)


def test_no_t1_contrast_falls_back_to_the_template_levels(caplog):
    noise = np.random.default_rng(0).uniform(0, 1, (2, *GRID.shape)).astype(np.float32)
    with caplog.at_level("WARNING", logger="brainlatent.anatomy"):
        fallback = anatomy.measure_volumes(noise, GRID)
    assert "not a T1 contrast" in caplog.text
    np.testing.assert_allclose(fallback, anatomy.measure_volumes(noise, GRID, levels="template"))
    with pytest.raises(ValueError, match="levels: expected 'data', 'template'"):
        anatomy.measure_volumes(noise, GRID, levels="scanner")


def test_sex_region_follows_the_cohort(tmp_path, template_volume):
    temporal = anatomy.measure_volumes(template_volume, GRID)
    occipital = anatomy.measure_volumes(template_volume, GRID, sex_region="occipital_poles")
    assert occipital.sex_region_volume_mm3[0] != pytest.approx(temporal.sex_region_volume_mm3[0], rel=0.05)
    np.testing.assert_allclose(occipital.drop(columns="sex_region_volume_mm3"),
                               temporal.drop(columns="sex_region_volume_mm3"))
    with pytest.raises(ValueError, match="unknown region 'cerebellum'"):
        anatomy.measure_volumes(template_volume, GRID, sex_region="cerebellum")

    assert anatomy.sex_region_of(tmp_path) == anatomy.DEFAULT_SEX_REGION  # no cohort.json: real data
    assert anatomy.sex_region_of(None) == anatomy.DEFAULT_SEX_REGION
    (tmp_path / "cohort.json").write_text('{"effects": {"sex_local": {"region": "occipital_poles"}}}')
    assert anatomy.sex_region_of(tmp_path) == "occipital_poles"
    (tmp_path / "cohort.json").write_text('{"effects": {"sex_local": {"region": "bilateral temporal poles"}}}')
    with pytest.raises(ValueError, match="is not one of"):
        anatomy.sex_region_of(tmp_path)
    (tmp_path / "cohort.json").write_text('{"effects": {}}')  # written before the recipes
    assert anatomy.sex_region_of(tmp_path) == "temporal_poles"


def test_local_regions(tpl):
    for name, region in anatomy.LOCAL_REGIONS.items():
        mask = tpl.region(name)
        ball = 4 / 3 * np.pi * region.radius_mm**3
        assert mask.sum() == pytest.approx(len(region.centers_mm) * ball, rel=0.05)  # balls apart, 1 mm voxels
        assert tpl.brain_mask[mask].mean() > 0.8  # mostly brain: the effect is planted in tissue
    assert not (tpl.region("temporal_poles") & tpl.region("occipital_poles")).any()
    with pytest.raises(ValueError, match="unknown local region"):
        anatomy.local_region("nowhere")
