"""Cross-validated, permutation-tested and held-out evaluation of one probe.

Protocol (docs/directions_method.md):
  1. ``n_repeats`` x stratified ``n_splits``-fold CV (``RepeatedStratifiedKFold``, seeded). Every fold fits the
     whole pipeline (transform, scaler, head with its inner CV) on the training part and scores the held-out
     part, giving one metric value per fold (``J = n_repeats * n_splits`` of them) and out-of-fold scores
     ``(R, N)``.
  2. Point estimate of each metric = mean of the J per-fold values. 95% CI = the corrected resampled t
     interval of Nadeau & Bengio (Machine Learning 52, 2003; Bouckaert & Frank 2004 for repeated k-fold):
     ``mean +- t_{J-1} * sqrt((1/J + n_test/n_train) * S^2)`` with ``S^2`` the variance of the J values. The
     ``n_test/n_train`` term accounts for the overlap of the training sets, so the interval includes the
     variance of refitting the probe on other subjects, not only of scoring a fixed set of fold models.
  3. p-value: ``sklearn.model_selection.permutation_test_score`` with the same pipeline and the same repeated
     CV (same splitter, same seed), scoring ROC AUC (binary) or Spearman (ordinal) as the mean over the J
     folds: the statistic it tests is exactly the CV point estimate. p = (1 + #perm >= obs) / (1 + n_perm).
  4. Held out: when test features are given, the pipeline is fitted on all fitting rows and scored once on
     the test rows; 95% CI = percentile interval over a stratified bootstrap of the test subjects (one fitted
     model is being evaluated, so its uncertainty is that of the finite test set).

Metrics: binary -> ``auc``, ``balanced_accuracy`` (threshold p = 0.5); ordinal -> ``spearman`` (score vs
group index), ``auc`` (mean over the cumulative splits ``group >= k``), ``balanced_accuracy`` (score
rounded to the nearest group).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import spearmanr
from scipy.stats import t as student_t
from sklearn.base import clone
from sklearn.metrics import make_scorer
from sklearn.model_selection import RepeatedStratifiedKFold, cross_validate, permutation_test_score
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from . import metrics as M
from .probes import ProbeSettings, Task, chosen_regularisation, decision_scores

# The range of each metric: corrected-t intervals are clipped to it.
METRIC_BOUNDS: dict[str, tuple[float, float]] = {"auc": (0.0, 1.0), "balanced_accuracy": (0.0, 1.0),
                                                  "spearman": (-1.0, 1.0)}
CV_INTERVAL = "corrected resampled t (Nadeau & Bengio 2003)"


@dataclass(frozen=True)
class Estimate:
    """A metric with its confidence interval."""

    value: float
    low: float
    high: float

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


@dataclass
class ProbeResult:
    """Everything measured for one (target, feature set) probe."""

    target: str
    task: str
    features: str
    n_subjects: int
    class_counts: dict[int, int]
    cv: dict[str, Estimate]
    p_value: float
    permutation_score: float  # the CV score the permutation test compares against its null
    n_permutations: int
    regularisation: dict[str, float]  # median over outer folds of the chosen C / alpha
    heldout: dict[str, Estimate] | None = None
    oof_scores: np.ndarray = field(default=None, repr=False)  # (R, N) out-of-fold decision scores
    fold_metrics: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # metric -> (J,) per fold
    n_heldout: int = 0  # subjects in the held-out set (0: none)
    fitted: Pipeline | None = field(default=None, repr=False)  # fitted on every fitting row (held out / refit)

    def flat_metrics(self) -> dict[str, float]:
        """``{"<target>.<features>.cv_auc": ..., "..._low": ..., "p_value": ...}`` for MLflow / DVC metrics."""
        key = f"{self.target}.{self.features}"
        out: dict[str, float] = {}
        for split, metrics in (("cv", self.cv), ("heldout", self.heldout or {})):
            for name, est in metrics.items():
                out[f"{key}.{split}_{name}"] = est.value
                out[f"{key}.{split}_{name}_low"] = est.low
                out[f"{key}.{split}_{name}_high"] = est.high
        out[f"{key}.p_value"] = self.p_value
        out[f"{key}.n_heldout"] = float(self.n_heldout)
        for name, value in self.regularisation.items():
            out[f"{key}.{name}"] = value
        return out

    def summary_row(self) -> dict[str, object]:
        """One row of the results table (one column per metric, CI as ``low``/``high`` columns)."""
        row: dict[str, object] = {"target": self.target, "task": self.task, "features": self.features,
                                  "n": self.n_subjects, "n_heldout": self.n_heldout, "p_value": self.p_value}
        for split, metrics in (("cv", self.cv), ("heldout", self.heldout or {})):
            for name, est in metrics.items():
                row[f"{split}_{name}"] = est.value
                row[f"{split}_{name}_low"] = est.low
                row[f"{split}_{name}_high"] = est.high
        row.update(self.regularisation)
        return row


def check_labels(y: np.ndarray, task: Task, n_splits: int, what: str = "labels") -> np.ndarray:
    """Validate integer labels ``(N,)`` for ``task`` and that every class can fill ``n_splits`` folds."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: expected a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    classes, counts = np.unique(y, return_counts=True)
    if task == "binary" and not np.array_equal(classes, [0, 1]):
        raise ValueError(f"{what}: a binary probe needs labels 0 and 1 (both present), got {classes.tolist()}")
    if task == "ordinal" and (classes.min() < 0 or len(classes) < 2):
        raise ValueError(f"{what}: an ordinal probe needs >= 2 group indices >= 0, got {classes.tolist()}")
    if counts.min() < n_splits:
        raise ValueError(
            f"{what}: class {classes[counts.argmin()]} has {counts.min()} subjects, fewer than the "
            f"{n_splits} CV folds; lower n_splits or merge groups"
        )
    return y


def _check_features(X: np.ndarray, n: int, what: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != n:
        raise ValueError(f"{what}: expected ({n}, F) features, got shape {X.shape}")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{what}: contains NaN or infinite values")
    return X


def score_metrics(y: np.ndarray, scores: np.ndarray, task: Task, n_classes: int) -> dict[str, np.ndarray]:
    """Metrics of scores ``(..., N)`` against labels broadcastable to them; each value has shape ``(...)``."""
    if task == "binary":
        return {"auc": M.auc(y, scores), "balanced_accuracy": M.balanced_accuracy(y, scores > 0, 2)}
    predicted = np.clip(np.rint(scores), 0, n_classes - 1)
    return {
        "spearman": M.spearman(y, scores),
        "auc": M.ordinal_auc(y, scores, n_classes),
        "balanced_accuracy": M.balanced_accuracy(y, predicted, n_classes),
    }


def bootstrap_estimates(
    y: np.ndarray, scores: np.ndarray, task: Task, n_classes: int, settings: ProbeSettings, seed: int
) -> dict[str, Estimate]:
    """Point estimates (mean over rows) and stratified subject-bootstrap CIs for scores ``(R, N)`` of one set of
    subjects (the held-out set: ``R = 1``)."""
    scores = np.atleast_2d(scores)
    point = {k: float(np.mean(v)) for k, v in score_metrics(y, scores, task, n_classes).items()}
    idx = M.stratified_bootstrap_indices(y, settings.n_bootstrap, np.random.default_rng(seed))  # (B, N)
    boot = score_metrics(y[idx], scores[:, idx], task, n_classes)  # each (R, B)
    return {k: Estimate(point[k], *M.percentile_interval(v.mean(0), settings.ci_level)) for k, v in boot.items()}


def corrected_t_interval(values: np.ndarray, test_over_train: float, level: float) -> Estimate:
    """Mean of per-fold ``values (J,)`` with the corrected resampled t interval (module docstring, step 2).

    ``test_over_train``: the ratio of held-out to training rows in one fold (``1 / (n_splits - 1)`` for
    k-fold). NaN folds (a metric undefined on that fold) are left out.
    """
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    mean = float(values.mean())
    if values.size < 2:
        return Estimate(mean, float("nan"), float("nan"))
    se = np.sqrt((1.0 / values.size + test_over_train) * values.var(ddof=1))
    half = float(student_t.ppf(0.5 + level / 2.0, df=values.size - 1) * se)
    return Estimate(mean, mean - half, mean + half)


def cv_splitter(settings: ProbeSettings) -> RepeatedStratifiedKFold:
    """The repeated stratified CV of every probe: the CV estimate, its interval and the permutation test
    all use exactly these splits."""
    return RepeatedStratifiedKFold(n_splits=settings.n_splits, n_repeats=settings.n_repeats,
                                   random_state=settings.seed)


def cv_estimates(fold_metrics: dict[str, np.ndarray], settings: ProbeSettings) -> dict[str, Estimate]:
    """Per-fold metric values -> :class:`Estimate` (mean, corrected-t CI clipped to the metric's range)."""
    out = {}
    for name, values in fold_metrics.items():
        est = corrected_t_interval(values, 1.0 / (settings.n_splits - 1), settings.ci_level)
        lo, hi = METRIC_BOUNDS.get(name, (-np.inf, np.inf))
        out[name] = Estimate(est.value, float(np.clip(est.low, lo, hi)), float(np.clip(est.high, lo, hi)))
    return out


def _spearman_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(spearmanr(y_true, y_pred).statistic)


def cross_validated_scores(
    probe: Pipeline, X: np.ndarray, y: np.ndarray, task: Task, settings: ProbeSettings
) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict[str, float]]]:
    """Out-of-fold decision scores ``(n_repeats, N)``, every metric per fold ``{name: (J,)}`` and each fold's
    chosen regularisation, over the splits of :func:`cv_splitter`."""
    scores = np.full((settings.n_repeats, len(y)), np.nan)
    n_classes = int(y.max()) + 1
    per_fold: dict[str, list[float]] = {}
    chosen: list[dict[str, float]] = []
    out = cross_validate(probe, X, y, cv=cv_splitter(settings), return_estimator=True, return_indices=True,
                         n_jobs=settings.n_jobs)
    for j, (fitted, test) in enumerate(zip(out["estimator"], out["indices"]["test"])):
        fold_scores = decision_scores(fitted, X[test])
        scores[j // settings.n_splits, test] = fold_scores
        for name, value in score_metrics(y[test], fold_scores, task, n_classes).items():
            per_fold.setdefault(name, []).append(float(value))
        chosen.append(chosen_regularisation(fitted))
    assert np.all(np.isfinite(scores)), "every subject is scored once per repeat"
    return scores, {k: np.asarray(v) for k, v in per_fold.items()}, chosen


def _single_threaded_blas(func):
    """Run ``func`` with one BLAS thread. Probe problems are small (~100s x ~100s): multi-threaded BLAS costs
    more than it saves there and oversubscribes the cores when joblib runs folds / permutations in parallel."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return func(*args, **kwargs)

    return wrapper


@_single_threaded_blas
def evaluate_probe(
    probe: Pipeline,
    X: np.ndarray,
    y: np.ndarray,
    task: Task,
    settings: ProbeSettings,
    *,
    target: str = "",
    features: str = "",
    X_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    refit: bool = False,
) -> ProbeResult:
    """Evaluate an unfitted probe pipeline on features ``X (N, F)`` and integer labels ``y (N,)``.

    ``X_test (M, F)`` / ``y_test (M,)``: a separate held-out set; the probe is then fitted on all of ``X``
    and scored once on it. Labels: binary 0/1 (1 = male / older); ordinal group index 0..G-1 (older higher).
    The probe fitted on all of ``X`` (held-out set given, or ``refit``) is returned as ``result.fitted``, so a
    caller that needs it (a direction) does not fit the same rows again.
    """
    y = check_labels(y, task, settings.n_splits, what=f"{target or 'probe'} labels")
    X = _check_features(X, len(y), what=f"{target or 'probe'} {features or 'features'}")
    n_classes = int(y.max()) + 1
    scores, per_fold, chosen = cross_validated_scores(probe, X, y, task, settings)
    cv_metrics = cv_estimates(per_fold, settings)

    p_value, perm_score = float("nan"), float("nan")
    if settings.n_permutations > 0:
        # The statistic under test is the CV point estimate itself: mean over the same J folds.
        scoring = "roc_auc" if task == "binary" else make_scorer(_spearman_score)
        perm_score, _, p_value = permutation_test_score(
            probe, X, y, cv=cv_splitter(settings), n_permutations=settings.n_permutations, scoring=scoring,
            random_state=settings.seed, n_jobs=settings.n_jobs,
        )

    heldout, fitted = None, None
    if (X_test is None) != (y_test is None):
        raise ValueError("evaluate_probe: give both X_test and y_test, or neither")
    if X_test is not None:
        y_test = np.asarray(y_test)
        if not np.issubdtype(y_test.dtype, np.integer) or y_test.ndim != 1:
            raise ValueError(f"held-out labels: expected a 1-D integer array, got {y_test.shape} {y_test.dtype}")
        X_test = _check_features(X_test, len(y_test), what=f"{target or 'probe'} held-out {features or 'features'}")
        if X_test.shape[1] != X.shape[1]:
            raise ValueError(f"held-out features have {X_test.shape[1]} columns, fitting features {X.shape[1]}")
    if X_test is not None or refit:
        fitted = clone(probe).fit(X, y)
    if X_test is not None:
        heldout = bootstrap_estimates(y_test, decision_scores(fitted, X_test)[None], task, n_classes,
                                      settings, seed=settings.seed + 1)

    regularisation = {k: float(np.median([c[k] for c in chosen])) for k in chosen[0]}
    classes, counts = np.unique(y, return_counts=True)
    return ProbeResult(
        target=target, task=task, features=features, n_subjects=len(y),
        class_counts={int(c): int(n) for c, n in zip(classes, counts)},
        cv=cv_metrics, p_value=float(p_value), permutation_score=float(perm_score),
        n_permutations=settings.n_permutations, regularisation=regularisation,
        heldout=heldout, oof_scores=scores, fold_metrics=per_fold,
        n_heldout=0 if y_test is None else len(y_test), fitted=fitted,
    )
