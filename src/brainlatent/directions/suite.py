"""All probes of one model: every target on latents, size-controlled latents and the baselines (PCA of the
voxels; the native brain-mask volume; PCA of the model's reconstructions, when given).

The one entry point the ``directions`` stage needs for the probing half of the experiment:
``run_probe_suite(latents, subjects, settings, volumes=...)`` -> results table, fitted latent probes and
their :class:`Direction` s. Family-agnostic: it sees arrays only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from .direction import Direction, direction_from_probe
from .evaluation import ProbeResult, evaluate_probe
from .probes import ProbeSettings, make_probe
from .targets import BRAIN_MASK_VOLUME, DEFAULT_SIZE_COVARIATE, TARGETS, available_targets, covariate, target_labels

LATENT_FEATURES = ("latent", "latent_size_controlled")


@dataclass
class ProbeSuite:
    results: list[ProbeResult] = field(default_factory=list)
    probes: dict[str, Pipeline] = field(default_factory=dict)  # "<target>.<features>" -> fitted latent probe
    directions: dict[str, Direction] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """One row per (target, features) with CV / held-out metrics, CIs and the permutation p-value."""
        return pd.DataFrame([r.summary_row() for r in self.results])

    def flat_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.results:
            out.update(r.flat_metrics())
        return out

    def save_directions(self, out_dir: str | Path) -> list[Path]:
        """Write each direction to ``<out_dir>/<name>.json`` (MLflow artifacts)."""
        return [d.save(Path(out_dir) / f"{name}.json") for name, d in self.directions.items()]


def _features(
    kind: str, latents: np.ndarray, subjects: pd.DataFrame, volumes: np.ndarray | None,
    reconstructions: np.ndarray | None, size_covariate: str,
) -> np.ndarray | None:
    if kind == "latent":
        return latents
    if kind == "latent_size_controlled":
        return np.hstack([latents, covariate(subjects, size_covariate)])
    if kind == "brain_mask_volume":
        return covariate(subjects, BRAIN_MASK_VOLUME)
    if kind in ("pca_voxels", "pca_reconstructions"):
        source = volumes if kind == "pca_voxels" else reconstructions
        return None if source is None else np.asarray(source, np.float32).reshape(len(source), -1)
    raise AssertionError(kind)


def direction_name(target: str, features: str) -> str:
    return target if features == "latent" else f"{target}_size_controlled"


def run_probe_suite(
    latents: np.ndarray,
    subjects: pd.DataFrame,
    settings: ProbeSettings,
    *,
    volumes: np.ndarray | None = None,
    reconstructions: np.ndarray | None = None,
    test_latents: np.ndarray | None = None,
    test_subjects: pd.DataFrame | None = None,
    test_volumes: np.ndarray | None = None,
    test_reconstructions: np.ndarray | None = None,
    targets: tuple[str, ...] | None = None,
    size_control_targets: tuple[str, ...] = ("sex",),
    size_covariate: str = DEFAULT_SIZE_COVARIATE,
    baselines: bool = True,
    permute_baselines: bool = False,
    size_axis: np.ndarray | None = None,
) -> ProbeSuite:
    """Probe ``targets`` (default: every target ``subjects`` can label, ``available_targets``) on
    ``latents (N, L)`` of the rows of ``subjects`` (subjects.csv columns).

    ``size_covariate``: the numeric subjects.csv column regressed out of the latents for the
    ``size_control_targets`` (eTIV by default; ``settings.size_control`` says linear or spline).

    ``volumes (N, X, Y, Z)``: the same subjects' processed volumes for the PCA-of-voxels baseline (skipped
    when None). ``reconstructions (N, X, Y, Z)``: the model's ``decode(encode(volumes))``, for the
    PCA-of-reconstructions baseline (skipped when None). ``test_*``: a separate held-out set (same columns),
    scored once by probes fitted on all fitting rows. Directions are fitted on all fitting rows for the ``latent`` probes and, for
    ``size_control_targets``, the ``latent_size_controlled`` probes.

    ``size_axis (L,)``: the model's latent scaling axis (``sizeaxis.scaling_axis``), required when
    ``settings.size_axis == "scaling"`` and a target is size-controlled: the size-controlled directions are made
    orthogonal to it instead of to the latent covariate predictor (direction.py).

    Baselines get the same repeated CV and bootstrap CIs; their permutation tests are skipped unless
    ``permute_baselines`` (the PCA baseline refits a voxel PCA per fold and permutation: the slowest
    part by far, and the CIs already say whether the latents beat it).
    """
    latents = np.asarray(latents, np.float64)
    _check_inputs(latents, subjects, volumes, reconstructions, test_latents, test_subjects)
    targets = available_targets(subjects) if targets is None else tuple(targets)
    if settings.size_axis == "scaling" and size_control_targets and size_axis is None:
        raise ValueError("run_probe_suite: settings.size_axis is 'scaling' but no size_axis (the model's latent "
                         "scaling axis, sizeaxis.scaling_axis) was given")
    axis = size_axis if settings.size_axis == "scaling" else None
    has_test = test_latents is not None
    suite = ProbeSuite()
    for target_name, features in probe_plan(targets, size_control_targets, baselines, reconstructions is not None):
        X = _features(features, latents, subjects, volumes, reconstructions, size_covariate)
        if X is None:
            continue
        X_test = y_test = None
        if has_test:
            X_test = _features(features, np.asarray(test_latents, np.float64), test_subjects, test_volumes,
                               test_reconstructions, size_covariate)
            y_test = None if X_test is None else target_labels(test_subjects, target_name)
        result = _evaluate(target_name, features, X, target_labels(subjects, target_name), settings,
                           X_test, y_test, permute_baselines)
        suite.results.append(result)
        if features in LATENT_FEATURES:  # the probe the held-out rows were scored with is the direction's
            _add_direction(suite, result, latents, subjects, settings, size_covariate, axis)
    return suite


def _check_inputs(latents: np.ndarray, subjects: pd.DataFrame, volumes: np.ndarray | None,
                  reconstructions: np.ndarray | None, test_latents: np.ndarray | None,
                  test_subjects: pd.DataFrame | None) -> None:
    if latents.ndim != 2 or latents.shape[0] != len(subjects):
        raise ValueError(f"latents: expected ({len(subjects)}, L), one row per subject, got {latents.shape}")
    if test_latents is not None and test_subjects is None:
        raise ValueError("run_probe_suite: test_latents given without test_subjects")
    for name, per_subject in (("volumes", volumes), ("reconstructions", reconstructions)):
        if per_subject is not None and len(per_subject) != len(subjects):
            raise ValueError(f"{name}: expected {len(subjects)} volumes, got {len(per_subject)}")


def probe_plan(targets: tuple[str, ...], size_control_targets: tuple[str, ...], baselines: bool,
               reconstructions: bool = False) -> list[tuple[str, str]]:
    """(target, features) of every probe, in the order they are run: latent, size-controlled, baselines
    (with ``reconstructions``, the PCA of the model's reconstructions too)."""
    unknown = sorted((set(targets) | set(size_control_targets)) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown probe target(s) {unknown}; expected some of {list(TARGETS)}")
    plan = [(t, "latent") for t in targets]
    plan += [(t, "latent_size_controlled") for t in size_control_targets]
    if baselines:
        kinds = ("pca_voxels", "brain_mask_volume") + (("pca_reconstructions",) if reconstructions else ())
        plan += [(t, f) for t in targets for f in kinds]
    return plan


def _evaluate(target_name: str, features: str, X: np.ndarray, y: np.ndarray, settings: ProbeSettings,
              X_test: np.ndarray | None, y_test: np.ndarray | None, permute_baselines: bool) -> ProbeResult:
    """One probe's CV, permutation test and held-out score; latent probes also keep their full-data fit."""
    n_train = len(y) - -(-len(y) // settings.n_splits)  # rows in the smallest outer training fold
    probe = make_probe(TARGETS[target_name].task, features, settings, n_train=n_train)
    latent = features in LATENT_FEATURES
    run_settings = settings if latent or permute_baselines else settings.replace(n_permutations=0)
    return evaluate_probe(probe, X, y, TARGETS[target_name].task, run_settings, target=target_name,
                          features=features, X_test=X_test, y_test=y_test, refit=latent)


def _add_direction(suite: ProbeSuite, result: ProbeResult, latents: np.ndarray, subjects: pd.DataFrame,
                   settings: ProbeSettings, size_covariate: str, size_axis: np.ndarray | None = None) -> None:
    """The fitted latent probe and its :class:`Direction` (metadata: CV AUC, p-value, regularisation)."""
    target_name, features = result.target, result.features
    suite.probes[f"{target_name}.{features}"] = result.fitted
    suite.directions[direction_name(target_name, features)] = latent_direction(
        result.fitted, latents, subjects, target_name, features, settings, size_covariate, size_axis,
        metadata={"cv_auc": result.cv["auc"].value, "cv_auc_low": result.cv["auc"].low,
                  "cv_auc_high": result.cv["auc"].high, "p_value": result.p_value,
                  "n_subjects": result.n_subjects, **result.regularisation})


def latent_direction(fitted: Pipeline, latents: np.ndarray, subjects: pd.DataFrame, target_name: str,
                     features: str, settings: ProbeSettings, size_covariate: str,
                     size_axis: np.ndarray | None = None, metadata: dict | None = None) -> Direction:
    """The :class:`Direction` of a latent probe fitted on ``latents``/``subjects`` (``features``: ``latent`` or
    ``latent_size_controlled``), made the way the suite makes every direction."""
    target = TARGETS[target_name]
    controlled = features == "latent_size_controlled"
    size = ({"size_covariate": size_covariate, "size_control": settings.size_control,
             "size_control_fit": settings.size_control_fit, "size_axis": settings.size_axis} if controlled else {})
    return direction_from_probe(
        fitted, latents, name=direction_name(target_name, features), positive=target.positive,
        covariates=covariate(subjects, size_covariate) if controlled else None,
        labels=target_labels(subjects, target_name) if controlled else None,
        kind=settings.direction, size_axis=size_axis if controlled else None,
        metadata={"target": target_name, "task": target.task, "features": features, **size, **(metadata or {})},
    )


def fit_latent_direction(target_name: str, features: str, latents: np.ndarray, subjects: pd.DataFrame,
                         settings: ProbeSettings, size_covariate: str, size_axis: np.ndarray | None = None
                         ) -> Direction:
    """Fit one latent probe on all of ``latents``/``subjects`` (no CV, no scoring) and return its direction:
    what a refit of the suite's direction on other subjects gives (refit.py). ``settings.C`` should be fixed
    (``probe_C``, or the C the suite chose): a nested C search per refit is what the suite's CV is for."""
    if features not in LATENT_FEATURES:
        raise ValueError(f"fit_latent_direction: features must be one of {LATENT_FEATURES}, got {features!r}")
    latents = np.asarray(latents, np.float64)
    X = _features(features, latents, subjects, None, None, size_covariate)
    probe = make_probe(TARGETS[target_name].task, features, settings).fit(X, target_labels(subjects, target_name))
    return latent_direction(probe, latents, subjects, target_name, features, settings, size_covariate, size_axis)
