"""Brain figures drawn by nilearn in world coordinates, and NIfTI files whose affine places voxels correctly.

Orientation and placement are checked on the rendered pixels: a bright block on the subject's right must be
drawn right of the midline of the axial cut, at the world position the grid's affine gives it.
"""

from __future__ import annotations

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pytest
from matplotlib.figure import Figure

from brainlatent.directions.direction import Direction
from brainlatent.directions.study import DirectionStudy, write_study
from brainlatent.directions.traversal import group_difference_map
from brainlatent.grid import Grid
from brainlatent.viz.images import centred_affine
from brainlatent.viz.montage import save_nifti, triplanar_montage
from brainlatent.viz.traversal import save_difference_map, save_glass_brain, signed_map
from brainlatent.viz.viewer import external_references, viewer_iframe, viewer_page

GRID = Grid.box((12, 16, 12), (96.0, 128.0, 96.0), (2.0, -18.0, 18.0))  # 8 mm voxels, off-origin centre


def _brain() -> np.ndarray:
    """An ellipsoid 'brain' with a bright block on the subject's right (x > 0 voxels: RAS)."""
    ii, jj, kk = np.meshgrid(*[np.linspace(-1, 1, s) for s in GRID.shape], indexing="ij")
    vol = 0.4 * ((ii**2 + jj**2 + kk**2) < 0.8)
    vol[9:11, 6:10, 5:8] = 1.0
    return vol.astype(np.float32)


def _texts(fig: Figure) -> set[str]:
    return {t.get_text() for ax in fig.axes for t in ax.texts} | {t.get_text() for t in fig.texts}


def _pixel(fig: Figure, ax, x_mm: float, y_mm: float) -> float:
    """Brightness of the rendered figure at world (x, y) mm of an axial cut's axes."""
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
    col, row = ax.transData.transform((x_mm, y_mm))
    return float(rgb[int(rgb.shape[0] - row), int(col)].mean())


def test_montage_draws_in_world_mm_with_the_subject_right_on_the_right(tmp_path):
    vol = _brain()
    fig = triplanar_montage(vol[None], titles=["subject 1"], path=tmp_path / "m.png", affine=GRID.affine,
                            slices=(9, 7, 6))
    assert (tmp_path / "m.png").is_file()
    x, y, z = (GRID.affine @ np.array([9, 7, 6, 1.0]))[:3]
    texts = _texts(fig)
    assert {f"x={x:.0f}", f"y={y:.0f}", f"z={z:.0f}", "L", "R", "subject 1"} <= texts, texts
    axial = next(ax for ax in fig.axes if ax.images and any(t.get_text() == f"z={z:.0f}" for t in ax.texts))
    block_x = (GRID.affine @ np.array([9.5, 7, 6, 1.0]))[0]  # the bright block, right of the centre
    mirror_x = 2 * GRID.center_mm[0] - block_x
    assert _pixel(fig, axial, block_x, y) > 200 > 150 > _pixel(fig, axial, mirror_x, y)


def test_montage_without_affine_measures_from_the_centre():
    fig = triplanar_montage(_brain(), voxel_mm=(8, 8, 8))
    assert {"x=0", "y=0", "z=0"} <= _texts(fig) or {"x=4", "y=4", "z=4"} <= _texts(fig)
    with pytest.raises(ValueError, match="got 2 titles for 1 volumes"):
        triplanar_montage(_brain(), titles=["a", "b"])
    with pytest.raises(ValueError, match="affine must be an invertible 4x4"):
        triplanar_montage(_brain(), affine=np.zeros((4, 4)))


def test_save_nifti_keeps_the_grid_affine_as_qform_and_sform(tmp_path):
    vol = _brain()
    img = nib.load(save_nifti(vol, GRID.affine, tmp_path / "v.nii.gz"))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.get_fdata(), vol)
    for matrix, code in (img.header.get_qform(coded=True), img.header.get_sform(coded=True)):
        assert code == 2 and np.allclose(matrix, GRID.affine)  # "aligned": FSLeyes / ITK-SNAP read either
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert img.header.get_xyzt_units()[0] == "mm"
    with pytest.raises(ValueError, match=r"save_nifti .*bad.nii.gz: expected an \(X, Y, Z\) volume"):
        save_nifti(vol[0], GRID.affine, tmp_path / "bad.nii.gz")


def test_difference_map_is_a_thresholded_stat_map_cut_at_its_peak(tmp_path):
    diff = np.zeros(GRID.shape, np.float32)
    diff[3, 10, 8] = 2.0  # peak, left hemisphere
    diff[8, 10, 8] = -0.05  # in the same coronal and axial cuts, below the default threshold (0.05 * vmax = 0.1)
    path = save_difference_map(diff, tmp_path / "d.png", background=_brain(), title="older - younger",
                               label="paired t", vmax=2.0, affine=GRID.affine)
    rgb = iio.imread(path)[..., :3].astype(int)
    assert rgb.shape[:2] == (340, 900)
    maps = rgb[:, :850]  # the cuts, without the colour bar (which holds both colours)
    red = (maps[..., 0] > maps[..., 1] + 60) & (maps[..., 0] > maps[..., 2] + 40)
    blue = (maps[..., 2] > maps[..., 0] + 40) & (maps[..., 2] > maps[..., 1] + 20)
    assert red.sum() > 50 and blue.sum() == 0  # the peak is drawn, the sub-threshold voxel is not
    with pytest.raises(ValueError, match=r"threshold 3.0 must lie in \[0, vmax=2\)"):
        save_difference_map(diff, tmp_path / "bad.png", vmax=2.0, threshold=3.0, affine=GRID.affine)
    with pytest.raises(ValueError, match="background .* does not match"):
        save_difference_map(diff, tmp_path / "bad.png", background=_brain()[:-1], affine=GRID.affine)


def test_glass_brain_and_viewer_are_written(tmp_path):
    diff = np.zeros(GRID.shape, np.float32)
    diff[3, 10, 8] = 2.0
    m = signed_map(diff, "age_old", affine=GRID.affine, voxel_mm=None, vmax=None, threshold=None)
    assert (m.vmax, m.threshold) == pytest.approx((2.0, 0.1))  # a sparse map keeps its scale
    png = save_glass_brain(m, tmp_path / "g.png", title="age_old")
    assert iio.imread(png).shape[:2] == (280, 900)
    page = viewer_page(diff, affine=GRID.affine, background=_brain(), title="age_old")
    assert external_references(page) == [] and "<script" in page and "brainsprite" in page.lower()
    assert "raw.githubusercontent" not in page  # nilearn's favicon, the one thing it would fetch
    frame = viewer_iframe(page, title="age_old")
    assert frame.startswith("<iframe") and "<script" not in frame  # the page is escaped into srcdoc
    assert external_references('<img src="https://cdn.example/x.png"><a href="#top"><a href="metrics.csv">'
                               '<link rel="stylesheet" href="x.css">') == ["https://cdn.example/x.png", "x.css"]


def test_directions_write_study_keeps_the_affine_of_every_traversal(tmp_path):
    """The directions stage's files: 4D traversals and maps on the grid's affine, figures from nilearn."""
    rng = np.random.default_rng(0)
    steps = np.array([-2.0, 0.0, 2.0])
    traversals = (_brain()[None, None] + 0.01 * rng.normal(size=(3, 3, *GRID.shape))).astype(np.float32)
    traversals[:, 2, 9, 7, 6] += 0.5
    v = np.ones(4) / 2.0
    study = DirectionStudy(Direction("age_old", v, step_sd=1.0, center=0.0, positive="older"), traversals,
                           group_difference_map(traversals), None, {})
    write_study(tmp_path, "age_old", study, ["s0", "s1", "s2"], steps, GRID, n_strip=1)
    trav = nib.load(tmp_path / "traversals" / "age_old_s0.nii.gz")
    assert trav.shape == (*GRID.shape, 3) and np.allclose(trav.affine, GRID.affine)
    assert nib.aff2axcodes(trav.affine) == ("R", "A", "S")
    np.testing.assert_allclose(trav.get_fdata()[..., 2], traversals[0, 2], atol=1e-6)
    for kind in ("mean_difference", "t_statistic"):
        assert np.allclose(nib.load(tmp_path / "maps" / f"age_old_{kind}.nii.gz").affine, GRID.affine)
    for name in ("age_old_difference.png", "age_old_tmap.png", "age_old_s0_strip.png", "age_old_s0.gif"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000, name
    assert len(iio.imread(tmp_path / "figures" / "age_old_s0.gif", index=None)) == 2 * len(steps) - 2


def test_centred_affine_puts_the_origin_at_the_volume_centre():
    affine = centred_affine((12, 16, 12), (8, 8, 8))
    assert np.allclose(affine @ np.array([5.5, 7.5, 5.5, 1.0]), [0, 0, 0, 1])
    with pytest.raises(ValueError, match="voxel_mm must be three positive sizes"):
        centred_affine((4, 4, 4), (1, 0, 1))
