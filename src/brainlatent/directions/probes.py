"""Linear probes (scikit-learn pipelines) for one label on one feature set.

Every probe is ``[feature transform] -> StandardScaler -> linear head``; the head is the only part that
sees labels, and every part is fitted inside the cross-validation folds.

Heads
  binary  ``LogisticRegressionCV`` (L2; C chosen by an inner stratified CV on log-loss, so the outer CV is
          nested) or ``LogisticRegression(C)`` when ``ProbeSettings.C`` is fixed. ``class_weight="balanced"``
          so the 0.5 threshold behind balanced accuracy is sensible when classes are unequal.
  ordinal ``RidgeCV`` regression of the group index (0..n_groups-1; alpha chosen by efficient
          leave-one-out inside each outer fold). The prediction is one ordinal score: "expected group".

Feature sets
  latent                  the model's latents ``(N, L)``
  latent_size_controlled  latents with the size covariate (``directions.size_covariate``, eTIV by default)
                          regressed out per dimension (``CovariateResidualizer``, linear or spline in the
                          covariate; input is ``[latents | covariates]``), so a "sex" probe cannot just read
                          head size
  pca_voxels              PCA of the voxel intensities ``(N, X*Y*Z)`` (fitted in-fold), then the head:
                          does the latent space beat raw pixels?
  pca_reconstructions     the same on the model's reconstructions ``decode(encode(x))``: what encoding keeps
                          of the label. Below ``pca_voxels``: the encoder (a GAN's inversion) loses it; near
                          ``pca_voxels`` while ``latent`` is below: it is kept, but not linearly in the latents
  brain_mask_volume       the native brain-mask volume ``(N, 1)`` alone: does it beat plain head size?
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression, LogisticRegression, LogisticRegressionCV, RidgeCV
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import SplineTransformer, StandardScaler
from sklearn.utils.validation import check_is_fitted

Task = Literal["binary", "ordinal"]
FeatureSet = Literal["latent", "latent_size_controlled", "pca_voxels", "pca_reconstructions", "brain_mask_volume"]
FEATURE_SETS: tuple[str, ...] = ("latent", "latent_size_controlled", "pca_voxels", "pca_reconstructions",
                                 "brain_mask_volume")
TASKS: tuple[str, ...] = ("binary", "ordinal")
# How the size covariate is regressed out of the latents: a straight line, or a cubic spline (4 knots at the
# covariate's quantiles, linear beyond them), for latents that follow head size non-linearly.
SIZE_CONTROLS: tuple[str, ...] = ("linear", "spline")
SPLINE_KNOTS = 4
SIZE_CONTROL_FITS: tuple[str, ...] = ("within", "pooled")  # CovariateResidualizer.within_labels
DIRECTION_KINDS: tuple[str, ...] = ("pattern", "gradient")  # how a fitted probe becomes a direction (direction.py)
# The latent head-size axis a size-controlled direction is made orthogonal to (direction.py, sizeaxis.py):
# "scaling": the model's own tangent of an isotropic rescaling of the volumes; "covariate": a ridge regression
# of the size covariate on the latents.
SIZE_AXES: tuple[str, ...] = ("scaling", "covariate")


@dataclass(frozen=True)
class ProbeSettings:
    """How probes are fitted and evaluated. Defaults are the ones documented in docs/directions_method.md.

    Cost: with nested C selection one 5-fold CV of a ~100 x 128 latent probe takes ~0.3 s on one core, and
    a probe runs ``n_repeats + n_permutations`` of them (~30 s with the defaults); a fixed ``C`` makes each
    ~10x cheaper. See docs/directions_method.md ("Cost").
    """

    n_splits: int = 5  # outer stratified folds
    n_repeats: int = 5  # outer CV repeats (different shuffles); metrics are averaged over repeats
    C: float | None = None  # None: chosen by inner CV from Cs (nested); a float: fixed inverse L2 strength
    # Up to C = 10: with ~100 subjects and >= 100 standardised latents, weaker penalties only separate
    # the training data (and make lbfgs crawl).
    Cs: tuple[float, ...] = tuple(np.logspace(-4, 1, 6).tolist())
    inner_splits: int = 3
    ridge_alphas: tuple[float, ...] = tuple(np.logspace(-2, 4, 13).tolist())
    n_bootstrap: int = 1000  # subject bootstrap of out-of-fold scores for the confidence intervals
    ci_level: float = 0.95
    n_permutations: int = 100  # label permutations for the p-value (0 = skip, p-value NaN)
    pca_components: int = 20  # cap; lowered to n_train - 1 when the cohort is smaller
    max_iter: int = 5000
    n_jobs: int = 1  # joblib workers for cross-validation and permutations
    seed: int = 0
    direction: str = "gradient"  # how a fitted probe becomes a direction: "gradient" | "pattern" (direction.py)
    size_control: str = "linear"  # how the size covariate is regressed out: "linear" | "spline"
    size_control_fit: str = "within"  # its slope: "within" the label groups (ANCOVA) | "pooled" across them
    # The head-size axis size-controlled directions avoid: "scaling" (the stage's default, directions.size_axis:
    # needs the model's axis, run_probe_suite(size_axis=...)) | "covariate" (needs nothing but the arrays)
    size_axis: str = "covariate"

    def __post_init__(self) -> None:
        def bad(field: str, expected: str) -> None:
            raise ValueError(f"ProbeSettings.{field}: expected {expected}, got {getattr(self, field)!r}")

        for name in ("n_splits", "inner_splits"):
            if getattr(self, name) < 2:
                bad(name, "an integer >= 2")
        for name in ("n_repeats", "n_bootstrap", "pca_components", "max_iter", "n_jobs"):
            if getattr(self, name) < 1:
                bad(name, "a positive integer")
        if self.n_permutations < 0:
            bad("n_permutations", "an integer >= 0")
        if self.direction not in DIRECTION_KINDS:
            bad("direction", f"one of {DIRECTION_KINDS}")
        if self.size_control not in SIZE_CONTROLS:
            bad("size_control", f"one of {SIZE_CONTROLS}")
        if self.size_control_fit not in SIZE_CONTROL_FITS:
            bad("size_control_fit", f"one of {SIZE_CONTROL_FITS}")
        if self.size_axis not in SIZE_AXES:
            bad("size_axis", f"one of {SIZE_AXES}")
        if self.C is not None and not self.C > 0:
            bad("C", "None (nested CV) or a positive float")
        if not self.Cs or min(self.Cs) <= 0:
            bad("Cs", "a non-empty tuple of positive floats")
        if not self.ridge_alphas or min(self.ridge_alphas) <= 0:
            bad("ridge_alphas", "a non-empty tuple of positive floats")
        if not 0 < self.ci_level < 1:
            bad("ci_level", "a level in (0, 1), e.g. 0.95")

    def replace(self, **changes) -> "ProbeSettings":
        return dataclasses.replace(self, **changes)


class CovariateResidualizer(TransformerMixin, BaseEstimator):
    """Regress covariates out of every feature, with the regression fitted on the training rows only.

    Input ``X`` is ``(N, F + n_covariates)``: features first, covariates in the last columns. Output is
    the ``(N, F)`` residuals ``X_f - g(X_c)``: ``g`` linear (``kind="linear"``: ``B X_c``) or an additive
    cubic spline of each covariate (``kind="spline"``: scikit-learn's ``SplineTransformer``, ``SPLINE_KNOTS``
    knots at the covariate's quantiles, linear extrapolation, then least squares). Written as a transformer
    (not a pre-processing step) so that it is re-fitted inside every cross-validation fold.

    ``within_labels`` (default): when ``fit`` is given the labels ``y``, ``g`` is fitted jointly with one
    intercept per label (an ANCOVA: ``X_f = g(X_c) + d_y + e``) and only ``g`` is removed, so its slope is
    the covariate's effect *within* a label group. A slope pooled across groups (``within_labels=False``, or
    no ``y``) also absorbs the group difference whenever the covariate differs between the groups: males have
    larger heads, so a pooled slope of a feature that holds a size-independent male effect on head size is
    partly that effect, and removing it removes part of what the size-controlled probe is there to find
    (Miller & Chapman 2001, "Misunderstanding analysis of covariance"). Transforming never needs labels.
    """

    def __init__(self, n_covariates: int = 1, kind: str = "linear", within_labels: bool = True):
        self.n_covariates = n_covariates
        self.kind = kind
        self.within_labels = within_labels

    def _split(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(X, float)
        if X.ndim != 2 or X.shape[1] <= self.n_covariates:
            raise ValueError(
                f"CovariateResidualizer: expected (N, features + {self.n_covariates} covariates), got {X.shape}"
            )
        return X[:, : -self.n_covariates], X[:, -self.n_covariates :]

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "CovariateResidualizer":
        if self.kind not in SIZE_CONTROLS:
            raise ValueError(f"CovariateResidualizer.kind: expected one of {SIZE_CONTROLS}, got {self.kind!r}")
        features, covariates = self._split(X)
        if self.kind == "spline":
            self.basis_ = SplineTransformer(n_knots=SPLINE_KNOTS, degree=3, knots="quantile", extrapolation="linear",
                                            include_bias=False).fit(covariates)
        else:
            self.basis_ = None
        design = self._basis(covariates)
        if self.within_labels and y is not None:
            # One intercept per label (the ANCOVA) is the same slope as a fit on values centred per label
            # (Frisch-Waugh-Lovell). Only the slope is removed; the group offsets stay in the residuals.
            design, features = centred_per_group(design, y), centred_per_group(features, y)
        fit = LinearRegression().fit(design, features)
        self.coef_ = fit.coef_.reshape(features.shape[1], -1).T  # (basis, F)
        self.n_features_in_ = X.shape[1]
        return self

    def _basis(self, covariates: np.ndarray) -> np.ndarray:
        return covariates if self.basis_ is None else self.basis_.transform(covariates)

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "coef_")
        features, covariates = self._split(X)
        return features - self._basis(covariates) @ self.coef_


def centred_per_group(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``values (N, ...)`` minus the mean of its label group (``groups (N,)``): the within-group adjustment of
    every size control (``CovariateResidualizer.within_labels``; the latent covariate axis of direction.py).
    A regression on group-centred values has the slopes of one with an intercept per group."""
    values = np.asarray(values, np.float64)
    groups = np.asarray(groups).ravel()
    if len(groups) != len(values):
        raise ValueError(f"groups: expected one label per row ({len(values)}), got {len(groups)}")
    out = values.copy()
    for g in np.unique(groups):
        out[groups == g] -= values[groups == g].mean(axis=0)
    return out


def linear_head(task: Task, settings: ProbeSettings) -> BaseEstimator:
    """The label-fitting part of every probe (see the module docstring)."""
    if task == "binary":
        if settings.C is not None:
            return LogisticRegression(C=settings.C, class_weight="balanced", max_iter=settings.max_iter)
        inner = StratifiedKFold(settings.inner_splits, shuffle=True, random_state=settings.seed)
        return LogisticRegressionCV(
            Cs=list(settings.Cs),
            cv=inner,
            l1_ratios=(0.0,),
            scoring="neg_log_loss",
            class_weight="balanced",
            max_iter=settings.max_iter,
            use_legacy_attributes=False,
        )
    if task == "ordinal":
        return RidgeCV(alphas=settings.ridge_alphas)
    raise ValueError(f"probe task {task!r}: expected one of {list(TASKS)}")


def make_probe(task: Task, features: FeatureSet, settings: ProbeSettings, n_train: int | None = None) -> Pipeline:
    """An unfitted probe pipeline for ``task`` on ``features`` (see the module docstring).

    ``n_train`` (PCA feature sets only): rows the PCA will be fitted on, to cap its component count.
    """
    head = ("head", linear_head(task, settings))
    scale = ("scale", StandardScaler())
    if features in ("latent", "brain_mask_volume"):
        return Pipeline([scale, head])
    if features == "latent_size_controlled":
        residualise = CovariateResidualizer(n_covariates=1, kind=settings.size_control,
                                            within_labels=settings.size_control_fit == "within")
        return Pipeline([("residualise", residualise), scale, head])
    if features in ("pca_voxels", "pca_reconstructions"):
        if n_train is None:
            raise ValueError(f"make_probe(features={features!r}) needs n_train to cap the number of components")
        k = max(1, min(settings.pca_components, n_train - 1))
        # Voxels share one intensity scale: centre only (per-voxel scaling would inflate background noise),
        # then standardise the components so the L2 penalty treats them alike.
        return Pipeline([("pca", PCA(n_components=k, random_state=settings.seed)), scale, head])
    raise ValueError(f"probe features {features!r}: expected one of {list(FEATURE_SETS)}")


def decision_scores(probe: Pipeline, X: np.ndarray) -> np.ndarray:
    """``(N,)`` continuous probe output: the logit (binary) or the predicted group index (ordinal)."""
    head = probe[-1]
    if hasattr(head, "decision_function") and hasattr(head, "classes_"):
        if not np.array_equal(head.classes_, [0, 1]):
            raise ValueError(f"binary probe must be fitted on labels {{0, 1}}, got classes {head.classes_}")
        return probe.decision_function(X)
    return probe.predict(X)


def probe_probability(probe: Pipeline, X: np.ndarray) -> np.ndarray:
    """``(N,)`` probability of the positive class (binary) or the predicted group index (ordinal)."""
    head = probe[-1]
    if hasattr(head, "predict_proba"):
        return probe.predict_proba(X)[:, 1]
    return probe.predict(X)


def chosen_regularisation(probe: Pipeline) -> dict[str, float]:
    """The regularisation the fitted head used: ``{"C": ...}`` or ``{"alpha": ...}``."""
    head = probe[-1]
    if isinstance(head, LogisticRegressionCV):
        return {"C": float(np.ravel(head.C_)[0])}
    if isinstance(head, LogisticRegression):
        return {"C": float(head.C)}
    if isinstance(head, RidgeCV):
        return {"alpha": float(head.alpha_)}
    raise AssertionError(f"unexpected probe head {type(head).__name__}")
