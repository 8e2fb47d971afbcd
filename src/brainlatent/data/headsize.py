"""Head size as the field estimates it: the template's intracranial volume scaled by the determinant of an
affine registration of the brain to the template (FreeSurfer's eTIV, SIENAX's scaling factor).

Our inputs are brain-extracted, so the registration matches the brain's outline (its mask surface) to the
MNI152 template's:

* points on the subject's mask surface (voxel faces between inside and outside: the exact surface of the
  voxelised mask, no half-voxel bias) are mapped into template space by an affine ``x -> M x + t``;
* each residual is the signed distance of the mapped point to the template's mask surface (a distance map
  computed once, with its gradient for an analytic Jacobian);
* the loss is robust (Cauchy, scale :data:`LOSS_SCALE_MM`), so that a stray bit of non-brain left by brain
  extraction barely pulls on the fit (a 13 ml blob on the template's outline: eTIV -2.9 ml; soft L1
  +6.3 ml; plain least squares +42 ml; the mask volume +13 ml).

``etiv_mm3 = V_template / det(M)``, with ``V_template`` the template brain mask's volume: the units of the
native brain-mask volume, equal to it for a brain that is an affine image of the template.

Why scipy and not a registration library: SimpleITK's affine registration (Mattes mutual information,
12 dof, 4 mm), measured on the synthetic cohorts, costs ~1.5 s per subject (all of ``prepare`` is ~25 ms),
is noisier than the mask volume (3.5 % vs 1.9 % residual SD against the planted scale) and reads the
ventricles' growth with age as head size (+0.9 %): intensity registration of a skull-stripped brain is
driven by its interior as much as by its outline. This fit costs ~0.1 s (BENCHMARKS.md, "Head size").

What it cannot do, and no estimate from a skull-stripped image can: volume added inside the brain reaches
the outline (the added volume is the flux through it), so a local enlargement that adds brain volume
(the tissue recipe's male occipital growth) moves this eTIV as much as the brain-mask volume (measured:
+1.11 % vs +1.15 %), and a compact bulge is absorbed by the affine's stretch rather than rejected. FreeSurfer's
eTIV escapes this only because it registers the whole head, skull included. A covariate that sees the skull
(HCP's ``FS_IntraCranial_Vol``, a manifest's ``tiv``) is given with the cohort through ``data.covariates``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage, optimize
from threadpoolctl import threadpool_limits

# Residuals (mm) beyond about this scale count less and less (Cauchy): above the sub-voxel noise of the
# surface, below the millimetres by which a bit of non-brain sticks out.
LOSS = "cauchy"
LOSS_SCALE_MM = 1.0
# Surface points used per subject (a seeded random subset): the fit's precision no longer improves beyond.
N_SURFACE_POINTS = 3000
_SEED = 0


@dataclass(frozen=True)
class _TemplateSurface:
    distance: np.ndarray  # (X, Y, Z) float32 signed distance (mm, > 0 outside) to the template mask surface
    gradient: np.ndarray  # (3, X, Y, Z) float32 its gradient (mm / mm)
    world_to_voxel: np.ndarray  # (4, 4)
    volume_mm3: float  # template brain-mask volume
    center_mm: np.ndarray  # (3,) template brain centre of mass


@lru_cache(maxsize=1)
def _template_surface() -> _TemplateSurface:
    """The MNI152 2009a brain mask's signed distance map at 1 mm, cropped to the brain + 20 mm (~6 s, once
    per process: not ``anatomy.load_template``, whose derived regions cost as much again)."""
    from nilearn import datasets  # imported here: nilearn's import is slow and most callers never need it

    img = datasets.load_mni152_brain_mask(resolution=1)
    full = np.asarray(img.get_fdata(dtype=np.float32)) > 0.5
    ijk = np.argwhere(full)
    lo = np.maximum(ijk.min(axis=0) - 20, 0)
    hi = np.minimum(ijk.max(axis=0) + 21, full.shape)
    mask = full[tuple(slice(a, b) for a, b in zip(lo, hi))]
    affine = img.affine @ nib.affines.from_matvec(np.eye(3), lo)
    voxel_mm = float(abs(affine[0, 0]))
    # Distances between voxel centres; the surface lies half a voxel past the last inside centre.
    outside = ndimage.distance_transform_edt(~mask) * voxel_mm - voxel_mm / 2
    inside = ndimage.distance_transform_edt(mask) * voxel_mm - voxel_mm / 2
    distance = np.where(mask, -inside, outside).astype(np.float32)
    gradient = np.stack(np.gradient(distance, voxel_mm)).astype(np.float32)
    return _TemplateSurface(
        distance=distance,
        gradient=gradient,
        world_to_voxel=np.linalg.inv(affine),
        volume_mm3=float(mask.sum()) * voxel_mm**3,
        center_mm=nib.affines.apply_affine(affine, np.argwhere(mask).mean(axis=0)),
    )


def surface_points(mask: np.ndarray, affine: np.ndarray, n: int = N_SURFACE_POINTS, seed: int = _SEED) -> np.ndarray:
    """World mm (3, n) of points on the faces between inside and outside voxels of ``mask`` (X, Y, Z) bool.

    A seeded random subset of all faces when there are more than ``n`` (every face otherwise).
    """
    faces = []
    for axis in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        edge = np.argwhere(mask[tuple(lo)] != mask[tuple(hi)]).astype(np.float64)
        edge[:, axis] += 0.5  # the face between voxel i and i + 1
        faces.append(edge)
    ijk = np.concatenate(faces)
    if len(ijk) > n:
        ijk = ijk[np.random.default_rng(seed).choice(len(ijk), n, replace=False)]
    return nib.affines.apply_affine(affine, ijk).T


@dataclass(frozen=True)
class HeadSize:
    """The registration behind one eTIV."""

    etiv_mm3: float
    matrix: np.ndarray  # (3, 3) M of subject -> template ``x -> M (x - c_s) + c_t + t``
    translation_mm: np.ndarray  # (3,) t
    rms_mm: float  # RMS distance of the surface points to the template surface after the fit
    outlier_fraction: float  # share of surface points further than 3 loss scales from it
    subject_center_mm: np.ndarray  # (3,) c_s
    template_center_mm: np.ndarray  # (3,) c_t

    def to_template(self, points: np.ndarray) -> np.ndarray:
        """Subject world mm (3, P) -> template (MNI) mm (3, P) under the fitted affine."""
        centred = points - self.subject_center_mm.reshape(3, 1)
        return self.matrix @ centred + (self.template_center_mm + self.translation_mm).reshape(3, 1)


def estimate_etiv(mask: np.ndarray, affine: np.ndarray, center_mm: np.ndarray | None = None) -> HeadSize:
    """eTIV of a brain given its mask (X, Y, Z) bool in voxel -> world ``affine`` (see the module docstring).

    ``center_mm``: the mask's centre of mass in world mm when already known (it starts the fit). Raises
    ValueError for an empty mask.
    """
    if not mask.any():
        raise ValueError("estimate_etiv: empty brain mask")
    tpl = _template_surface()
    pts = surface_points(mask, affine)
    if center_mm is None:
        center_mm = nib.affines.apply_affine(affine, np.argwhere(mask).mean(axis=0))
    centred = pts - np.asarray(center_mm, float).reshape(3, 1)
    native_volume = float(mask.sum()) * abs(np.linalg.det(affine[:3, :3]))
    scale = (tpl.volume_mm3 / native_volume) ** (1 / 3)
    w2v = tpl.world_to_voxel
    origin = tpl.center_mm.reshape(3, 1)

    def voxels(params: np.ndarray) -> np.ndarray:
        y = params[:9].reshape(3, 3) @ centred + origin + params[9:].reshape(3, 1)
        return w2v[:3, :3] @ y + w2v[:3, 3:]

    def residuals(params: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(tpl.distance, voxels(params), order=1, mode="nearest")

    def jacobian(params: np.ndarray) -> np.ndarray:
        v = voxels(params)
        g = np.stack([ndimage.map_coordinates(c, v, order=1, mode="nearest") for c in tpl.gradient])  # (3, P)
        # d r / d M_jk = g_j * x_k ; d r / d t_j = g_j
        return np.concatenate([(g[:, None, :] * centred[None, :, :]).reshape(9, -1), g]).T

    start = np.concatenate([(scale * np.eye(3)).ravel(), np.zeros(3)])
    # One BLAS thread: the (P, 12) problems are tiny, and threads fighting over the cores of a busy machine
    # made each SVD ~50x slower (measured).
    with threadpool_limits(1):
        fit = optimize.least_squares(
            residuals, start, jac=jacobian, loss=LOSS, f_scale=LOSS_SCALE_MM,
            x_scale=np.concatenate([np.full(9, 0.01), np.ones(3)]),
        )  # fmt: skip
    matrix = fit.x[:9].reshape(3, 3)
    det = float(np.linalg.det(matrix))
    if not det > 0:
        raise ValueError(f"estimate_etiv: the affine fit folded the brain (det {det:.3g})")
    r = residuals(fit.x)
    return HeadSize(
        etiv_mm3=tpl.volume_mm3 / det,
        matrix=matrix,
        translation_mm=fit.x[9:].copy(),
        rms_mm=float(np.sqrt(np.mean(r**2))),
        outlier_fraction=float(np.mean(np.abs(r) > 3 * LOSS_SCALE_MM)),
        subject_center_mm=np.asarray(center_mm, float).copy(),
        template_center_mm=tpl.center_mm.copy(),
    )
