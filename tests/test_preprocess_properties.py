"""Property-based tests (hypothesis) of preprocessing: random small shapes, affines (permuted / flipped axes,
anisotropic voxels, oblique rotations, translations) and intensities (constant, negative background, values
from 1e-30 to ~1e37). test_preprocess.py has the worked examples on ellipsoid phantoms; these check what must
hold for every input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from nibabel import orientations as ornt
from scipy.spatial.transform import Rotation

from brainlatent.data.preprocess import BadInputError, preprocess_image, read_brain, resample_to_grid
from brainlatent.grid import Grid

# Tiny files: 80 examples per property keep the module under ~20 s on 2 cores.
PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for every example (module scope: hypothesis re-runs the test body, not function fixtures)."""
    return tmp_path_factory.mktemp("nifti")


def save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), path)
    return path


# ------------------------------------------------------------------------------------------ strategies
sides = st.integers(6, 14)
voxel_sizes = st.tuples(*[st.floats(0.7, 4.0)] * 3)
translations = st.tuples(*[st.floats(-90.0, 90.0)] * 3)


@st.composite
def rotations(draw, max_deg: float = 25.0) -> np.ndarray:
    """Identity half of the time, else an oblique rotation of at most ``max_deg`` about each axis (small enough
    that the closest canonical orientation is unambiguous)."""
    if not draw(st.booleans()):
        return np.eye(3)
    angles = draw(st.tuples(*[st.floats(-max_deg, max_deg)] * 3))
    return Rotation.from_euler("xyz", angles, degrees=True).as_matrix()


@st.composite
def orientations(draw) -> np.ndarray:
    """A nibabel orientation array: each array axis -> a world axis (permuted), flipped or not."""
    perm = draw(st.permutations([0, 1, 2]))
    flips = draw(st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3))
    return np.array([[p, f] for p, f in zip(perm, flips)], dtype=float)


@st.composite
def ras_affines(draw, shape) -> np.ndarray:
    """Voxel -> world with array axes ~ R, A, S: anisotropic voxels, an optional oblique rotation, a shift."""
    affine = np.eye(4)
    affine[:3, :3] = draw(rotations()) @ np.diag(draw(voxel_sizes))
    affine[:3, 3] = draw(translations)
    return affine


@st.composite
def intensities(draw, shape) -> np.ndarray:
    """A brain (ellipsoid mask around the array centre, never empty) with random intensities, background 0 or
    negative noise. Intensity scale 10**k for k in [-30, 37]: from tiny to near float32's maximum."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["constant", "uniform", "lognormal"]))
    scale = 10.0 ** draw(st.integers(-30, 37))
    radii = np.array([draw(st.floats(0.25, 0.45)) * s for s in shape])
    centre = (np.asarray(shape) - 1) / 2 + np.array([draw(st.floats(-1.0, 1.0)) for _ in shape])
    idx = np.moveaxis(np.indices(shape, dtype=float), 0, -1)
    inside = (((idx - centre) / radii) ** 2).sum(-1) <= 1
    inside[tuple(np.round((np.asarray(shape) - 1) / 2).astype(int))] = True
    if kind == "constant":
        brain = np.full(shape, 1.0)
    elif kind == "uniform":
        brain = rng.uniform(0.05, 1.0, shape)
    else:  # skewed, with a long bright tail the percentiles must ignore
        brain = rng.lognormal(0.0, 1.0, shape) / 20
    data = np.where(inside, brain * scale, 0.0)
    if draw(st.booleans()):  # negative background (e.g. a bias-corrected image): not brain, mask is > 0
        data = np.where(inside, data, -rng.uniform(0, 1, shape) * scale)
    return np.clip(data, -np.finfo(np.float32).max, np.finfo(np.float32).max).astype(np.float32)


@st.composite
def brains(draw) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) stored in any orientation: a RAS-ish image re-stored with permuted / flipped axes."""
    shape = tuple(draw(sides) for _ in range(3))
    data, affine = draw(intensities(shape)), draw(ras_affines(shape))
    o = draw(orientations())
    return ornt.apply_orientation(data, o), affine @ ornt.inv_ornt_aff(o, shape)


grid_shapes = st.tuples(*[st.integers(4, 12)] * 3)
percentile_pairs = st.tuples(st.floats(0.0, 20.0), st.floats(80.0, 100.0))


def huge_brain() -> tuple[np.ndarray, np.ndarray]:
    """A flat brain at half float32's maximum on a background of minus that: float32 block sums overflow
    (before the float64 fallback in resample_to_grid this gave NaN voxels)."""
    big = np.finfo(np.float32).max / 2
    offset = np.moveaxis(np.indices((14, 14, 14), dtype=float), 0, -1) - 6.5
    return np.where(((offset / 5) ** 2).sum(-1) <= 1, big, -big).astype(np.float32), np.eye(4)


# ------------------------------------------------------------------------------------------ properties
@PROPERTY
@example(brain=huge_brain(), shape=(6, 6, 6), fov=(30.0, 30.0, 30.0), percentiles=(0.5, 99.5), fit_bbox=False)
@given(brain=brains(), shape=grid_shapes, fov=st.tuples(*[st.floats(20.0, 200.0)] * 3),
       percentiles=percentile_pairs, fit_bbox=st.booleans())
def test_output_has_the_grid_shape_dtype_and_range(scratch, brain, shape, fov, percentiles, fit_bbox):
    data, affine = brain
    path = save(data, affine, scratch / "any.nii")
    volume, qc = preprocess_image(path, shape, fov, percentiles, fit_bbox, head_size=False)
    assert volume.shape == shape and volume.dtype == np.float16
    assert np.isfinite(volume).all() and volume.min() >= 0 and volume.max() <= 1
    # QC measures come from the native image: mask = voxels > 0, percentiles of those voxels.
    stored = nib.load(path)
    native = stored.get_fdata(dtype=np.float32)
    positive = native[native > 0]
    voxel_mm3 = abs(np.linalg.det(stored.affine[:3, :3]))
    assert qc.brain_mask_volume_mm3 == pytest.approx(positive.size * voxel_mm3, rel=1e-6)
    lo, hi = np.percentile(positive, percentiles)
    assert qc.intensity_high == pytest.approx(float(hi), rel=1e-5)
    # Flat brains fall back to low = 0 (documented in intensity_range).
    assert qc.intensity_low == pytest.approx(float(lo), rel=1e-5) or (qc.intensity_low == 0 and hi - lo <= 1e-6 * hi)
    assert np.isfinite([qc.intensity_low, qc.intensity_high, qc.fov_overflow_mm, *qc.center_mm]).all()
    assert qc.fov_overflow_mm >= 0


@PROPERTY
@given(data=st.data(), percentiles=percentile_pairs)
def test_on_its_own_grid_a_volume_is_just_the_documented_normalisation(scratch, data, percentiles):
    """Resampled onto a grid identical to its own (a brain symmetric about the array centre, RAS voxels,
    fov = shape x voxel), the output is exactly clip((x - p_low) / (p_high - p_low), 0, 1) of the input,
    whichever orientation the file was stored in."""
    shape = tuple(data.draw(sides) for _ in range(3))
    voxel = np.array(data.draw(voxel_sizes))
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = data.draw(translations)
    values = data.draw(intensities(shape))
    # A mirror-symmetric mask puts the centre of mass exactly on the array centre, so the box is the source grid.
    inside = np.moveaxis(np.indices(shape, dtype=float), 0, -1) - (np.asarray(shape) - 1) / 2
    inside = ((inside / (0.4 * np.asarray(shape))) ** 2).sum(-1) <= 1
    values = np.where(inside, np.abs(values) + np.float32(1e-30), 0).astype(np.float32)
    o = data.draw(orientations())
    stored = save(ornt.apply_orientation(values, o), affine @ ornt.inv_ornt_aff(o, shape), scratch / "own.nii")
    volume, qc = preprocess_image(stored, shape, tuple(voxel * shape), percentiles, head_size=False)
    lo, hi = np.percentile(values[values > 0], percentiles)
    if hi - lo <= 1e-6 * hi:
        lo = 0.0
    assert (qc.intensity_low, qc.intensity_high) == pytest.approx((lo, hi), rel=1e-5)
    expected = np.clip((values.astype(np.float64) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(volume.astype(float), expected, atol=2e-3)


@PROPERTY
@given(data=st.data(), shape=grid_shapes, fit_bbox=st.booleans())
def test_reorienting_voxels_with_their_affine_changes_nothing(scratch, data, shape, fit_bbox):
    """The same world content stored with permuted / flipped array axes (nibabel.orientations) preprocesses
    to the same volume and QC: orientation is handled through the affine, never by the array layout."""
    native = tuple(data.draw(sides) for _ in range(3))
    values, affine = data.draw(intensities(native)), data.draw(ras_affines(native))
    o = data.draw(orientations())
    a = save(values, affine, scratch / "ras.nii")
    b = save(ornt.apply_orientation(values, o), affine @ ornt.inv_ornt_aff(o, native), scratch / "reoriented.nii")
    fov = (120.0, 140.0, 120.0)
    va, qa = preprocess_image(a, shape, fov, fit_bbox=fit_bbox, head_size=False)
    vb, qb = preprocess_image(b, shape, fov, fit_bbox=fit_bbox, head_size=False)
    np.testing.assert_allclose(va.astype(float), vb.astype(float), atol=2e-3)
    np.testing.assert_allclose(qa.center_mm, qb.center_mm, atol=1e-3)
    assert qa.brain_mask_volume_mm3 == pytest.approx(qb.brain_mask_volume_mm3, rel=1e-5)
    assert (qa.intensity_low, qa.intensity_high) == pytest.approx((qb.intensity_low, qb.intensity_high), rel=1e-6)


@PROPERTY
@given(brain=brains(), shape=grid_shapes, fit_bbox=st.booleans(), power=st.integers(-120, 126))
def test_scaling_intensities_changes_nothing(scratch, brain, shape, fit_bbox, power):
    """Multiplying every voxel by a power of two (exact in floating point) leaves the output unchanged and
    scales the QC intensities, from near float32's smallest normal number up to near its maximum."""
    data, affine = brain
    data = data / np.abs(data).max()  # in [-1, 1]: the scaled copy stays finite
    scaled = (data.astype(np.float64) * 2.0**power).astype(np.float32)
    assume(np.array_equal(scaled > 0, data > 0))  # no positive voxel flushed to zero
    fov = (120.0, 140.0, 120.0)
    v1, q1 = preprocess_image(save(data, affine, scratch / "unit.nii"), shape, fov, fit_bbox=fit_bbox, head_size=False)
    v2, q2 = preprocess_image(
        save(scaled, affine, scratch / "scaled.nii"), shape, fov, fit_bbox=fit_bbox, head_size=False
    )
    np.testing.assert_allclose(v2.astype(float), v1.astype(float), atol=2e-3)
    assert q2.intensity_high == pytest.approx(q1.intensity_high * 2.0**power, rel=1e-5)
    assert q2.intensity_low == pytest.approx(q1.intensity_low * 2.0**power, rel=1e-5, abs=1e-44)


@PROPERTY
@given(data=st.data(), subdivide=st.tuples(*[st.integers(2, 4)] * 3))
def test_upsampling_keeps_the_integral_up_to_the_array_edge(data, subdivide):
    """Trilinear interpolation with zero outside integrates to the sum of the voxels (each voxel's hat
    function integrates to one voxel volume). Sampled on a grid that splits every source voxel into k cells
    and covers the hats' whole support, the sum is exact: also for brains touching the array's edge, whose
    outermost half voxel scipy's mode="constant" used to drop."""
    n = np.array([data.draw(st.integers(2, 8)) for _ in range(3)])
    voxel = np.array(data.draw(voxel_sizes))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    values = rng.uniform(0, 1, tuple(n)).astype(np.float32)  # non-zero up to every face of the array
    affine = np.diag([*voxel, 1.0])
    affine[:3, 3] = data.draw(translations)
    k = np.asarray(subdivide)
    # Hats reach one voxel past the outermost centres: indices -1 .. n, i.e. n + 1 voxels of extent.
    centre = affine[:3, 3] + voxel * (n - 1) / 2
    grid = Grid.box(tuple((n + 1) * k), voxel * (n + 1), centre)
    out = resample_to_grid(values, affine, grid)
    assert out.astype(np.float64).sum() * grid.voxel_volume_mm3 == pytest.approx(
        values.astype(np.float64).sum() * np.prod(voxel), rel=1e-4)


@PROPERTY
@given(brain=brains(), shape=st.tuples(*[st.integers(8, 16)] * 3), margin=st.floats(1.2, 2.0))
def test_brain_volume_in_mm3_survives_resampling(scratch, brain, shape, margin):
    """fit_bbox false keeps physical size: a flat-intensity brain normalises to 1 inside, so the processed
    volume's sum times the grid's voxel volume is the native brain volume (partial volume included)."""
    data, affine = brain
    data = np.where(data > 0, 1000.0, 0.0).astype(np.float32)
    path = save(data, affine, scratch / "flat.nii")
    native = read_brain(path)
    # A box that holds the whole brain around its centre of mass, at any voxel size that still samples it.
    reach = np.maximum(native.bbox_max_mm - native.center_mm, native.center_mm - native.bbox_min_mm)
    fov = 2 * reach * margin
    grid = Grid.box(shape, fov, native.center_mm)
    src_voxel = np.sqrt((native.affine[:3, :3] ** 2).sum(axis=0))
    # A brain only a few voxels across (source or target) has no meaningful volume: sampling error dominates.
    assume(min(np.ptp(np.nonzero(native.data), axis=1)) >= 3)
    assume(((native.bbox_max_mm - native.bbox_min_mm) / grid.voxel_mm).min() >= 3)
    assume((grid.voxel_mm / src_voxel).max() < 8)
    volume, qc = preprocess_image(path, shape, tuple(fov), head_size=False)
    assert qc.fov_overflow_mm == 0
    measured = volume.astype(np.float64).sum() * grid.voxel_volume_mm3
    assert measured == pytest.approx(qc.brain_mask_volume_mm3, rel=0.12)


# ------------------------------------------------------------------------------------------ bad inputs
@PROPERTY
@given(brain=brains(), n_bad=st.integers(1, 5), bad=st.sampled_from([np.nan, np.inf, -np.inf]), seed=st.integers(0, 99))
def test_nan_or_inf_voxels_are_refused_and_counted(scratch, brain, n_bad, bad, seed):
    data, affine = brain
    data = data.copy()
    where = np.random.default_rng(seed).choice(data.size, size=min(n_bad, data.size), replace=False)
    data.flat[where] = bad
    path = save(data, affine, scratch / "nan.nii")
    with pytest.raises(BadInputError, match=rf"^{len(where)} NaN/Inf voxel\(s\)$"):
        preprocess_image(path, (8, 8, 8), (100.0, 100.0, 100.0), head_size=False)


@PROPERTY
@given(brain=brains(), seed=st.integers(0, 99))
def test_an_image_without_positive_voxels_is_refused(scratch, brain, seed):
    data, affine = brain
    negative = -np.abs(np.random.default_rng(seed).standard_normal(data.shape)).astype(np.float32)
    with pytest.raises(BadInputError, match="no positive voxels; expected a brain-extracted image"):
        preprocess_image(save(negative, affine, scratch / "neg.nii"), (8, 8, 8), (100.0, 100.0, 100.0), head_size=False)


def save_with_affine(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write ``affine`` verbatim as the sform (nibabel refuses to build an image from a singular affine, but
    files with one exist: a bad converter, zero pixdims)."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.float32)
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[:3]
    header["sform_code"], header["qform_code"] = 1, 0
    nib.save(nib.Nifti1Image(data.astype(np.float32), None, header=header), path)
    return path


@PROPERTY
@given(brain=brains(), kind=st.sampled_from(["zero column", "parallel columns", "nan", "inf"]),
       axis=st.integers(0, 2))
def test_a_singular_or_non_finite_affine_is_refused(scratch, brain, kind, axis):
    data, affine = brain
    bad = affine.copy()
    if kind == "zero column":
        bad[:3, axis] = 0
    elif kind == "parallel columns":
        bad[:3, axis] = 2 * bad[:3, (axis + 1) % 3]
    else:
        bad[axis, axis] = np.nan if kind == "nan" else np.inf
    path = save_with_affine(data, bad, scratch / "affine.nii")
    assert not np.isfinite(nib.load(path).affine).all() or abs(np.linalg.det(nib.load(path).affine)) < 1e-9
    with pytest.raises(BadInputError, match=r"invalid affine \(singular or non-finite\)"):
        preprocess_image(path, (8, 8, 8), (100.0, 100.0, 100.0), head_size=False)


@PROPERTY
@given(brain=brains(), extra=st.lists(st.integers(2, 3), min_size=1, max_size=2), drop=st.booleans())
def test_a_volume_that_is_not_3d_is_refused_with_its_shape(scratch, brain, extra, drop):
    data, affine = brain
    if drop:  # 2D: one slice
        data, expected = data[:, :, 0], "expected a 3D volume"
    else:  # a time series (4D) or more
        data = np.broadcast_to(data.reshape(*data.shape, *[1] * len(extra)), (*data.shape, *extra)).copy()
        expected = "4D image" if len(extra) == 1 else "expected a 3D volume"
    path = save(data, affine, scratch / "dims.nii")
    with pytest.raises(BadInputError, match=expected) as err:
        preprocess_image(path, (8, 8, 8), (100.0, 100.0, 100.0), head_size=False)
    assert str(tuple(data.shape)) in str(err.value)
    assert isinstance(err.value, ValueError)  # callers catch ValueError for every user mistake


# ------------------------------------------------------------------------------------------ the grid
@settings(max_examples=100, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 64)] * 3), fov=st.tuples(*[st.floats(1.0, 400.0)] * 3),
       centre=st.tuples(*[st.floats(-200.0, 200.0)] * 3))
def test_grid_box_has_its_fov_centre_and_survives_json(scratch, shape, fov, centre):
    grid = Grid.box(shape, fov, centre)
    assert grid.shape == shape
    np.testing.assert_allclose(grid.fov_mm, fov, rtol=1e-12)
    np.testing.assert_allclose(grid.center_mm, centre, atol=1e-9)
    np.testing.assert_allclose(grid.voxel_volume_mm3 * np.prod(shape), np.prod(fov), rtol=1e-9)
    # The first and last voxel centres sit half a voxel inside the box.
    first, last = grid.affine[:3, 3], nib.affines.apply_affine(grid.affine, np.asarray(shape) - 1)
    np.testing.assert_allclose(first - grid.voxel_mm / 2, np.asarray(centre) - np.asarray(fov) / 2, atol=1e-9)
    np.testing.assert_allclose(last + grid.voxel_mm / 2, np.asarray(centre) + np.asarray(fov) / 2, atol=1e-9)
    moved = grid.centered_at((0.0, 0.0, 0.0))
    assert moved.shape == grid.shape and np.allclose(moved.voxel_mm, grid.voxel_mm)
    path = scratch / "grid.json"
    grid.save(path)
    back = Grid.load(path)
    assert back.shape == grid.shape and np.array_equal(back.affine, grid.affine)  # JSON floats round-trip exactly
