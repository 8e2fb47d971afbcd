"""What changes along a traversal: anatomical measures, the probe on re-encoded volumes, a predictor.

Every quantity is a value per (subject, step). ``traversal_effects`` collects them in one tidy table (one
row per subject and step, one column per quantity) and summarises each quantity by

  monotonicity       Spearman correlation of the quantity with the step, per subject, averaged over
                     subjects (+1: rises steadily along the direction). Subjects where the quantity is
                     constant along the traversal have no rank correlation; they are counted, not averaged.
  change_per_sd      least-squares slope of the quantity on the step (units per SD), mean over subjects
  relative_change    change_per_sd divided by the value at the step closest to 0 (fraction per SD)

Callables (never a model family):
  measure  ``(N, X, Y, Z) volumes in [0, 1] -> DataFrame`` with N rows, one numeric column per measure
           (e.g. ``brainlatent.anatomy.measure_volumes`` with its grid bound via functools.partial)
  encode   ``Tensor (B, 1, X, Y, Z) -> Tensor (B, L)`` (the model's encoder / inversion)
  predict  ``Tensor (B, 1, X, Y, Z) -> Tensor (B,) or (B, 1)`` (e.g. the feature network's P(male))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.pipeline import Pipeline

from .metrics import spearman
from .probes import probe_probability

Measure = Callable[[np.ndarray], pd.DataFrame]
VolumeFn = Callable[[torch.Tensor], torch.Tensor]


def _check_traversals(traversals: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    traversals = np.asarray(traversals)
    steps = np.asarray(steps, np.float64)
    if traversals.ndim != 5:
        raise ValueError(f"traversals: expected (S, K, X, Y, Z), got shape {traversals.shape}")
    if steps.shape != (traversals.shape[1],):
        raise ValueError(f"steps: expected ({traversals.shape[1]},) to match the traversals, got {steps.shape}")
    return traversals, steps


@torch.inference_mode()
def apply_batched(
    volumes: np.ndarray, fn: VolumeFn, batch_size: int = 8, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Run ``fn`` on volumes ``(N, X, Y, Z)`` as ``(B, 1, X, Y, Z)`` float32 batches -> ``(N, ...)`` numpy."""
    if volumes.ndim != 4:
        raise ValueError(f"volumes: expected (N, X, Y, Z), got shape {volumes.shape}")
    out = []
    for start in range(0, len(volumes), batch_size):
        batch = torch.from_numpy(np.asarray(volumes[start : start + batch_size], np.float32)[:, None]).to(device)
        result = fn(batch)
        if result.shape[0] != len(batch):
            raise ValueError(f"callable returned {tuple(result.shape)} for a batch of {len(batch)} volumes")
        out.append(result.float().cpu().numpy())
    return np.concatenate(out)


def measure_traversals(traversals: np.ndarray, steps: np.ndarray, measure: Measure) -> pd.DataFrame:
    """``(S, K, X, Y, Z)`` -> DataFrame ``(S*K, n_measures)`` in (subject, step) order.

    Volumes are clipped to [0, 1] first: the measures expect processed-volume intensities and an
    unbounded decoder may overshoot slightly.
    """
    traversals, steps = _check_traversals(traversals, steps)
    frames = []
    for s, subject in enumerate(traversals):  # one subject at a time bounds memory for large grids
        df = measure(np.clip(subject.astype(np.float32), 0.0, 1.0))
        if not isinstance(df, pd.DataFrame) or len(df) != len(steps):
            raise ValueError(f"measure must return a DataFrame with {len(steps)} rows, got {type(df).__name__} "
                             f"of length {len(df) if hasattr(df, '__len__') else '?'}")
        frames.append(df.reset_index(drop=True))
    return pd.concat(frames, ignore_index=True)


def reencode_traversals(
    traversals: np.ndarray, encode: VolumeFn, batch_size: int = 8, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Re-encode every traversed volume ``(S, K, X, Y, Z)`` -> latents ``(S, K, L)`` float64. The probe output
    and the reversibility check (counterfactual.py) both read them: one encoding per volume serves both."""
    s, k = traversals.shape[:2]
    latents = apply_batched(traversals.reshape(s * k, *traversals.shape[2:]), encode, batch_size, device)
    return latents.reshape(s, k, -1).astype(np.float64)


def probe_on_latents(latents: np.ndarray, probe: Pipeline, covariates: np.ndarray | None = None) -> np.ndarray:
    """The probe applied to latents ``(S, K, L)`` -> ``(S, K)`` P(positive) (ordinal: group index).

    ``covariates (S, c)``: for size-controlled probes, each subject's covariates (its size covariate), held
    fixed along its traversal: the direction was defined at fixed size.
    """
    s, k = latents.shape[:2]
    flat = latents.reshape(s * k, -1).astype(np.float64)
    if covariates is not None:
        covariates = np.asarray(covariates, np.float64).reshape(s, -1)
        flat = np.hstack([flat, np.repeat(covariates, k, axis=0)])
    return probe_probability(probe, flat).reshape(s, k)


def predictions(
    traversals: np.ndarray, predict: VolumeFn, batch_size: int = 8, device: str | torch.device = "cpu"
) -> np.ndarray:
    """``predict`` on every traversed volume -> ``(S, K)``."""
    s, k = traversals.shape[:2]
    out = apply_batched(traversals.reshape(s * k, *traversals.shape[2:]), predict, batch_size, device)
    if out.size != s * k:
        raise ValueError(f"predict must return one value per volume, got shape {out.shape[1:]} per volume")
    return out.reshape(s, k)


def per_subject_spearman(values: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """``(S, K)`` values -> ``(S,)`` Spearman correlation with ``steps (K,)``; NaN where values are constant."""
    values = np.asarray(values, np.float64)
    constant = np.ptp(values, axis=1) <= 1e-12 * np.maximum(1.0, np.abs(values).max(axis=1))
    rho = spearman(np.broadcast_to(steps, values.shape), values)
    return np.where(constant, np.nan, rho)


@dataclass(frozen=True)
class Monotonicity:
    mean_spearman: float
    sd_spearman: float
    n_subjects: int  # subjects with a defined correlation
    n_constant: int  # subjects where the quantity did not change along the traversal
    change_per_sd: float
    relative_change: float


def monotonicity(values: np.ndarray, steps: np.ndarray) -> Monotonicity:
    """Summarise ``(S, K)`` values along ``steps (K,)`` (see the module docstring)."""
    values = np.asarray(values, np.float64)
    steps = np.asarray(steps, np.float64)
    rho = per_subject_spearman(values, steps)
    valid = np.isfinite(rho)
    centred = steps - steps.mean()
    slopes = (values - values.mean(1, keepdims=True)) @ centred / (centred @ centred)  # (S,)
    reference = values[:, np.argmin(np.abs(steps))]
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(reference != 0, slopes / reference, np.nan)
    return Monotonicity(
        mean_spearman=float(rho[valid].mean()) if valid.any() else float("nan"),
        sd_spearman=float(rho[valid].std(ddof=1)) if valid.sum() > 1 else float("nan"),
        n_subjects=int(valid.sum()),
        n_constant=int((~valid).sum()),
        change_per_sd=float(slopes.mean()),
        relative_change=float(np.nanmean(relative)) if np.isfinite(relative).any() else float("nan"),
    )


@dataclass(frozen=True)
class TraversalEffects:
    per_step: pd.DataFrame  # columns: subject, step_index, step_sd, <quantities...>
    summary: pd.DataFrame  # one row per quantity: Monotonicity fields

    def flat_metrics(self, prefix: str) -> dict[str, float]:
        """``{"<prefix>.<quantity>.monotonicity": ..., ".change_per_sd": ...}`` for MLflow / DVC metrics."""
        out: dict[str, float] = {}
        for quantity, row in self.summary.iterrows():
            out[f"{prefix}.{quantity}.monotonicity"] = float(row["mean_spearman"])
            out[f"{prefix}.{quantity}.change_per_sd"] = float(row["change_per_sd"])
            out[f"{prefix}.{quantity}.relative_change"] = float(row["relative_change"])
        return out


def traversal_effects(
    traversals: np.ndarray,
    steps: np.ndarray,
    *,
    measure: Measure | None = None,
    encode: VolumeFn | None = None,
    probe: Pipeline | None = None,
    probe_covariates: np.ndarray | None = None,
    predict: VolumeFn | None = None,
    subject_ids: list[str] | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    reencoded: np.ndarray | None = None,
) -> TraversalEffects:
    """Measure traversals ``(S, K, X, Y, Z)`` along ``steps (K,)``; each given callable adds quantities.

    ``measure`` adds its columns; ``encode`` + ``probe`` add ``probe_output`` (the probe re-applied to the
    re-encoded volumes), or ``reencoded (S, K, L)`` + ``probe`` when the volumes were re-encoded already
    (:func:`reencode_traversals`); ``predict`` adds ``predicted``.
    """
    traversals, steps = _check_traversals(traversals, steps)
    s, k = traversals.shape[:2]
    if encode is not None and reencoded is not None:
        raise ValueError("traversal_effects: give encode or reencoded latents, not both")
    if (encode is None and reencoded is None) != (probe is None):
        raise ValueError("traversal_effects: re-encoding needs both encode (or reencoded latents) and probe")
    if reencoded is not None and np.shape(reencoded)[:2] != (s, k):
        raise ValueError(f"reencoded latents: expected ({s}, {k}, L), got {np.shape(reencoded)}")
    ids = list(subject_ids) if subject_ids is not None else [str(i) for i in range(s)]
    if len(ids) != s:
        raise ValueError(f"subject_ids: expected {s} ids, got {len(ids)}")
    table = pd.DataFrame({"subject": np.repeat(ids, k), "step_index": np.tile(np.arange(k), s),
                          "step_sd": np.tile(steps, s)})
    quantities: list[str] = []
    if measure is not None:
        measured = measure_traversals(traversals, steps, measure)
        table = pd.concat([table, measured], axis=1)
        quantities += list(measured.columns)
    if probe is not None:
        if reencoded is None:
            reencoded = reencode_traversals(traversals, encode, batch_size, device)
        table["probe_output"] = probe_on_latents(reencoded, probe, probe_covariates).ravel()
        quantities.append("probe_output")
    if predict is not None:
        table["predicted"] = predictions(traversals, predict, batch_size, device).ravel()
        quantities.append("predicted")
    summary = pd.DataFrame(
        {q: asdict(monotonicity(table[q].to_numpy(np.float64).reshape(s, k), steps)) for q in quantities}
    ).T
    summary.index.name = "quantity"
    return TraversalEffects(per_step=table, summary=summary)
