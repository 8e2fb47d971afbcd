"""Smooth fields on regular lattices and the diffeomorphisms they generate (the synthetic cohorts' warps).

A :class:`LatticeField` holds displacements (mm) or scalar maps sampled on a regular lattice in world mm and
is evaluated anywhere by trilinear interpolation. Shape effects are stationary velocity fields integrated by
scaling and squaring (:func:`exp`), so they stay invertible (no folding) however strong the effect.

Points are (3, M) arrays throughout: contiguous per coordinate, which is what ``map_coordinates`` wants.
We write these few functions ourselves: MONAI and TorchIO warp images with dense torch fields on the image
grid, while here one composed backward map is evaluated only at the points a subject needs, in numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import erf

from brainlatent.grid import Grid


def col(v) -> np.ndarray:
    """A 3-vector as a (3, 1) column, to broadcast against (3, M) points."""
    return np.asarray(v, np.float64).reshape(3, 1)


def voxel_points(shape, flat_index: np.ndarray) -> np.ndarray:
    """Voxel coordinates (3, M) of the given flat (C-order) indices into an array of ``shape``."""
    return np.stack(np.unravel_index(flat_index, shape)).astype(np.float64)


@dataclass(frozen=True)
class LatticeField:
    """A field sampled on a regular lattice: ``values`` (C, nx, ny, nz), world mm = origin + spacing * ijk.

    C = 3 for displacements (mm), 1 for scalar maps. Zero outside the lattice (every field here decays to
    ~0 before the lattice edge, or the lattice covers everything it is evaluated at). Sampled trilinearly.
    """

    origin: np.ndarray
    spacing: float
    values: np.ndarray

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Field values (C, M) at world points (3, M)."""
        coords = (points - col(self.origin)) / self.spacing
        return np.stack(
            [ndimage.map_coordinates(c, coords, order=1, mode="constant", prefilter=False) for c in self.values]
        )

    def points(self) -> np.ndarray:
        """World mm (3, M) of every lattice point, C order."""
        shape = self.values.shape[1:]
        return col(self.origin) + self.spacing * voxel_points(shape, np.arange(int(np.prod(shape))))

    def max_norm(self) -> float:
        return float(np.sqrt((self.values**2).sum(axis=0)).max())

    def scaled(self, factor: float) -> LatticeField:
        return LatticeField(self.origin, self.spacing, (self.values * factor).astype(np.float32))


def lattice(lo, hi, spacing: float) -> LatticeField:
    """An all-zero 3-component field on the lattice covering the box [lo, hi] (world mm)."""
    lo = np.asarray(lo, np.float64)
    n = np.ceil((np.asarray(hi, np.float64) - lo) / spacing).astype(int) + 1
    return LatticeField(lo, float(spacing), np.zeros((3, *n), np.float32))


def exp(velocity: LatticeField, t: float) -> LatticeField:
    """Displacement of the flow of the stationary velocity ``t * velocity`` at time 1 (scaling and squaring).

    Each squaring composes the field with itself, u <- u + u o (id + u), after scaling it down until no
    step moves more than half a lattice cell: the result is a diffeomorphism however large ``t`` is.
    """
    vmax = abs(t) * velocity.max_norm()
    if vmax == 0:
        return LatticeField(velocity.origin, velocity.spacing, np.zeros_like(velocity.values))
    steps = max(0, math.ceil(math.log2(vmax / (0.5 * velocity.spacing)))) + 2
    u = velocity.scaled(t / 2**steps)
    pts = u.points()
    shape = velocity.values.shape
    for _ in range(steps):
        flat = u.values.reshape(3, -1)
        u = LatticeField(u.origin, u.spacing, (flat + u(pts + flat)).reshape(shape).astype(np.float32))
    return u


def random_field(rng: np.random.Generator, grid: Grid, spacing: float, smooth: float, components: int) -> LatticeField:
    """Gaussian-smoothed white noise on a lattice covering ``grid`` (+20 mm), unit RMS per component."""
    origin = grid.affine[:3, 3] - 20.0
    n = np.ceil((grid.fov_mm + 40.0) / spacing).astype(int) + 1
    noise = rng.standard_normal((components, *n))
    values = np.stack([ndimage.gaussian_filter(c, smooth / spacing, mode="wrap") for c in noise])
    values /= np.sqrt((values**2).mean(axis=tuple(range(1, values.ndim)), keepdims=True))
    return LatticeField(origin, spacing, values.astype(np.float32))


# ---------------------------------------------------------------------------------- local velocities
def radial_velocity(centers, sigma: float, spacing: float) -> LatticeField:
    """v(x) = sum_c (x - c) exp(-|x - c|^2 / 2 sigma^2): a radial expansion around each centre.

    Its divergence g(r) (3 - r^2 / sigma^2) integrates to zero: the region grows at the expense of a shell
    around it (volume-neutral). The lattice covers the centres +- 4 sigma.
    """
    centers = np.asarray(centers, np.float64)
    field = lattice(centers.min(axis=0) - 4 * sigma, centers.max(axis=0) + 4 * sigma, spacing)
    pts = field.points()
    v = np.zeros_like(pts)
    for c in centers:
        d = pts - col(c)
        v += d * np.exp(-(d**2).sum(axis=0) / (2 * sigma**2))
    return LatticeField(field.origin, field.spacing, v.reshape(field.values.shape).astype(np.float32))


def radial_mean_divergence(sigma: float, radius: float) -> float:
    """Mean of div v over the ball of ``radius`` around one centre of :func:`radial_velocity`."""
    r = np.linspace(0.0, radius, 2001)
    div = np.exp(-(r**2) / (2 * sigma**2)) * (3 - r**2 / sigma**2)
    return float(np.trapezoid(div * r**2, r) / np.trapezoid(r**2, r))


def source_velocity(centers, sigma: float, lo, hi, spacing: float) -> LatticeField:
    """The field of Gaussian sources: div v = sum_c exp(-|x - c|^2 / 2 sigma^2), curl-free.

    Unlike :func:`radial_velocity`, the divergence is positive everywhere, so the flow adds volume: the
    region grows and pushes everything around it outward (by ~1/r^2 far away). Radially, v(r) = M(r) / r^2
    with M(r) = int_0^r exp(-s^2 / 2 sigma^2) s^2 ds = sigma^3 (sqrt(pi/2) erf(r / sqrt(2) sigma)
    - (r / sigma) exp(-r^2 / 2 sigma^2)). Non-compact: the lattice [lo, hi] must cover every point warped.
    """
    field = lattice(lo, hi, spacing)
    pts = field.points()
    v = np.zeros_like(pts)
    for c in np.asarray(centers, np.float64):
        d = pts - col(c)
        r = np.sqrt((d**2).sum(axis=0))
        q = r / sigma
        mass = sigma**3 * (math.sqrt(math.pi / 2) * erf(q / math.sqrt(2)) - q * np.exp(-(q**2) / 2))
        # v = d M(r) / r^3; near the centre M(r) / r^3 -> 1/3 (series: 1/3 - q^2 / 10).
        small = q < 1e-2
        factor = np.where(small, 1 / 3 - q**2 / 10, mass / np.maximum(r, 1e-12) ** 3)
        v += d * factor
    return LatticeField(field.origin, field.spacing, v.reshape(field.values.shape).astype(np.float32))


def source_mean_divergence(sigma: float, radius: float) -> float:
    """Mean of div v over the ball of ``radius`` around one centre of :func:`source_velocity`."""
    r = np.linspace(0.0, radius, 2001)
    return float(np.trapezoid(np.exp(-(r**2) / (2 * sigma**2)) * r**2, r) / np.trapezoid(r**2, r))
