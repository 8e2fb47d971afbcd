"""One direction's study in the directions stage: traverse the held-out subjects along it, measure every
traversed volume, re-encode some, run the counterfactual checks; write its maps, strips, GIFs and 4D NIfTIs."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from brainlatent.anatomy import estimate_tissue_levels, measure_volumes, sex_region_of
from brainlatent.config import Params
from brainlatent.data.dataset import ProcessedData
from brainlatent.grid import Grid

from . import counterfactual as cf
from .codec import LatentCodec, encode_batch
from .direction import Direction
from .effects import TraversalEffects, reencode_traversals, traversal_effects
from .targets import covariate
from .traversal import DifferenceMap, group_difference_map, traverse

log = logging.getLogger(__name__)

DECODE_BATCH = 16


@dataclass(frozen=True)
class DirectionStudy:
    """One direction's traversals and what was measured along them."""

    direction: Direction
    traversals: np.ndarray  # (S, K, X, Y, Z) float32
    difference: DifferenceMap  # last step minus first step
    effects: TraversalEffects
    counterfactual: dict[str, float | str]  # counterfactual.direction_checks of this direction


def traversal_measure(params: Params, root: Path, data: ProcessedData, planted: dict[str, np.ndarray],
                      mask: np.ndarray, device) -> tuple[Any, str]:
    """What is measured on every traversed volume, and which feature network (``"none (...)"``: why not).

    The anatomical volumes (with the cohort's own tissue levels, not each volume's, and the cohort's local
    sex region: cohort.json, the temporal poles for real data), the projection on every planted map, and,
    when ``directions.effectiveness_featurenet`` and a FeatureNet is registered, its P(male) and expected age
    group: the independent predictors of the effectiveness check (counterfactual.py).
    """
    measures = [functools.partial(measure_volumes, grid=data.grid,
                                  percentiles=tuple(float(p) for p in params.data.intensity_percentiles),
                                  levels=estimate_tissue_levels(data.volumes, data.grid),
                                  sex_region=sex_region_of(data.ground_truth_dir))]
    if planted:
        measures.append(cf.map_projection_measure(planted, mask))
    ident = "none (directions.effectiveness_featurenet is false)"
    if params.directions.effectiveness_featurenet:
        from brainlatent.evaluation import resolve_feature_extractor

        try:
            extractor = resolve_feature_extractor(params, root, device)
        except ValueError as err:
            ident = f"none ({err})"
        else:
            if extractor.predicts_attributes:
                measures.append(cf.featurenet_measure(extractor.extractor, device))
                ident = extractor.ident
            else:
                ident = f"none ({extractor.ident} has no sex / age heads)"
        if ident.startswith("none"):
            log.warning("effectiveness: no feature network predictions: %s", ident)
    return cf.combine_measures(*measures), ident


def _merge_effects(measured: TraversalEffects, reencoded: TraversalEffects) -> TraversalEffects:
    keys = ["subject", "step_index", "step_sd"]
    per_step = measured.per_step.merge(reencoded.per_step, on=keys, how="left")  # NaN: subject not re-encoded
    return TraversalEffects(per_step=per_step, summary=pd.concat([measured.summary, reencoded.summary]))


@dataclass(frozen=True)
class TraversalContext:
    """What every direction's traversal shares: the traversed subjects and how their volumes are judged."""

    latents: np.ndarray  # (S, D) the traversed test subjects' latents
    subjects: pd.DataFrame  # their subjects.csv rows (index reset)
    reconstructions: np.ndarray  # (S, X, Y, Z) decode(latents)
    steps: np.ndarray  # (K,) in SDs
    measure: Any  # volumes (N, X, Y, Z) -> DataFrame (anatomy, map projections, feature net)
    mask: np.ndarray  # (X, Y, Z) bool: the brain voxels the counterfactual distances are taken over
    planted: dict[str, np.ndarray]  # ground-truth maps by GROUND_TRUTH_MAPS key (empty for a real cohort)
    n_reencode: int  # subjects whose traversals are re-encoded (probe output, reversibility)
    size_covariate: str


def study_direction(direction: Direction, probe, codec: LatentCodec, ctx: TraversalContext) -> DirectionStudy:
    """Traverse the context's subjects along ``direction``; measure; re-encode the first ``ctx.n_reencode``
    (probe output, reversibility); run the counterfactual checks."""
    traversals = traverse(ctx.latents, direction, ctx.steps, codec.decode, batch_size=DECODE_BATCH,
                          device=codec.device)
    ids = ctx.subjects["subject_id"].astype(str).tolist()
    n = ctx.n_reencode
    measured = traversal_effects(traversals, ctx.steps, measure=ctx.measure, subject_ids=ids)
    controlled = direction.metadata.get("features") == "latent_size_controlled"
    covariates = covariate(ctx.subjects, ctx.size_covariate)[:n] if controlled else None
    reencoded = reencode_traversals(traversals[:n], codec.encode, encode_batch(traversals.shape[2:]), codec.device)
    probed = traversal_effects(traversals[:n], ctx.steps, reencoded=reencoded, probe=probe,
                               probe_covariates=covariates, subject_ids=ids[:n])
    effects = _merge_effects(measured, probed)
    inputs = cf.CounterfactualInputs(direction, ctx.latents, traversals, ctx.steps, ctx.reconstructions,
                                     reencoded, effects)
    intended = ctx.planted.get(cf.INTENDED_MAP.get(direction.name, ""))
    checks = cf.direction_checks(inputs, codec.decode, ctx.mask, intended,
                                 cf.EFFECTIVENESS.get(direction.name, ()), DECODE_BATCH, codec.device)
    return DirectionStudy(direction, traversals, group_difference_map(traversals), effects, checks)


def _save_nifti_4d(volumes: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """``(K, X, Y, Z)`` -> one 4D NIfTI ``(X, Y, Z, K)`` (step on the 4th axis): one file per traversal."""
    img = nib.Nifti1Image(np.moveaxis(np.asarray(volumes, np.float32), 0, -1), affine)
    img.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def write_study(out: Path, name: str, study: DirectionStudy, ids: list[str], steps: np.ndarray, grid: Grid,
                n_strip: int) -> None:
    """Maps (NIfTI + PNG), strips, GIFs and 4D traversal NIfTIs of one direction under ``out``."""
    from brainlatent.viz.traversal import save_difference_map, save_traversal_gif, save_traversal_strip

    for kind, img in study.difference.to_nifti(grid).items():
        (out / "maps").mkdir(parents=True, exist_ok=True)
        nib.save(img, out / "maps" / f"{name}_{kind}.nii.gz")
    positive = study.direction.positive
    background = study.traversals[:, int(np.argmin(np.abs(steps)))].mean(0)
    span = f"{steps[-1]:+.1f} vs {steps[0]:+.1f} SD, {study.difference.n_subjects} held-out subjects"
    save_difference_map(study.difference.mean_difference, out / "figures" / f"{name}_difference.png",
                        background=background, title=f"{name}: mean difference ({span}; + = {positive})",
                        affine=grid.affine)
    save_difference_map(study.difference.t_statistic, out / "figures" / f"{name}_tmap.png", background=background,
                        title=f"{name}: paired t ({span})", label="paired t", affine=grid.affine,
                        threshold=3.0)  # |t| > 3: the default (5% of the colour range) is low for a t map
    for s in range(min(n_strip, len(ids))):
        title = f"{name} (+ = {positive}), subject {ids[s]}"
        _save_nifti_4d(study.traversals[s], grid.affine, out / "traversals" / f"{name}_{ids[s]}.nii.gz")
        save_traversal_strip(study.traversals[s], steps, out / "figures" / f"{name}_{ids[s]}_strip.png",
                             title=title, affine=grid.affine)
        save_traversal_gif(study.traversals[s], steps, out / "figures" / f"{name}_{ids[s]}.gif", title=name,
                           affine=grid.affine)
