"""A direction in a model's raw latent space, derived from a fitted linear probe.

For a probe ``StandardScaler -> linear head`` the decision function is ``f(z) = w . (z - mu) / s + b``, so
its gradient in the raw latent space is ``g = w / s`` (element-wise). Two directions follow from it
(``kind``), both normalised to unit length:

* ``"gradient"`` (default): ``g`` itself, the "filter": the way to move ``z`` that changes the probe's output
  fastest per unit of latent distance. It recovers a label that is *read off* ``v . z``; it can lean on
  low-variance latent dimensions (a huge ``1 / s``), e.g. a VAE's nearly collapsed ones.
* ``"pattern"``: the activation pattern ``a = Cov(z) g`` (Haufe et al., NeuroImage 2014): how the fitting
  subjects' latents co-vary with the probe's output. It recovers a label that *shifts* the latents along
  ``a`` and ignores collapsed dimensions, but amplifies estimation noise in high-variance ones; ``a . g > 0``,
  so the probe's output still rises along ``+a``.

Measured on the default cohort (dense AE / VAE, docs/directions_method.md): the pattern gives sharper sex
maps (r with the planted sex effect 0.89 / 0.91 vs 0.77 / 0.81) but weaker young/old maps (0.52 / 0.63 vs
0.80 / 0.81) and loses the size-controlled local sex effect, so the gradient stays the default.

Size-controlled probes (``CovariateResidualizer``) see ``r = z - B c``: the gradient with respect to ``z``
at fixed covariates ``c`` is unchanged, but ``r`` has (almost) no variance along the latent size axis, so
the probe's weight there is poorly identified and can be large (it leans on whatever size variation the
brain-volume measurement missed). The direction is therefore made orthogonal to the latent brain-volume
predictor ``g`` (ridge regression of the covariate on the latents over the fitting subjects, raw-space
coefficients): moving along it leaves the brain volume the latents predict unchanged, to first order. Like the
residualiser (``CovariateResidualizer.within_labels``), the predictor is fitted *within* the label groups
(latents and covariate centred per group): fitted across them, it would also use the latent code of a
size-independent male effect to predict the larger male heads, and projecting it out would remove part of
the effect the size-controlled direction is for.

That predictor is estimated from the cohort, so it also holds whatever part of a *local* effect the latents
code the way they code "a larger brain" (a local enlargement adds brain volume too): projecting it out then
removes part of the local effect (measured on the tissue cohort, docs/directions_method.md). ``size_axis``
replaces it with an axis the caller estimates another way, the model's own latent tangent of an isotropic
rescaling of the volumes (``sizeaxis.scaling_axis``, ``directions.size_axis: scaling``): a local effect cannot
move that axis, since it is defined without the labels or the covariate.

Sign convention: moving along ``+vector`` raises the probe's output, i.e. towards label 1 (male, older)
for binary probes and towards older groups for the ordinal probe (``Direction.positive`` says which).

Step scale: steps are measured in standard deviations of the projection ``z . vector`` over the subjects
the probe was fitted on (``step_sd``), so "+2 SD" means as far along the direction as a subject two SDs
from the cohort mean, whatever the latent space's units. Never raw coefficients times a constant.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from .probes import DIRECTION_KINDS, CovariateResidualizer, centred_per_group

_FORMAT = "brainlatent.direction/1"


@dataclass(frozen=True)
class Direction:
    """A unit vector ``(L,)`` in raw latent space with its step scale and the probe it came from."""

    name: str  # e.g. "sex", "age_old", "sex_size_controlled"
    vector: np.ndarray  # (L,) float64, unit norm
    step_sd: float  # SD of latents @ vector over the fitting subjects: the size of one step
    center: float  # mean of latents @ vector over the fitting subjects
    positive: str  # what +vector moves towards, e.g. "male", "older"
    logit_per_sd: float = float("nan")  # change in the probe's output per +1 SD step
    metadata: dict[str, Any] = field(default_factory=dict)  # target, task, features, C, CV AUC, ...

    def __post_init__(self) -> None:
        v = np.asarray(self.vector, dtype=np.float64)
        if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
            raise ValueError(f"direction {self.name!r}: vector must be a finite 1-D array, got shape {v.shape}")
        norm = np.linalg.norm(v)
        if not abs(norm - 1.0) < 1e-6:
            raise ValueError(f"direction {self.name!r}: vector must have unit norm, got {norm:.6g}")
        if not (np.isfinite(self.step_sd) and self.step_sd > 0):
            raise ValueError(f"direction {self.name!r}: step_sd must be positive, got {self.step_sd!r}")
        object.__setattr__(self, "vector", v)

    @property
    def dim(self) -> int:
        return self.vector.size

    def project(self, latents: np.ndarray) -> np.ndarray:
        """``(N, L)`` latents -> ``(N,)`` position along the direction in SD units (0 = fitting-cohort mean)."""
        latents = self.check_latents(latents)
        return (latents @ self.vector - self.center) / self.step_sd

    def offsets(self, steps: np.ndarray) -> np.ndarray:
        """``(K,)`` steps in SDs -> ``(K, L)`` latent offsets ``step * step_sd * vector``."""
        steps = np.asarray(steps, dtype=np.float64)
        if steps.ndim != 1:
            raise ValueError(f"steps must be a 1-D array of SD multiples, got shape {steps.shape}")
        return steps[:, None] * self.step_sd * self.vector[None, :]

    def check_latents(self, latents: np.ndarray) -> np.ndarray:
        latents = np.asarray(latents, dtype=np.float64)
        if latents.ndim != 2 or latents.shape[1] != self.dim:
            raise ValueError(f"direction {self.name!r}: expected latents (N, {self.dim}), got {latents.shape}")
        return latents

    # ------------------------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "name": self.name,
            "positive": self.positive,
            "step_sd": float(self.step_sd),
            "center": float(self.center),
            "logit_per_sd": None if math.isnan(self.logit_per_sd) else float(self.logit_per_sd),  # strict JSON
            "metadata": _jsonable(self.metadata),
            "vector": self.vector.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "direction") -> "Direction":
        if d.get("format") != _FORMAT:
            raise ValueError(f"{source}: not a direction file (format {d.get('format')!r}, expected {_FORMAT!r})")
        try:
            return cls(name=d["name"], vector=np.asarray(d["vector"], float), step_sd=float(d["step_sd"]),
                       center=float(d["center"]), positive=d["positive"],
                       logit_per_sd=_float_or_nan(d.get("logit_per_sd")), metadata=d.get("metadata", {}))
        except KeyError as err:
            raise ValueError(f"{source}: missing field {err.args[0]!r}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Direction":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read direction JSON ({err})") from None
        return cls.from_dict(d, source=str(path))


def _float_or_nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None  # strict JSON has no NaN / Infinity
    return obj


def raw_gradient(probe: Pipeline) -> np.ndarray:
    """``(L,)`` gradient of a fitted latent probe's decision function with respect to the raw latents.

    Supports ``[CovariateResidualizer] -> StandardScaler -> linear head`` (see the module docstring).
    """
    if not isinstance(probe, Pipeline):
        raise ValueError(f"expected a fitted sklearn Pipeline probe, got {type(probe).__name__}")
    grad = np.asarray(probe[-1].coef_, dtype=np.float64)
    if grad.ndim == 2:
        if grad.shape[0] != 1:
            raise ValueError(f"probe head has {grad.shape[0]} coefficient rows; a direction needs exactly one")
        grad = grad[0]
    for _, step in reversed(probe.steps[:-1]):
        if isinstance(step, StandardScaler):
            if step.scale_ is not None:
                grad = grad / step.scale_
        elif isinstance(step, CovariateResidualizer):
            pass  # z -> z - g(covariates): identity Jacobian in z
        else:
            raise ValueError(
                f"probe step {type(step).__name__} is not a latent-space transform; directions come from "
                "'latent' or 'latent_size_controlled' probes only"
            )
    return grad


def direction_from_probe(
    probe: Pipeline,
    latents: np.ndarray,
    name: str,
    positive: str,
    metadata: dict[str, Any] | None = None,
    covariates: np.ndarray | None = None,
    kind: str = "gradient",
    labels: np.ndarray | None = None,
    size_axis: np.ndarray | None = None,
) -> Direction:
    """The unit raw-space direction (``kind``: see the module docstring) of a fitted latent probe, scaled on
    its fitting ``latents (N, L)``.

    ``covariates (N, c)``: the fitting subjects' covariates, required for size-controlled probes (whose
    pattern is taken over the size-residualised latents the probe saw). ``labels (N,)``: the fitting subjects'
    labels, so that a residualiser fitted within label groups gets a latent covariate axis fitted the same way.
    ``size_axis (L,)``: for size-controlled probes, the latent head-size axis to make the direction orthogonal
    to instead of the covariate predictor (``sizeaxis.scaling_axis``); its cosine with the covariate predictor
    is kept in the metadata (``size_axis_cos_covariate_axis``). Ignored for probes without size control.
    ``logit_per_sd`` is the change of the probe's output per +1 SD step along the direction.
    """
    if kind not in DIRECTION_KINDS:
        raise ValueError(f"direction {name!r}: kind must be one of {DIRECTION_KINDS}, got {kind!r}")
    grad = raw_gradient(probe)
    latents = np.asarray(latents, dtype=np.float64)
    if latents.ndim != 2 or latents.shape[1] != grad.size:
        raise ValueError(f"direction {name!r}: expected fitting latents (N, {grad.size}), got {latents.shape}")
    metadata = {**(metadata or {}), "kind": kind}
    residualizers = [step for _, step in probe.steps[:-1] if isinstance(step, CovariateResidualizer)]
    if residualizers and covariates is None:
        raise ValueError(f"direction {name!r}: a size-controlled probe needs the fitting covariates (N, c)")
    vector = grad
    if kind == "pattern":
        seen = latents
        if residualizers:  # the latents as the probe saw them: size regressed out
            covs = np.asarray(covariates, np.float64).reshape(len(latents), -1)
            seen = residualizers[0].transform(np.hstack([latents, covs]))
        vector = np.cov(seen, rowvar=False) @ grad
    if residualizers:
        groups = labels if residualizers[0].within_labels else None
        predictor = covariate_axes(latents, covariates, groups)
        if size_axis is None:
            vector = _project_out(vector, predictor)  # see the module docstring
            metadata["orthogonal_to"] = "latent covariate predictor"
        else:
            axis = np.asarray(size_axis, np.float64).ravel()
            if axis.size != grad.size or not np.all(np.isfinite(axis)) or not np.linalg.norm(axis) > 0:
                raise ValueError(f"direction {name!r}: size_axis must be a finite non-zero ({grad.size},) vector, "
                                 f"got shape {axis.shape}")
            vector = _project_out(vector, axis[:, None])
            metadata["orthogonal_to"] = "latent scaling axis"
            metadata["size_axis_cos_covariate_axis"] = float(
                abs(axis @ predictor[:, 0]) / (np.linalg.norm(axis) * np.linalg.norm(predictor[:, 0])))
    norm = np.linalg.norm(vector)
    if not norm > 0:
        raise ValueError(f"direction {name!r}: the probe's coefficients are all zero; it learned no direction")
    vector = vector / norm
    projection = latents @ vector
    step_sd = float(projection.std(ddof=1))
    return Direction(name=name, vector=vector, step_sd=step_sd, center=float(projection.mean()),
                     positive=positive, logit_per_sd=float(grad @ vector * step_sd), metadata=metadata)


def covariate_axes(latents: np.ndarray, covariates: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """``(L, c)``: raw-latent-space gradients of ridge predictors of each covariate from ``latents (N, L)``;
    with ``groups (N,)``, fitted within them (latents and covariates centred per group)."""
    latents = np.asarray(latents, np.float64)
    covariates = np.asarray(covariates, np.float64).reshape(len(latents), -1)
    if groups is not None:
        latents, covariates = centred_per_group(latents, groups), centred_per_group(covariates, groups)
    axes = []
    for column in covariates.T:
        predictor = Pipeline([("scale", StandardScaler()), ("head", RidgeCV(alphas=np.logspace(-3, 3, 13)))])
        axes.append(raw_gradient(predictor.fit(latents, column)))
    return np.stack(axes, axis=1)


def _project_out(vector: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """``vector (L,)`` minus its orthogonal projection onto the span of the columns of ``axes (L, c)``."""
    q, _ = np.linalg.qr(np.asarray(axes, np.float64).reshape(vector.size, -1))
    return vector - q @ (q.T @ vector)
