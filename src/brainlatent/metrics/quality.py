"""Sample quality that agrees with the eye: a classifier two-sample test, the in-head intensity distance,
tissue-class fractions, and density / coverage of the real scans.

FID, KID and MMD (``metrics/generative.py``) judge samples through one feature network trained on brains;
noise or saturated blobs can land anywhere in its feature space (the issue's VAE noise scored the best FID).
The measures here look at the volumes themselves, and every one is fitted on the **real reference scans
only** (never on a template or fixed intensity levels), so they work for any cohort and contrast whose
volumes follow the processed-data contract (background 0, brain scaled into [0, 1]):

* **head mask** - voxels that are foreground (above 10% of the reals' 99th intensity percentile) in at
  least half of the real scans, holes filled (ventricles stay inside);
* ``intensity_w1`` - Wasserstein-1 distance between the pooled in-mask intensities of the samples and of
  the reals (the mean absolute difference of their quantile functions, on 1000 quantiles);
* ``tissue_tv`` - total-variation distance between the mean tissue-class fractions of the two sets. The
  three classes (dark / mid / bright: CSF / GM / WM on T1) are the components of a 3-class Gaussian mixture
  fitted to in-mask real intensities, turned into two thresholds so classes are intensity intervals;
* ``c2st_auc`` - classifier two-sample test (Lopez-Paz & Oquab, 2017): out-of-fold ROC AUC of a small
  tree ensemble (scikit-learn's ExtraTrees, 100 trees, classes weighted to balance N and M) telling reals
  from samples, 4-fold stratified cross-validation repeated 3 times with the given seed (0.5 =
  indistinguishable, 1 = always told apart). Features per volume: five in-mask intensity quantiles, the mean
  background intensity (outside the mask), the mean local detail ``|x - gaussian(x, 1 voxel)|`` in the mask
  (noise raises it, blur lowers it), the three tissue fractions, and the first 10 principal components
  (fitted on both sets together, without labels, so the test stays valid under the null) of the *shape
  features* below. Trees rather than a linear model: samples that all sit near the real mean (mode
  collapse) or spread too much differ from the reals in variance, which no linear boundary separates;
* ``density`` / ``coverage`` (Naeem et al., 2020) - in the shape-feature space, each real scan gets the ball
  reaching its k-th nearest real neighbour (k = 5); coverage is the fraction of real scans whose ball holds
  at least one sample (a generator repeating one brain covers about k / M of them), density the mean number
  of balls a sample falls in divided by k: about 1 for samples from the real distribution, 0 for samples far
  from every real scan, above 1 for samples crowding where the reals are dense. ``density_gap`` =
  ``|density - 1|`` is the rankable form. With a few dozen reals in hundreds of dimensions the k-NN balls are
  wide and most contain the real mean, so samples collapsed towards the mean brain still get full coverage:
  density (well above 1) and the C2ST catch them, coverage does not.

Shape features: each volume and its local-detail magnitude ``|x - gaussian(x, 1 voxel)|`` are average-pooled
to a thumbnail with 8 voxels on the shortest axis (8 x 11 x 8 at the default 24 x 32 x 24 grid, 8 x 10 x 8
at 64 x 80 x 64), and each of the two blocks is divided by the reals' total spread in it (root mean squared
distance to the real mean), so anatomy and texture weigh the same whatever the volume size or contrast.

:class:`QualityReference` fits everything that depends on the reals once; its :meth:`~QualityReference.score`
then scores any set (a family's samples, or the floors: other real scans, an autoencoder's reconstructions).
:func:`sample_quality` does both in one call. Inputs are ``(N, X, Y, Z)`` or ``(N, 1, X, Y, Z)`` arrays or
tensors; at least :data:`MIN_VOLUMES` volumes in each set. Between two random groups of real scans the
numbers are not exactly ideal (benchmarks/bench_quality.py: with 16 + 16 scans, C2ST AUC 0.51 +- 0.13); score
the real-vs-real floor with the same set sizes as the samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.decomposition import PCA
from sklearn.ensemble import ExtraTreesClassifier
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import RepeatedStratifiedKFold

MIN_VOLUMES = 8  # per set: k-NN balls (k = 5), a 4-fold stratified split and a class fit need a few scans
FOREGROUND_LEVEL = 0.1  # x the reals' 99th intensity percentile: foreground of the head mask
DETAIL_SIGMA = 1.0  # voxels: local detail = x - gaussian(x, DETAIL_SIGMA)
THUMBNAIL_SHORT_AXIS = 8  # voxels on the shortest axis of the shape-feature thumbnails
N_QUANTILES = 1000  # quantile-function resolution of intensity_w1
INTENSITY_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)  # per-volume C2ST features
TISSUE_CLASSES = ("dark", "mid", "bright")
COVERAGE_K = 5
C2ST_SPLITS, C2ST_REPEATS, C2ST_TREES, C2ST_COMPONENTS = 4, 3, 100, 10
_GMM_VOXELS = 100_000  # in-mask real voxels the tissue mixture is fitted on (a seeded subsample)


# --------------------------------------------------------------------------------------------- inputs
def as_volumes(x: np.ndarray | torch.Tensor, name: str, min_volumes: int = MIN_VOLUMES) -> np.ndarray:
    """``(N, X, Y, Z)`` or ``(N, 1, X, Y, Z)`` -> float32 ``(N, X, Y, Z)``; ValueError naming ``name`` for a
    wrong shape, too few volumes or non-finite values. Values are not clipped (an overshoot is penalised)."""
    arr = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if arr.ndim == 5 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 4:
        raise ValueError(f"{name}: expected volumes of shape (N, X, Y, Z) or (N, 1, X, Y, Z), got {tuple(arr.shape)}")
    if len(arr) < min_volumes:
        raise ValueError(f"{name}: need at least {min_volumes} volumes for the sample-quality metrics, got {len(arr)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: volumes contain NaN or inf")
    return arr.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------- the pieces
def head_mask(reals: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool: voxels above ``FOREGROUND_LEVEL`` x the reals' 99th percentile in at least half of the
    reals ``(M, X, Y, Z)``, holes filled."""
    level = FOREGROUND_LEVEL * float(np.percentile(reals, 99))
    mask = ndimage.binary_fill_holes((reals > level).mean(axis=0) >= 0.5)
    if not mask.any():
        raise ValueError("reals: no voxel is foreground in half of the real scans; are they brain volumes in [0, 1]?")
    return mask


def quantile_function(values: np.ndarray, n: int = N_QUANTILES) -> np.ndarray:
    """Values at the ``n`` quantile midpoints ``(i + 0.5) / n`` (linear interpolation, as ``np.quantile``):
    W1 between two sets is the mean absolute difference of their quantile functions. One sort instead of
    ``np.quantile``, whose partition around 2n points is several times slower on millions of voxels."""
    ordered = np.sort(values, axis=None)
    position = (np.arange(n) + 0.5) / n * (len(ordered) - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def intensity_w1(samples: np.ndarray, reals: np.ndarray, mask: np.ndarray) -> float:
    """Wasserstein-1 distance between pooled in-``mask`` intensities of ``samples`` and ``reals`` (N, X, Y, Z)."""
    return float(np.abs(quantile_function(samples[:, mask]) - quantile_function(reals[:, mask])).mean())


def tissue_thresholds(reals: np.ndarray, mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """Two intensity thresholds splitting in-``mask`` voxels into dark / mid / bright classes.

    A 3-component Gaussian mixture (scikit-learn) is fitted to a seeded subsample of in-mask real voxels;
    its most probable component along an intensity grid, made non-decreasing (a wide component can win
    again at an extreme), gives the class of every intensity, hence intervals.
    """
    values = reals[:, mask].ravel()
    rng = np.random.default_rng(seed)
    fit_on = values if len(values) <= _GMM_VOXELS else rng.choice(values, _GMM_VOXELS, replace=False)
    gmm = GaussianMixture(len(TISSUE_CLASSES), random_state=seed).fit(fit_on[:, None].astype(np.float64))
    rank = np.argsort(np.argsort(gmm.means_.ravel()))  # component -> class index, dark first
    lo, hi = np.percentile(fit_on, [0.1, 99.9])
    grid = np.linspace(lo, hi, 2001)
    labels = np.maximum.accumulate(rank[gmm.predict(grid[:, None])])
    thresholds = [grid[np.argmax(labels >= k)] for k in range(1, len(TISSUE_CLASSES))]
    if not all(labels[-1] >= k for k in range(1, len(TISSUE_CLASSES))):
        raise ValueError("reals: in-head intensities do not separate into three tissue classes")
    return np.asarray(thresholds, dtype=np.float64)


def tissue_fractions(volumes: np.ndarray, mask: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(N, 3) fraction of each volume's in-``mask`` voxels in the dark / mid / bright class."""
    return _class_fractions(volumes[:, mask], thresholds)


def _class_fractions(inside: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(N, V) in-mask intensities -> (N, len(thresholds) + 1) fraction of each row in each interval."""
    classes = np.digitize(inside, thresholds)
    return np.stack([(classes == k).mean(axis=1) for k in range(len(thresholds) + 1)], axis=1)


def local_detail(volumes: np.ndarray) -> np.ndarray:
    """``|x - gaussian(x, DETAIL_SIGMA)|`` per volume, (N, X, Y, Z): high-frequency content."""
    smooth = ndimage.gaussian_filter(volumes, sigma=(0, DETAIL_SIGMA, DETAIL_SIGMA, DETAIL_SIGMA), mode="constant")
    return np.abs(volumes - smooth)


def thumbnail_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Thumbnail size with ``THUMBNAIL_SHORT_AXIS`` voxels on the shortest axis (no axis above the input's)."""
    scale = THUMBNAIL_SHORT_AXIS / min(shape)
    return tuple(max(1, min(s, round(s * scale))) for s in shape)  # type: ignore[return-value]


def thumbnails(volumes: np.ndarray) -> np.ndarray:
    """(N, X, Y, Z) -> (N, P) average-pooled thumbnails (torch's adaptive pooling handles any size)."""
    x = torch.from_numpy(np.ascontiguousarray(volumes))[:, None]
    return F.adaptive_avg_pool3d(x, thumbnail_shape(volumes.shape[1:])).flatten(1).numpy()


def density_coverage(sample_features: np.ndarray, real_features: np.ndarray, k: int = COVERAGE_K) -> dict[str, float]:
    """Density and coverage (Naeem et al., 2020) of samples (N, F) against reals (M, F), Euclidean.

    Each real's ball reaches its ``k``-th nearest other real. ``density`` = mean over samples of the number
    of balls containing the sample, / k; ``coverage`` = fraction of reals whose ball contains a sample.
    """
    if len(real_features) <= k:
        raise ValueError(f"density/coverage with k={k} need more than {k} real scans, got {len(real_features)}")
    real_d = np.linalg.norm(real_features[:, None] - real_features[None], axis=-1)
    radii = np.sort(real_d, axis=1)[:, k]  # column 0 is the real itself
    inside = np.linalg.norm(sample_features[:, None] - real_features[None], axis=-1) <= radii[None]  # (N, M)
    return {"density": float(inside.sum(axis=1).mean() / k), "coverage": float(inside.any(axis=0).mean())}


def c2st(
    sample_features: np.ndarray,
    real_features: np.ndarray,
    seed: int,
    n_splits: int = C2ST_SPLITS,
    n_repeats: int = C2ST_REPEATS,
) -> dict[str, float]:
    """Classifier two-sample test: out-of-fold ROC AUC of a random forest, samples (N, F) vs reals (M, F).

    Repeated stratified ``n_splits``-fold cross-validation (seeded); the AUC of each repetition's
    out-of-fold scores, averaged (``c2st_auc``) and their standard deviation (``c2st_auc_std``). Classes are
    weighted to balance N and M; AUC itself does not depend on the class ratio.
    """
    x = np.concatenate([sample_features, real_features])
    y = np.r_[np.ones(len(sample_features)), np.zeros(len(real_features))]
    cv = RepeatedStratifiedKFold(n_splits=n_splits, n_repeats=n_repeats, random_state=seed)
    scores = np.empty((n_repeats, len(y)))
    for i, (train, test) in enumerate(cv.split(x, y)):
        forest = ExtraTreesClassifier(
            n_estimators=C2ST_TREES, class_weight="balanced", random_state=seed + i, n_jobs=1
        ).fit(x[train], y[train])
        scores[i // n_splits, test] = forest.predict_proba(x[test])[:, 1]
    aucs = np.array([roc_auc_score(y, s) for s in scores])
    return {"c2st_auc": float(aucs.mean()), "c2st_auc_std": float(aucs.std())}


# ----------------------------------------------------------------------------------- per-volume features
@dataclass(frozen=True)
class VolumeFeatures:
    """What the scores need from one set of N volumes, in a reference's mask and tissue classes."""

    pooled_quantiles: np.ndarray  # (N_QUANTILES,) quantile function of the set's pooled in-mask intensities
    quantiles: np.ndarray  # (N, 5) per-volume in-mask intensity quantiles (INTENSITY_QUANTILES)
    background: np.ndarray  # (N,) mean intensity outside the mask
    detail: np.ndarray  # (N,) mean local detail in the mask
    tissue: np.ndarray  # (N, 3) dark / mid / bright fractions
    thumbs: np.ndarray  # (N, P) thumbnails of the volumes
    detail_thumbs: np.ndarray  # (N, P) thumbnails of the local detail

    def summary(self) -> np.ndarray:
        """(N, 10) the global C2ST features."""
        return np.column_stack([self.quantiles, self.background, self.detail, self.tissue])


def volume_features(volumes: np.ndarray, mask: np.ndarray, thresholds: np.ndarray) -> VolumeFeatures:
    """The features of ``volumes`` (N, X, Y, Z) given a head ``mask`` and tissue ``thresholds``."""
    inside = volumes[:, mask]  # (N, voxels in the mask), computed once: the largest array here
    detail = local_detail(volumes)
    outside = volumes[:, ~mask]
    return VolumeFeatures(
        pooled_quantiles=quantile_function(inside),
        quantiles=np.quantile(inside, INTENSITY_QUANTILES, axis=1).T,
        background=outside.mean(axis=1) if outside.size else np.zeros(len(volumes)),
        detail=detail[:, mask].mean(axis=1),
        tissue=_class_fractions(inside, thresholds),
        thumbs=thumbnails(volumes),
        detail_thumbs=thumbnails(detail),
    )


def _spread(features: np.ndarray) -> float:
    """Root mean squared distance of the rows of ``features`` to their mean (1 when they are all equal)."""
    return float(np.sqrt(((features - features.mean(0)) ** 2).sum(1).mean())) or 1.0


# ----------------------------------------------------------------------------------------- the reference
class QualityReference:
    """Everything the scores fit on the real reference scans ``(M, X, Y, Z)`` or ``(M, 1, X, Y, Z)``: head
    mask, tissue thresholds, the reals' features and the shape-feature block scales.

    ``QualityReference(reals).score(samples, seed=0)`` gives the metrics of one set; score the floors (other
    real scans, reconstructions) against the same reference.
    """

    def __init__(self, reals: np.ndarray | torch.Tensor, seed: int = 0):
        reals = as_volumes(reals, "reals")
        self.volume_shape = reals.shape[1:]
        self.mask = head_mask(reals)
        self.thresholds = tissue_thresholds(reals, self.mask, seed)
        self.features = volume_features(reals, self.mask, self.thresholds)
        self.block_scales = (_spread(self.features.thumbs), _spread(self.features.detail_thumbs))
        self.shape_features = self.shape_space(self.features)

    def shape_space(self, features: VolumeFeatures) -> np.ndarray:
        """(N, 2P) both thumbnails of ``features``, each block divided by the reals' spread in it."""
        return np.concatenate([features.thumbs / self.block_scales[0], features.detail_thumbs / self.block_scales[1]], 1)

    def score(self, samples: np.ndarray | torch.Tensor, *, seed: int) -> dict[str, float]:
        """The metrics of ``samples`` (N, X, Y, Z) or (N, 1, X, Y, Z) against the reals (module docstring).

        Rankable keys (directions in ``metrics/registry.py``): ``c2st_auc``, ``intensity_w1``, ``tissue_tv``,
        ``density_gap`` (= |density - 1|), ``coverage``. Descriptive: ``c2st_auc_std``, ``density``,
        ``tissue_<dark|mid|bright>_frac`` and ``..._frac_real``.
        """
        samples = as_volumes(samples, "samples")
        if samples.shape[1:] != self.volume_shape:
            raise ValueError(f"samples: volume shape {samples.shape[1:]} differs from the reals' {self.volume_shape}")
        feats = volume_features(samples, self.mask, self.thresholds)
        out = {"intensity_w1": float(np.abs(feats.pooled_quantiles - self.features.pooled_quantiles).mean())}
        sample_mix, real_mix = feats.tissue.mean(0), self.features.tissue.mean(0)
        out["tissue_tv"] = float(0.5 * np.abs(sample_mix - real_mix).sum())
        for name, s, r in zip(TISSUE_CLASSES, sample_mix, real_mix):
            out[f"tissue_{name}_frac"], out[f"tissue_{name}_frac_real"] = float(s), float(r)
        shape = self.shape_space(feats)
        out.update(density_coverage(shape, self.shape_features))
        out["density_gap"] = abs(out["density"] - 1.0)  # density's ideal is 1; above it, samples crowd
        # C2ST features: the global summary and the leading principal components of the shape features,
        # fitted on both sets without labels (a label-free transform keeps the test valid under the null).
        both = np.concatenate([shape, self.shape_features])
        pca = PCA(min(C2ST_COMPONENTS, len(both) - 1, both.shape[1]), random_state=seed).fit_transform(both)
        x = np.column_stack([np.concatenate([feats.summary(), self.features.summary()]), pca])
        out.update(c2st(x[: len(samples)], x[len(samples) :], seed))
        return out


def sample_quality(samples: np.ndarray | torch.Tensor, reals: np.ndarray | torch.Tensor, *, seed: int) -> dict[str, float]:
    """All sample-quality metrics of ``samples`` against ``reals``: ``QualityReference(reals).score(samples)``."""
    return QualityReference(reals, seed=seed).score(samples, seed=seed)
