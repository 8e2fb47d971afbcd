"""Distribution metrics for generated volumes: FID, KID and RBF-MMD in feature space, MS-SSIM diversity.

FID, KID and MMD compare two sets of feature vectors, shapes ``(N, F)`` and ``(M, F)`` (numpy arrays or
tensors), produced by one :class:`~brainlatent.models.featurenet.FeatureExtractor`. Values computed with
different feature extractors (or different input shapes) are not comparable: see docs/metrics.md.

MS-SSIM diversity works on volumes ``(N, 1, X, Y, Z)`` in [0, 1] and needs no feature network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics.regression import compute_ms_ssim
from scipy.spatial.distance import pdist
from sklearn.metrics.pairwise import polynomial_kernel, rbf_kernel

# Wang et al. (2003) scale weights, finest scale first.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# (kernel size, Gaussian sigma) candidates, largest first; 11/1.5 is the standard SSIM window.
_MS_SSIM_KERNELS: tuple[tuple[int, float], ...] = ((11, 1.5), (7, 1.0), (5, 0.75))


# --------------------------------------------------------------------------------------------- inputs
def _as_features(x: np.ndarray | torch.Tensor, name: str, min_rows: int = 2) -> np.ndarray:
    """(N, F) features as float64 numpy; ValueError naming ``name`` if the shape or values are unusable."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected features of shape (N, F), got shape {tuple(arr.shape)}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name}: need at least {min_rows} feature vectors, got {arr.shape[0]}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return arr


def _check_same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"sample_features and real_features must have the same feature dimension, got {a.shape[1]} and "
            f"{b.shape[1]} (were they produced by the same feature extractor?)"
        )


# ------------------------------------------------------------------------------------------------ FID
def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``, with ``tr((S1 S2)^{1/2})`` computed as the sum
    of square roots of the eigenvalues of the symmetric PSD matrix ``S1^{1/2} S2 S1^{1/2}`` (same spectrum
    as ``S1 S2``). Written here instead of using MONAI's ``FIDMetric``, which takes ``scipy.linalg.sqrtm`` of
    the non-symmetric product: that returns complex values (and MONAI then raises) when covariances are
    rank-deficient, which is the normal case here (fewer volumes than feature dimensions). The test suite
    checks both agree on well-conditioned inputs.
    """
    root1 = _sqrtm_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical sets


def fid(sample_features: np.ndarray | torch.Tensor, real_features: np.ndarray | torch.Tensor) -> dict[str, float]:
    """3D FID: Fréchet distance between Gaussian fits of sample and real features.

    Args:
        sample_features: (N, F) features of generated volumes.
        real_features: (M, F) features of real volumes.

    Returns:
        ``{"fid": float}``. Biased upwards for small N (Chong & Forsyth, 2020): compare models only at
        equal N; prefer KID for small sets.
    """
    a = _as_features(sample_features, "sample_features")
    b = _as_features(real_features, "real_features")
    _check_same_dim(a, b)
    return {
        "fid": frechet_distance(a.mean(0), np.cov(a, rowvar=False).reshape(a.shape[1], a.shape[1]),
                                b.mean(0), np.cov(b, rowvar=False).reshape(b.shape[1], b.shape[1]))
    }


# ------------------------------------------------------------------------------------------- KID, MMD
def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) from kernel matrices (m, m), (n, n), (m, n)."""
    m, n = kxx.shape[0], kyy.shape[0]
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def kid(
    sample_features: np.ndarray | torch.Tensor,
    real_features: np.ndarray | torch.Tensor,
    n_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef0: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Kernel Inception Distance (Bińkowski et al., 2018): unbiased MMD^2 with the cubic polynomial kernel
    ``k(x, y) = (x.y / F + coef0) ** degree``, averaged over random subsets.

    Args:
        sample_features: (N, F); real_features: (M, F).
        n_subsets: number of random subset pairs.
        subset_size: subset size, capped at min(N, M) (must be >= 2).
        seed: seeds the subset draws.

    Returns:
        ``{"kid_mean", "kid_std"}`` over subsets. Unbiased: can be slightly negative when the sets match.
    """
    a = _as_features(sample_features, "sample_features")
    b = _as_features(real_features, "real_features")
    _check_same_dim(a, b)
    if n_subsets < 1 or subset_size < 2:
        raise ValueError(f"kid: need n_subsets >= 1 and subset_size >= 2, got {n_subsets} and {subset_size}")
    m = min(subset_size, a.shape[0], b.shape[0])
    gamma = 1.0 / a.shape[1]
    rng = np.random.default_rng(seed)

    def k(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return polynomial_kernel(p, q, degree=degree, gamma=gamma, coef0=coef0)

    values = np.empty(n_subsets)
    for i in range(n_subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        values[i] = _mmd2_unbiased(k(x, x), k(y, y), k(x, y))
    return {"kid_mean": float(values.mean()), "kid_std": float(values.std(ddof=1)) if n_subsets > 1 else 0.0}


def median_bandwidth(features: np.ndarray | torch.Tensor) -> float:
    """Median heuristic: the median pairwise Euclidean distance among ``features`` (N, F)."""
    x = _as_features(features, "features")
    sigma = float(np.median(pdist(x)))
    if sigma <= 0.0:
        raise ValueError("median_bandwidth: over half the feature pairs are identical; cannot set a bandwidth")
    return sigma


def mmd_rbf(
    sample_features: np.ndarray | torch.Tensor,
    real_features: np.ndarray | torch.Tensor,
    bandwidth: float | None = None,
) -> dict[str, float]:
    """Unbiased MMD^2 with the Gaussian kernel ``exp(-||x - y||^2 / (2 sigma^2))``.

    ``sigma`` defaults to the median heuristic computed on the *real* features only, so that every model
    compared against the same real set is scored with the same kernel (a pooled median would move the
    kernel with each model's samples).

    Returns:
        ``{"mmd_rbf": MMD^2, "mmd_rbf_bandwidth": sigma}``.
    """
    a = _as_features(sample_features, "sample_features")
    b = _as_features(real_features, "real_features")
    _check_same_dim(a, b)
    sigma = median_bandwidth(b) if bandwidth is None else float(bandwidth)
    if not sigma > 0:
        raise ValueError(f"mmd_rbf: bandwidth must be > 0, got {bandwidth}")
    gamma = 1.0 / (2.0 * sigma**2)
    kxx, kyy, kxy = (rbf_kernel(p, q, gamma=gamma) for p, q in ((a, a), (b, b), (a, b)))
    value = _mmd2_unbiased(kxx, kyy, kxy)
    return {"mmd_rbf": value, "mmd_rbf_bandwidth": sigma}


# ------------------------------------------------------------------------------------ MS-SSIM diversity
@dataclass(frozen=True)
class MsSsimSettings:
    """Window and scales of MS-SSIM for one volume shape (see :func:`ms_ssim_settings`)."""

    kernel_size: int
    kernel_sigma: float
    weights: tuple[float, ...]  # one per scale, finest first, sum 1

    @property
    def n_scales(self) -> int:
        return len(self.weights)


def _fits(shape: Sequence[int], n_scales: int, kernel: int) -> bool:
    # MONAI's own guard (size // (n_scales - 1)^2 > kernel - 1) and the real requirement that the coarsest
    # scale (size / 2^(n_scales - 1)) still holds one whole window for its 'valid' convolution.
    div = max(1, n_scales - 1) ** 2
    return all(s // div > kernel - 1 and s // 2 ** (n_scales - 1) >= kernel for s in shape)


def ms_ssim_settings(shape: Sequence[int]) -> MsSsimSettings:
    """Pick MS-SSIM window and number of scales for a volume shape (X, Y, Z).

    The standard setting (5 scales, 11-voxel window, sigma 1.5) needs >= 176 voxels per axis. Smaller volumes
    keep as many scales as fit, then shrink the window (11/1.5 -> 7/1.0 -> 5/0.75); the first weights of
    Wang et al. are renormalised to sum 1. E.g. 32x40x32 -> 3 scales, window 7; 16^3 -> 2 scales, window 7;
    64^3 -> 4 scales, window 7; 128^3 -> 5 scales, window 7; below 14 voxels on an axis a single scale is
    left (plain SSIM).
    """
    shape = tuple(int(s) for s in shape)
    for n_scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        for kernel, sigma in _MS_SSIM_KERNELS:
            if _fits(shape, n_scales, kernel):
                w = np.asarray(MS_SSIM_WEIGHTS[:n_scales])
                return MsSsimSettings(kernel, sigma, tuple(float(v) for v in w / w.sum()))
    smallest = _MS_SSIM_KERNELS[-1][0]
    raise ValueError(f"MS-SSIM: volume shape {shape} is too small; every axis needs >= {smallest + 1} voxels")


def _as_volumes(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 5 or t.shape[1] != 1:
        raise ValueError(f"{name}: expected volumes of shape (N, 1, X, Y, Z), got {tuple(t.shape)}")
    return t.float()


def ms_ssim(
    x: torch.Tensor, y: torch.Tensor, settings: MsSsimSettings | None = None, data_range: float = 1.0
) -> torch.Tensor:
    """Per-pair 3D MS-SSIM of ``x`` and ``y`` (both (B, 1, X, Y, Z)) -> (B,), via MONAI's ``compute_ms_ssim``."""
    x, y = _as_volumes(x, "x"), _as_volumes(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"ms_ssim: x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    s = settings or ms_ssim_settings(x.shape[2:])
    with torch.no_grad():
        out = compute_ms_ssim(
            x, y, spatial_dims=3, data_range=data_range, kernel_size=s.kernel_size, kernel_sigma=s.kernel_sigma,
            weights=s.weights,
        )
    return out.reshape(-1)


def _random_pairs(n: int, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n_pairs`` distinct unordered pairs (i < j) of range(n): all pairs if there are few enough."""
    i, j = np.triu_indices(n, k=1)
    pairs = np.stack([i, j], axis=1)
    if len(pairs) > n_pairs:
        pairs = pairs[rng.choice(len(pairs), n_pairs, replace=False)]
    return pairs


def ms_ssim_diversity_of(
    volumes: np.ndarray | torch.Tensor, n_pairs: int = 100, seed: int = 0, batch_size: int = 8
) -> float:
    """Mean ``1 - MS-SSIM`` over random distinct pairs of ``volumes`` (N, 1, X, Y, Z); 0 = all identical."""
    v = _as_volumes(volumes, "volumes")
    if v.shape[0] < 2:
        raise ValueError(f"ms_ssim_diversity: need at least 2 volumes, got {v.shape[0]}")
    settings = ms_ssim_settings(v.shape[2:])
    pairs = _random_pairs(v.shape[0], n_pairs, np.random.default_rng(seed))
    scores = [
        ms_ssim(v[chunk[:, 0]], v[chunk[:, 1]], settings)
        for chunk in np.array_split(pairs, math.ceil(len(pairs) / batch_size))
    ]
    return float(1.0 - torch.cat(scores).double().mean())


def ms_ssim_diversity(
    samples: np.ndarray | torch.Tensor, reals: np.ndarray | torch.Tensor, n_pairs: int = 100, seed: int = 0
) -> dict[str, float]:
    """Diversity of generated volumes next to that of real scans (mode collapse shows as samples << real).

    Returns:
        ``{"ms_ssim_diversity_samples", "ms_ssim_diversity_real", "ms_ssim_diversity_gap"}``, the gap being
        ``|samples - real|`` (lower is better).
    """
    div_s = ms_ssim_diversity_of(samples, n_pairs=n_pairs, seed=seed)
    div_r = ms_ssim_diversity_of(reals, n_pairs=n_pairs, seed=seed)
    return {
        "ms_ssim_diversity_samples": div_s,
        "ms_ssim_diversity_real": div_r,
        "ms_ssim_diversity_gap": abs(div_s - div_r),
    }
