"""`brainlatent directions --model <family>` (DVC stage ``directions@<family>``): the latent-direction
experiment for one registered model version, end to end.

1. **Encode** every subject of the processed cohort with the version ``train@<family>`` registered
   (``trained/<family>.json``; ``model_uri`` names another by hand) through
   :class:`~brainlatent.directions.codec.LatentCodec` (GAN families by inversion).
2. **Probe** sex, age_old, age_group (and ``planted``, a positive control, when subjects.csv has the column;
   sex and planted also at fixed head size, ``directions.size_covariate``) with repeated CV on the *train +
   val* subjects, then score once on the *test* split (the headline numbers): the one split no champion
   selection, tuning, early stopping, feature-net training or default choice sees. PCA-of-voxels and
   brain-mask-volume baselines under the same protocol (``run_probe_suite``).
3. **Directions** from the fitted latent probes, saved as JSON with the model version they belong to; the
   size-controlled ones orthogonal to the model's latent scaling axis (``directions.size_axis: scaling``,
   sizeaxis.py: a seeded subset of the fitting subjects rescaled and encoded) or to the covariate predictor.
4. **Traverse** test subjects along every direction and decode: strips, GIFs, 4D NIfTIs, group-mean
   difference and paired-t maps.
5. **Effects** along each traversal: brain / ventricle / cortical-GM / sex-region volumes, projections on
   the planted maps, the feature network's predictions (when one is registered) and the probe re-applied to
   re-encoded volumes, each with its monotonicity.
6. **Counterfactual checks** of every direction (counterfactual.py): composition, reversibility,
   effectiveness, minimality.
7. **Ground truth** (synthetic cohort, positive controls): difference maps against the planted effect maps,
   plainly and beyond global size (partial r given the map of a pure global rescaling of the traversed
   subjects, rendered by the model: sizeaxis.global_size_map); sign and monotonicity of the ventricle change
   along the age directions.
8. **Outputs**: ``directions/<family>/`` (DVC), ``metrics/directions/<family>.json`` (flat headline
   numbers), one MLflow run in ``brainlatent-directions``, headline tags on the model version.

Cost: for GAN families every encoding is an inversion (``directions.inversion_steps`` Adam steps). The
cohort is inverted in batches; re-encoding the traversals would cost one inversion per traversed volume
(subjects x steps x directions), so GAN families re-encode the strip subjects only (at least two; tag
``reencode_subjects``). Details: docs/directions_method.md, "The directions stage".
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_curve

from brainlatent import model_ref, registry, tracking
from brainlatent.anatomy import atlas_on_grid, load_effect_map
from brainlatent.config import Params, to_flat_dict
from brainlatent.data.dataset import ProcessedData
from brainlatent.grid import Grid
from brainlatent.inversion import psnr

from . import counterfactual as cf
from .codec import LatentCodec
from .direction import Direction
from .evaluation import CV_INTERVAL, check_labels
from .groundtruth import (MAP_MEASURE_SUFFIXES, PLANTED_AGE_SIGNS, SIZE_REFERENCE_MEASURES, ground_truth_metrics,
                          map_correlation, partial_map_correlation)
from .headline import AGE_DIRECTIONS, VERSION_TAG_KEYS, headline_metrics
from .probes import ProbeSettings, chosen_regularisation, decision_scores
from .refit import ComparisonMaps, size_control_bootstrap
from .sizeaxis import ScalingAxis, global_size_map, scaling_axis
from .study import (
    DECODE_BATCH,
    DirectionStudy,
    TraversalContext,
    study_direction,
    traversal_measure,
    write_study,
)
from .suite import LATENT_FEATURES, ProbeSuite, run_probe_suite
from .targets import PLANTED, TARGETS, available_targets, covariate, target_labels
from .traversal import symmetric_steps

log = logging.getLogger(__name__)

# Planted effect maps that `prepare` puts in data/processed/ground_truth/ (data/synthetic.py writes them).
GROUND_TRUTH_MAPS: dict[str, str] = {
    "age": "age_effect.nii.gz",
    "sex": "sex_effect.nii.gz",
    "sex_local": "sex_local_effect.nii.gz",
    "planted": "planted_effect.nii.gz",  # a positive control planted into any cohort (label column `planted`)
}
# The untouched evaluation split: the probes are fitted (and cross-validated) on FIT_SPLITS and scored once
# on HELDOUT_SPLIT. Validation subjects are seen by model selection (early stopping, tuning, the champion
# rule) but never by the probes, so fitting the probes on them costs the test split nothing.
FIT_SPLITS = ("train", "val")
HELDOUT_SPLIT = "test"
ROC_TARGETS = ("sex", "age_old")
BY_HAND_DIR = "by_uri"  # directions/by_uri/<name>-v<version>: runs on a version named with --model-uri
MIN_REENCODE_SUBJECTS = 2


@dataclass(frozen=True)
class DirectionsOutcome:
    family: str
    run_id: str
    model_version: str
    metrics: dict[str, float]  # the headline numbers of metrics/directions/<family>.json
    out_dir: Path  # directions/<family>
    run_url: str


def probe_settings(params: Params) -> ProbeSettings:
    """``params.directions`` as the probes' settings (seeded with the project seed)."""
    c = params.directions
    return ProbeSettings(n_splits=c.n_splits, n_repeats=c.n_repeats, C=c.probe_C, n_bootstrap=c.n_bootstrap,
                         n_permutations=c.n_permutations, pca_components=c.pca_components, seed=params.seed,
                         direction=c.direction, size_control=c.size_control,
                         size_control_fit=c.size_control_fit, size_axis=c.size_axis)


# ------------------------------------------------------------------------------------------- cohort
def feasible_targets(subjects: pd.DataFrame, n_splits: int) -> tuple[list[str], dict[str, str]]:
    """Targets of ``subjects`` (the fitting subjects) whose labels can fill ``n_splits`` stratified folds, and
    why the others cannot.

    A small cohort may lack an age group's worth of subjects; that probe is skipped (and tagged), not fatal.
    """
    ok, skipped = [], {}
    for name in available_targets(subjects):
        try:
            check_labels(target_labels(subjects, name), TARGETS[name].task, n_splits,
                         what=f"{name} labels ({'+'.join(FIT_SPLITS)} splits)")
        except ValueError as err:
            skipped[name] = str(err)
        else:
            ok.append(name)
    return ok, skipped


def traversal_rows(heldout: np.ndarray, n_total: int, n: int, seed: int) -> np.ndarray:
    """Row indices of the subjects to traverse: ``n`` seeded test subjects (all subjects if < 2 held out)."""
    pool = heldout if len(heldout) >= 2 else np.arange(n_total)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))


# ------------------------------------------------------------------------------------- ground truth
def load_ground_truth(gt_dir: Path | None, grid: Grid) -> dict[str, np.ndarray]:
    """The planted effect maps of ``gt_dir`` on ``grid``, by ``GROUND_TRUTH_MAPS`` key (empty: real cohort)."""
    if gt_dir is None:
        return {}
    maps = {}
    for key, fname in GROUND_TRUTH_MAPS.items():
        if (gt_dir / fname).is_file():
            maps[key] = load_effect_map(gt_dir / fname, grid)
        else:
            log.info("ground truth: %s not found; %s map checks skipped", gt_dir / fname, key)
    return maps


# Size control should recover a local effect better than the raw direction: (target, the local map).
SIZE_CONTROL_COMPARISONS = (("sex", "sex_local"), (PLANTED, "planted"))


# The reference map of the "beyond size" checks: gt.<size-map key>.<map>_map_r is its own r with each planted map.
SIZE_MAP_KEY = "global_size"


def size_reference_map(exp: Experiment, encoded: Encoded) -> np.ndarray:
    """The map of a pure global rescaling of the traversed subjects as the model renders it
    (sizeaxis.global_size_map; x1.03 linear, like the scaling axis): what the ground-truth checks take out of
    both maps for their "beyond size" partial r. ``2 x directions.n_traversal_subjects`` encodings and decodings
    (inversions for GAN families); computed only when there is ground truth."""
    return global_size_map(lambda v: exp.codec.encode_volumes(v),
                           lambda z: exp.codec.decode_latents(z, DECODE_BATCH), encoded.originals,
                           device=exp.codec.device)


def _map_r(what: str, fn, *maps_and_mask) -> float:
    try:
        return fn(*maps_and_mask)
    except ValueError as err:  # a constant map: the decoder ignores this direction
        log.warning("ground truth: %s: %s", what, err)
        return math.nan


def ground_truth_checks(maps: dict[str, np.ndarray], grid: Grid, studies: dict[str, DirectionStudy],
                        size_map: np.ndarray | None = None) -> dict[str, float]:
    """``gt.<direction>.<map>_map_r`` for every direction x planted map (inside the template brain mask),
    the planted-sign checks along the age directions, and the size-control comparisons on the local maps
    (``gt.<map>.size_controlled_better``). Empty when there is no ground truth (real cohorts).

    With ``size_map`` (:func:`size_reference_map`) also ``gt.<direction>.<map>_map_r_beyond_size``, the partial
    r of the two maps given the global-rescaling map (groundtruth.partial_map_correlation, same mask),
    ``gt.<direction>.<map>_map_r_size_free``, the r of the direction's whole map with the part of the planted
    map the rescaling map does not explain (groundtruth.size_free_map_correlation: global size the direction
    moves lowers it), the comparisons by both (``gt.<map>.size_controlled_better_beyond_size`` /
    ``_size_free``) and the reference's own plain r with each
    planted map (``gt.global_size.<map>_map_r``: how much a pure size change already "matches" it), and for the
    raw and size-controlled directions of each comparison ``gt.<direction>.global_size_map_r_beyond_<map>``:
    the partial r of the direction's map with the rescaling map given the local map (the global size it moves
    beyond the local effect; ``gt.<map>.size_controlled_less_size`` when size control moves less of it)."""
    if not maps:
        return {}
    mask = atlas_on_grid(grid).brain > 0.5
    out: dict[str, float] = {}
    if size_map is not None:
        for key, planted in maps.items():
            out[f"gt.{SIZE_MAP_KEY}.{key}_map_r"] = _map_r(f"global size map vs planted {key} map",
                                                           map_correlation, size_map, planted, mask)
    for name, study in studies.items():
        diff = study.difference.mean_difference
        for key, planted in maps.items():
            what = f"{name} vs planted {key} map"
            out[f"gt.{name}.{key}_map_r"] = _map_r(what, map_correlation, diff, planted, mask)
            if size_map is not None:
                for suffix, measure in SIZE_REFERENCE_MEASURES.items():
                    out[f"gt.{name}.{key}_map_r{suffix}"] = _map_r(f"{what} ({suffix[1:]})", measure, diff, planted,
                                                                   size_map, mask)
        if name in AGE_DIRECTIONS:
            checks = ground_truth_metrics(summary=study.effects.summary, expected_signs=PLANTED_AGE_SIGNS)
            out.update({f"gt.{name}.{k}": v for k, v in checks.items()})
    for target, key in SIZE_CONTROL_COMPARISONS:
        if size_map is not None and key in maps:
            # The other half of "local and size-independent": how much global size a direction still moves
            # beyond the local effect (partial r of its map with the rescaling map given the local map). The
            # beyond-size r above cannot see it: a map ``local + a x size`` scores the same whatever ``a``.
            moved = {}
            for name in (target, f"{target}_size_controlled"):
                if name in studies:
                    moved[name] = out[f"gt.{name}.{SIZE_MAP_KEY}_map_r_beyond_{key}"] = _map_r(
                        f"{name} vs the global size map beyond the planted {key} map", partial_map_correlation,
                        studies[name].difference.mean_difference, size_map, maps[key], mask)
            if len(moved) == 2:
                raw, controlled = moved.values()
                out[f"gt.{key}.size_controlled_less_size"] = float(abs(controlled) < abs(raw))
        for suffix in MAP_MEASURE_SUFFIXES:
            raw = out.get(f"gt.{target}.{key}_map_r{suffix}")
            controlled = out.get(f"gt.{target}_size_controlled.{key}_map_r{suffix}")
            if raw is not None and controlled is not None:
                # The claim, measured: size control recovers the local effect better (NaN compares false).
                out[f"gt.{key}.size_controlled_minus_raw_r{suffix}"] = controlled - raw
                out[f"gt.{key}.size_controlled_better{suffix}"] = float(controlled > raw)
    return out


def size_control_intervals(exp: Experiment, encoded: Encoded, suite: ProbeSuite, ctx: TraversalContext,
                           size_map: np.ndarray | None) -> dict[str, float]:
    """With ``directions.map_bootstrap: n > 0`` and ground truth: for every raw vs size-controlled comparison
    (``SIZE_CONTROL_COMPARISONS``), ``n`` refits of both probes on resampled fitting subjects, traversed from
    resampled traversed subjects (refit.py): ``gt.<map>.size_controlled_minus_raw_r<suffix>_low`` / ``_high``,
    ``gt.<map>.size_controlled_better<suffix>_share`` and ``gt.<map>.bootstrap_refits``. The probes keep the
    C they were fitted with; the latent scaling axis is the model's."""
    n = exp.params.directions.map_bootstrap
    if not n or size_map is None:
        return {}
    fit = exp.fit_rows
    out: dict[str, float] = {}
    for target, key in SIZE_CONTROL_COMPARISONS:
        probes = {f: suite.probes.get(f"{target}.{f}") for f in LATENT_FEATURES}
        if key not in ctx.planted or any(p is None for p in probes.values()):
            continue
        result = size_control_bootstrap(
            target, encoded.latents[fit], exp.data.subjects.iloc[fit].reset_index(drop=True), exp.settings,
            exp.params.directions.size_covariate, ctx.latents, (float(ctx.steps[0]), float(ctx.steps[-1])),
            exp.codec.decode, ComparisonMaps(ctx.planted[key], size_map, ctx.mask), n, seed=exp.params.seed,
            size_axis=None if encoded.size_axis is None else encoded.size_axis.vector,
            C={f: chosen_regularisation(p)["C"] for f, p in probes.items()}, batch_size=DECODE_BATCH,
            device=exp.codec.device)
        out.update({f"gt.{key}.{k}": v for k, v in result.items()})
    return out


# ----------------------------------------------------------------------------------------- tables
def roc_table(suite: ProbeSuite, latents: np.ndarray, subjects: pd.DataFrame, split: str) -> pd.DataFrame:
    """ROC points (fpr, tpr, target) of the sex and age_old latent probes on ``split`` subjects.

    ``split == "heldout"``: probes fitted on the train split scoring ``latents``/``subjects`` (held out);
    ``"cv"``: the first repeat's out-of-fold scores of the fitting subjects (no held-out set).
    """
    frames = []
    results = {(r.target, r.features): r for r in suite.results}
    for target in ROC_TARGETS:
        key = f"{target}.latent"
        if key not in suite.probes:
            continue
        y = target_labels(subjects, target)
        scores = (decision_scores(suite.probes[key], latents) if split == "heldout"
                  else results[(target, "latent")].oof_scores[0])
        if len(np.unique(y)) < 2:
            log.warning("ROC of %s: the %s subjects hold one class only; skipped", target, split)
            continue
        fpr, tpr, _ = roc_curve(y, scores)
        frames.append(pd.DataFrame({"fpr": fpr, "tpr": tpr, "target": target}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["fpr", "tpr", "target"])


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# -------------------------------------------------------------------------------------------- stage
@dataclass(frozen=True)
class Experiment:
    """What the stage works on, fixed before any work: the model version, the cohort, who is fitted, scored
    and traversed, and where the outputs go."""

    family: str
    params: Params
    root: Path
    uri: str  # the model URI requested (train@<family>'s version, or the one named by hand)
    by_hand: bool  # a version named with --model-uri: outputs beside the pipeline's, not in them
    loaded: registry.LoadedModel
    data: ProcessedData
    codec: LatentCodec
    settings: ProbeSettings
    device: torch.device
    fit_rows: np.ndarray  # the probes' fitting subjects (FIT_SPLITS)
    heldout_rows: np.ndarray  # scored once (HELDOUT_SPLIT); empty: cross-validated only
    traversal_rows: np.ndarray  # test subjects traversed along every direction
    targets: tuple[str, ...]  # probes whose labels fill the folds
    skipped: dict[str, str]  # target -> why it is not probed
    size_control_targets: tuple[str, ...]
    out: Path  # directions/<family> (or directions/by_uri/<name>-v<version>)

    @property
    def split(self) -> str:
        """What the headline probe scores are: ``"heldout"`` (the test split) or ``"cv"``."""
        return "heldout" if len(self.heldout_rows) else "cv"

    @property
    def n_strip(self) -> int:
        return min(self.params.directions.n_strip_subjects, len(self.traversal_rows))

    @property
    def n_reencode(self) -> int:
        """Traversed subjects re-encoded: all, or for inverting families the strip subjects (at least two)."""
        n = len(self.traversal_rows)
        return n if not self.codec.inverts else min(n, max(MIN_REENCODE_SUBJECTS, self.n_strip))

    @property
    def model_uri(self) -> str:
        return f"models:/{self.loaded.name}/{self.loaded.version}"

    def labels(self) -> dict[str, str]:
        """What the numbers are: strings in metrics/directions/<family>.json, tags in MLflow."""
        cfg = self.params.directions
        return {"heldout_split": HELDOUT_SPLIT if self.split == "heldout" else "none (cross-validated only)",
                "fit_splits": "+".join(FIT_SPLITS), "size_covariate": cfg.size_covariate,
                "size_control": cfg.size_control, "size_control_fit": cfg.size_control_fit,
                "size_axis": cfg.size_axis, "cv_interval": CV_INTERVAL}

    def run_tags(self) -> dict[str, str]:
        loaded = self.loaded
        return {
            "model": self.family, "stage": "directions", "model_name": loaded.name,
            "model_version": str(loaded.version), "model_uri": self.model_uri, "requested_uri": self.uri,
            "model_run_id": loaded.run_id, "latent_space": self.codec.latent_space, "headline_split": self.split,
            "reencode_subjects": str(self.n_reencode), "skipped_targets": ",".join(self.skipped) or "none",
            **self.labels(), "heldout_untouched": str(self.params.evaluate.split != HELDOUT_SPLIT).lower(),
            **tracking.lineage_tags(self.params.data.processed_dir, self.root),
        }

    def run_params(self) -> dict[str, Any]:
        p = self.params
        return {**to_flat_dict(p.directions, "directions."), "seed": p.seed, "device": str(self.device),
                "data.shape": list(self.data.grid.shape), "latent_dim": self.codec.dim,
                "n_fit": len(self.fit_rows), "n_heldout": len(self.heldout_rows), "evaluate.split": p.evaluate.split}

    def model_metadata(self) -> dict[str, Any]:
        """Written into every direction JSON: the model version the direction belongs to."""
        c = self.codec
        return {"family": self.family, "model_name": self.loaded.name, "model_version": str(self.loaded.version),
                "model_run_id": self.loaded.run_id, "latent_space": c.latent_space, "latent_dim": c.dim,
                "inversion_steps": c.inversion_steps if c.inverts else None}


def open_experiment(family: str, params: Params, root: Path | None, model_uri: str | None) -> Experiment:
    """Check the request and fix the experiment: load the model and the cohort, choose the rows, clear the output
    folder. Raises ValueError naming the problem (unknown family, missing model / data, another volume shape)."""
    from brainlatent.train.device import resolve_device, seed_everything

    root = (root or tracking.project_root()).resolve()
    cfg = params.directions
    params.family(family)  # ConfigError naming an unknown family before any work
    uri = model_ref.model_uri(root, family, model_uri)
    tracking.configure(root)
    device = resolve_device(params.device)
    seed_everything(params.seed)
    loaded = registry.load_model(uri, device)
    data = ProcessedData.open(root / params.data.processed_dir)
    if tuple(loaded.model.volume_shape) != tuple(data.grid.shape):
        raise ValueError(f"{uri} was trained on volumes of shape {tuple(loaded.model.volume_shape)}, but "
                         f"{data.root} holds {tuple(data.grid.shape)}: retrain it on the current data")
    codec = LatentCodec.for_model(loaded.model, cfg.latent_space, cfg.inversion_steps)
    settings = probe_settings(params)

    fit_rows = np.sort(np.concatenate([data.split_indices(s) for s in FIT_SPLITS]))
    heldout_rows = data.split_indices(HELDOUT_SPLIT)
    if not len(heldout_rows):
        log.warning("%s: no %s subjects; headline numbers are cross-validated only", data.root, HELDOUT_SPLIT)
    if params.evaluate.split == HELDOUT_SPLIT:
        log.warning("evaluate.split is %r: the champion decision sees the split the directions hold out, so their "
                    "held-out numbers are not untouched (tag heldout_untouched=false)", HELDOUT_SPLIT)
    subjects = data.subjects
    targets, skipped = feasible_targets(subjects.iloc[fit_rows], settings.n_splits)
    for name, why in skipped.items():
        log.warning("directions: probe %r skipped: %s", name, why)
    size_control_targets = tuple(t for t in ("sex", PLANTED) if t in targets)
    if size_control_targets:
        covariate(subjects, cfg.size_covariate)  # ValueError naming the column before any work

    # The pipeline's model writes the DVC outputs; a version named by hand (model_uri) writes beside them, so the
    # pipeline's results stay those of the model it trained.
    out = root / "directions" / (family if model_uri is None else f"{BY_HAND_DIR}/{loaded.name}-v{loaded.version}")
    if out.exists():
        shutil.rmtree(out)  # our own output folder: no stale directions of a previous run survive
    out.mkdir(parents=True)
    trav_rows = traversal_rows(heldout_rows, len(subjects), cfg.n_traversal_subjects, params.seed)
    return Experiment(family, params, root, uri, model_uri is not None, loaded, data, codec, settings, device,
                      fit_rows, heldout_rows, trav_rows, tuple(targets), skipped, size_control_targets, out)


@dataclass(frozen=True)
class Encoded:
    """Every subject's latent, and how well the traversed subjects' latents decode back."""

    latents: np.ndarray  # (N, D) float64, every subject
    cohort_reconstructions: np.ndarray  # (N, X, Y, Z) decode(latents): the PCA-of-reconstructions baseline
    originals: np.ndarray  # (S, X, Y, Z) the traversed subjects' volumes
    reconstructions: np.ndarray  # (S, X, Y, Z) decode(latents[traversal_rows])
    psnr_db: np.ndarray  # (S,) reconstruction PSNR of the traversed subjects
    size_axis: ScalingAxis | None = None  # the model's latent scaling axis (directions.size_axis: scaling)


def encode(exp: Experiment) -> Encoded:
    """Encode the cohort (GAN families: by inversion) and decode it again: the reconstructions feed the
    PCA-of-reconstructions baseline (what encoding keeps of each label) and the traversals' zero step. Measured
    on the default cohort (BENCHMARKS.md, Run I vs Run H): the AE / VAE's encode step stays under 0.5 s, the
    GAN families' +4-7 s on top of 32-34 s of inversion. The cohort's volumes are in memory anyway for the
    PCA-of-voxels baseline, and these are as many again."""
    latents = exp.codec.encode_volumes(exp.data.volumes)
    cohort_reconstructions = exp.codec.decode_latents(latents, DECODE_BATCH)
    originals = np.asarray(exp.data.volumes[exp.traversal_rows], np.float32)
    reconstructions = cohort_reconstructions[exp.traversal_rows]
    psnr_db = psnr(torch.from_numpy(reconstructions), torch.from_numpy(originals), data_range=1.0).numpy()
    return Encoded(latents, cohort_reconstructions, originals, reconstructions, psnr_db)


def size_axis_rows(fit_rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The fitting subjects the scaling axis is averaged over: ``n`` of them, seeded (all when fewer)."""
    if len(fit_rows) <= n:
        return np.asarray(fit_rows)
    return np.sort(np.random.default_rng(seed).choice(fit_rows, size=n, replace=False))


def encode_size_axis(exp: Experiment) -> ScalingAxis | None:
    """With ``directions.size_axis: scaling`` and a size-controlled target, the model's latent tangent of a
    global rescaling over ``directions.size_axis_subjects`` fitting subjects (sizeaxis.py): 2 encodings each,
    inversions for GAN families (the stage's ``time_size_axis_s``)."""
    cfg = exp.params.directions
    if cfg.size_axis != "scaling" or not exp.size_control_targets:
        return None
    rows = size_axis_rows(exp.fit_rows, cfg.size_axis_subjects, exp.params.seed)
    axis = scaling_axis(lambda v: exp.codec.encode_volumes(v), exp.data.volumes[rows],
                        device=exp.codec.device)
    log.info("size axis: scaling x%.2f over %d fitting subjects, tangent agreement %.3f", axis.factor,
             axis.n_subjects, axis.agreement)
    return axis


def probe(exp: Experiment, encoded: Encoded) -> ProbeSuite:
    """Every feasible target's probes (latent, size-controlled, baselines) fitted with repeated CV on the fitting
    rows and scored once on the held-out rows (``run_probe_suite``)."""
    fit, test = exp.fit_rows, exp.heldout_rows
    has_test = exp.split == "heldout"
    latents, recon = encoded.latents, encoded.cohort_reconstructions
    volumes = np.asarray(exp.data.volumes, np.float32)  # (N, X, Y, Z): the PCA-of-voxels baseline
    subjects = exp.data.subjects
    return run_probe_suite(
        latents[fit], subjects.iloc[fit], exp.settings, volumes=volumes[fit], reconstructions=recon[fit],
        test_latents=latents[test] if has_test else None, test_subjects=subjects.iloc[test] if has_test else None,
        test_volumes=volumes[test] if has_test else None, test_reconstructions=recon[test] if has_test else None,
        targets=exp.targets,
        size_control_targets=exp.size_control_targets, size_covariate=exp.params.directions.size_covariate,
        size_axis=None if encoded.size_axis is None else encoded.size_axis.vector,
    )


def direct(exp: Experiment, suite: ProbeSuite) -> dict[str, Direction]:
    """The suite's directions stamped with the model version they belong to (and their held-out AUC), saved as
    ``directions/<name>.json``."""
    results = {(r.target, r.features): r for r in suite.results}
    for name, d in list(suite.directions.items()):
        heldout = results[(d.metadata["target"], d.metadata["features"])].heldout or {}
        extra = {"heldout_auc": heldout["auc"].value} if "auc" in heldout else {}
        suite.directions[name] = replace(d, metadata={**d.metadata, **exp.model_metadata(), **extra})
    suite.save_directions(exp.out / "directions")
    return suite.directions


def traversal_context(exp: Experiment, encoded: Encoded) -> tuple[TraversalContext, str]:
    """What every direction's traversal shares, and which feature network judges it (``"none (...)"``: why not)."""
    data, cfg = exp.data, exp.params.directions
    planted = load_ground_truth(data.ground_truth_dir, data.grid)
    mask = atlas_on_grid(data.grid).brain > 0.5
    measure, featurenet_id = traversal_measure(exp.params, exp.root, data, planted, mask, exp.device)
    ctx = TraversalContext(encoded.latents[exp.traversal_rows],
                           data.subjects.iloc[exp.traversal_rows].reset_index(drop=True), encoded.reconstructions,
                           symmetric_steps(cfg.max_step_sd, cfg.n_steps), measure, mask, planted, exp.n_reencode,
                           cfg.size_covariate)
    return ctx, featurenet_id


def traverse_and_measure(exp: Experiment, suite: ProbeSuite, ctx: TraversalContext) -> dict[str, DirectionStudy]:
    """Traverse, measure and check every direction (:func:`study_direction`); write its maps and figures."""
    ids = ctx.subjects["subject_id"].astype(str).tolist()
    studies: dict[str, DirectionStudy] = {}
    for name, direction in suite.directions.items():
        fitted = suite.probes[f"{direction.metadata['target']}.{direction.metadata['features']}"]
        studies[name] = study_direction(direction, fitted, exp.codec, ctx)
        write_study(exp.out, name, studies[name], ids, ctx.steps, exp.data.grid, exp.n_strip)
    return studies


def model_checks(encoded: Encoded, ctx: TraversalContext, studies: dict[str, DirectionStudy]) -> dict[str, float]:
    """The counterfactual checks of the model rather than of one direction (``cf_composition_*``)."""
    composition = cf.composition(encoded.originals, encoded.reconstructions, mask=ctx.mask)
    cycles = [st.counterfactual["composition_cycle_mae"] for st in studies.values()
              if "composition_cycle_mae" in st.counterfactual]
    if cycles:  # f(f(x)) vs f(x): the zero step's round trip, the same volumes for every direction
        composition["composition_cycle_mae"] = cycles[0]
    return {f"cf_{k}": v for k, v in composition.items()}


def record(exp: Experiment, run_id: str, suite: ProbeSuite, studies: dict[str, DirectionStudy],
           encoded: Encoded, gt: dict[str, float], model_cf: dict[str, float], timings: dict[str, float]
           ) -> dict[str, float]:
    """Write the tables and the metrics JSON, log metrics and artifacts to the run, tag the model version.
    Returns the headline numbers."""
    headline = headline_metrics(suite, studies, gt, exp.split)
    headline.update(model_cf)
    headline.update({"encode_psnr_db": float(np.mean(encoded.psnr_db)), "n_fit": float(len(exp.fit_rows)),
                     "n_heldout": float(len(exp.heldout_rows)),
                     "n_traversal_subjects": float(len(exp.traversal_rows))})
    headline.update({f"time_{k}": v for k, v in timings.items()})
    if encoded.size_axis is not None:
        headline["size_axis_agreement"] = encoded.size_axis.agreement
        headline["size_axis_subjects"] = float(encoded.size_axis.n_subjects)
        for name, d in suite.directions.items():
            if "size_axis_cos_covariate_axis" in d.metadata:
                headline[f"{name}_size_axis_cos_covariate_axis"] = d.metadata["size_axis_cos_covariate_axis"]
    roc_rows = exp.heldout_rows if exp.split == "heldout" else exp.fit_rows
    _write_tables(exp.out, suite, studies, encoded.latents[roc_rows], exp.data.subjects.iloc[roc_rows], exp.split)
    labels = exp.labels()
    detailed = {**suite.flat_metrics(), **gt, "encode_psnr_db_min": float(np.min(encoded.psnr_db)),
                "encode_psnr_db_max": float(np.max(encoded.psnr_db))}
    for name, study in studies.items():
        detailed.update(study.effects.flat_metrics(f"effects.{name}"))
        detailed.update({f"cf.{name}.{k}": v for k, v in study.counterfactual.items() if not isinstance(v, str)})
        predictor = study.counterfactual.get("effectiveness_predictor")
        if predictor:
            labels[f"cf_{name}_effectiveness_predictor"] = predictor
            mlflow.set_tag(f"cf.{name}.effectiveness_predictor", predictor)
    headline = _finite(headline)
    named = {**headline, **labels, "model_version": int(exp.loaded.version), "model_uri": exp.model_uri}
    metrics_path = exp.out / "metrics.json" if exp.by_hand else exp.root / "metrics" / "directions" / f"{exp.family}.json"
    _write_json(metrics_path, named)
    mlflow.log_metrics({**_finite(detailed), **headline})
    mlflow.log_artifacts(str(exp.out))
    _tag_version(exp.loaded, headline, run_id, labels["heldout_split"])
    return headline


class _Stopwatch:
    """``with clock("encode_s"): ...`` adds the block's wall time to ``clock.timings``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t0


def run_directions(family: str, params: Params, root: Path | None = None, model_uri: str | None = None
                   ) -> DirectionsOutcome:
    """Run the latent-direction experiment for the version ``train@<family>`` registered, or ``model_uri``:
    encode -> probe -> direct -> traverse and measure -> check -> record (the module docstring has the steps).

    Raises ValueError naming the problem for an unknown family, a missing model / alias, missing processed
    data, or a model trained on another volume shape.
    """
    t_start = time.perf_counter()
    exp = open_experiment(family, params, root, model_uri)
    loaded = exp.loaded
    exp_id = tracking.experiment_id(tracking.DIRECTIONS_EXPERIMENT, exp.root)
    run_name = f"{family}-v{loaded.version}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=exp.run_tags())
    try:
        tracking.log_dataset(params.data.processed_dir, "directions", exp.root)  # the runs table's Dataset
        mlflow.log_params(exp.run_params())
        clock = _Stopwatch()
        with clock("encode_s"):
            encoded = encode(exp)
        with clock("size_axis_s"):
            encoded = replace(encoded, size_axis=encode_size_axis(exp))
        with clock("probes_s"):
            suite = probe(exp, encoded)
        direct(exp, suite)
        with clock("traversals_s"):
            ctx, featurenet_id = traversal_context(exp, encoded)
            mlflow.set_tag("effectiveness_featurenet", featurenet_id)
            studies = traverse_and_measure(exp, suite, ctx)
            model_cf = model_checks(encoded, ctx, studies)
        with clock("size_map_s"):  # the "beyond size" reference; only with ground truth
            size_map = size_reference_map(exp, encoded) if ctx.planted else None
        gt = ground_truth_checks(ctx.planted, exp.data.grid, studies, size_map)
        with clock("map_bootstrap_s"):  # directions.map_bootstrap refits (0: off, the default)
            gt.update(size_control_intervals(exp, encoded, suite, ctx, size_map))
        clock.timings["total_s"] = time.perf_counter() - t_start
        headline = record(exp, run.info.run_id, suite, studies, encoded, gt, model_cf, clock.timings)
        log.info("directions %s v%s: %s (%.0f s)", family, loaded.version,
                 ", ".join(f"{k}={headline[k]:.3f}" for k in VERSION_TAG_KEYS if k in headline),
                 clock.timings["total_s"])
        mlflow.end_run()
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    return DirectionsOutcome(family, run.info.run_id, str(loaded.version), headline, exp.out, tracking.run_url(run))


def _write_tables(out: Path, suite: ProbeSuite, studies: dict[str, DirectionStudy], roc_latents: np.ndarray,
                  roc_subjects: pd.DataFrame, split: str) -> None:
    """probes.csv, roc.csv (plot), effects.csv (plot: mean per step), effects_per_subject.csv, effects_summary.csv."""
    suite.table().to_csv(out / "probes.csv", index=False)
    roc_table(suite, roc_latents, roc_subjects, split).to_csv(out / "roc.csv", index=False)
    per_subject, means, summaries = [], [], []
    for name, study in studies.items():
        table = study.effects.per_step.assign(direction=name)
        per_subject.append(table)
        quantities = list(study.effects.summary.index)
        long = table.melt(id_vars=["subject", "step_index", "step_sd", "direction"], value_vars=quantities,
                          var_name="quantity")
        mean = long.groupby(["step_sd", "quantity"], sort=True)["value"].mean().reset_index()
        means.append(mean.rename(columns={"step_sd": "step"}).assign(direction=name))
        summaries.append(study.effects.summary.reset_index().assign(direction=name))
    if studies:
        pd.concat(means)[["step", "quantity", "direction", "value"]].to_csv(out / "effects.csv", index=False)
        pd.concat(per_subject).to_csv(out / "effects_per_subject.csv", index=False)
        pd.concat(summaries).to_csv(out / "effects_summary.csv", index=False)
    else:
        pd.DataFrame(columns=["step", "quantity", "direction", "value"]).to_csv(out / "effects.csv", index=False)


def _tag_version(loaded: registry.LoadedModel, headline: dict[str, float], run_id: str, split: str) -> None:
    """Headline numbers as ``directions.<key>`` tags on the model version (shown by a registry look-up)."""
    client = MlflowClient()
    tags = {f"directions.{k}": f"{headline[k]:.4g}" for k in VERSION_TAG_KEYS if k in headline}
    tags.update({"directions.run_id": run_id, "directions.heldout_split": split})
    for key, value in tags.items():
        client.set_model_version_tag(loaded.name, loaded.version, key, value)
