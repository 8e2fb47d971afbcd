"""The `report` stage: one comparison of every family's evaluated model, built from MLflow.

For each family, the version this pipeline run trained (``trained/<family>.json``) and the latest *finished*
evaluation run of that exact version (experiment ``brainlatent-evaluate``) are read back, so every number in
the report is the one MLflow holds and belongs to the model the pipeline trained; nothing is recomputed. The
models table says which version is each family's champion now. Outputs (DVC out ``report/``):

* ``metrics.md`` and ``index.html`` (self-contained: figures and viewers embedded), in reading order: the
  headline table (:func:`headline_table`), one section per family (:func:`family_section`; in HTML its
  directions' maps as nilearn viewers and glass brains, from ``directions/<family>/maps/``), the planted
  effects of a synthetic cohort (``data/processed/ground_truth/``), then the full tables: metrics (best value
  per rankable column in bold), models (which version and evaluation run each row comes from), the latent
  directions' questions beside their targets (``DIRECTION_CHECKS``). Empty cells say why (:func:`blank_reason`);
  warnings say which rows are not comparable (different feature extractors or protocols);
* ``metrics.csv``: the metrics table at full precision (Markdown and HTML show 6 significant digits);
  ``headline.csv``: the headline table;
* ``samples.png``: real scans then each family's logged samples (reconstructions for the AE), nilearn ortho
  views in world mm; ``maps/<family or planted>/<name>_glass.png``: the glass brains;
* ``metrics.png``: bar plots of the headline metrics.

An MLflow run in ``brainlatent-report`` logs the table as metrics ``<family>.<metric>`` and the files as
artifacts, with the processed cohort as its input dataset. When ``metrics/directions/<family>.json`` exists its numeric values are added as
``directions.<key>`` columns (they come from that file, not from the evaluation runs).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from brainlatent import model_ref, registry, tracking
from brainlatent.config import FAMILIES, Params
from brainlatent.metrics.registry import metric_direction
from brainlatent.grid import Grid
from brainlatent.viz.direction_maps import ReportMap, render_direction_maps, render_planted_maps
from brainlatent.viz.montage import comparison_montage

log = logging.getLogger(__name__)

# The bar plots: one rankable number per question (quality, coverage, diversity, anatomy, attributes, recon).
HEADLINE_METRICS = (
    "c2st_auc", "intensity_w1", "coverage", "fid", "kid_mean", "mmd_rbf", "ms_ssim_diversity_gap", "anat_w1_norm_mean", "frac_male_abs_diff",
    "age_group_tv", "mse", "psnr", "ssim",
)
DIRECTIONS_PREFIX = "directions."
MAPS_DIR = "maps"  # report/maps/<family>/<direction>_glass.png


@dataclass(frozen=True)
class DirectionCheck:
    """One headline number of ``metrics/directions/<family>.json`` and, when it has one, its target."""

    key: str
    question: str
    minimum: float | None = None  # the value must be >= this; None: reported without a target
    families: tuple[str, ...] = ()  # the families the target applies to


# The latent-direction experiment's questions, with the targets of its acceptance on the embedded synthetic
# cohort (docs/directions_method.md, "Ground truth"): AUCs, monotonicity and map fidelity are required of
# the autoencoders, whose latents come from an encoder; the planted sign of the age effect of every family.
_AE_VAE = ("ae", "vae")
DIRECTION_CHECKS = (
    DirectionCheck("sex_auc", "sex: probe AUC on held-out latents", 0.90, _AE_VAE),
    DirectionCheck("sex_brain_mask_volume_auc", "sex: baseline AUC, native brain-mask volume alone"),
    DirectionCheck("sex_size_controlled_auc", "sex at fixed head size (eTIV or the named covariate): test AUC"),
    # Never significantly below chance: a covariate that holds the local effect would reverse the sign.
    DirectionCheck("sex_size_controlled_auc_high", "sex at fixed head size: upper 95% bound, test split", 0.5,
                   FAMILIES),
    DirectionCheck("sex_size_controlled_cv_auc_high", "sex at fixed head size: upper 95% bound, CV (train+val)",
                   0.5, FAMILIES),
    DirectionCheck("age_old_auc", "young/old: probe AUC on held-out latents", 0.85, _AE_VAE),
    DirectionCheck("age_old_pca_voxels_auc", "young/old: baseline AUC, PCA of the voxels"),
    DirectionCheck("age_old_pca_reconstructions_auc", "young/old: AUC of PCA of the model's reconstructions (what "
                   "encoding keeps)"),
    DirectionCheck("age_ventricle_monotonicity", "age direction: ventricle volume rises (mean Spearman)", 0.9,
                   _AE_VAE),
    DirectionCheck("age_ventricle_sign_correct", "age direction: ventricle change has the planted sign (1 = yes)",
                   1.0, FAMILIES),
    DirectionCheck("age_map_r", "age direction: difference map vs planted age effect (r)", 0.5, _AE_VAE),
    DirectionCheck("sex_local_map_r_raw", "sex direction: map vs planted local sex effect (r)"),
    DirectionCheck("sex_local_map_r_size_controlled", "size-controlled sex direction: the same (r)"),
    # Reported without a target: the plain r rewards the global size a direction moves wherever the local effect
    # pushes the brain's outline (docs/directions_method.md); the size-free r below carries the target.
    DirectionCheck("sex_local_size_controlled_better", "size control recovers the local sex effect better (1 = yes)"),
    # The same beyond global size (partial r given the map of a pure rescaling, docs/directions_method.md): a
    # local enlargement also pushes the brain's outline out, which plain r credits to any size component.
    DirectionCheck("sex_local_map_r_global_size", "a pure global rescaling vs the planted local sex map (r)"),
    DirectionCheck("sex_local_map_r_beyond_size_raw", "sex direction: map vs planted local sex effect beyond global "
                   "size (partial r)"),
    DirectionCheck("sex_local_map_r_beyond_size_size_controlled", "size-controlled sex direction: the same (partial r)"),
    DirectionCheck("sex_local_size_controlled_better_beyond_size", "size control recovers the local sex effect better "
                   "beyond global size (1 = yes)"),
    # ...and what that partial r cannot see: the global size a direction moves beyond the local effect.
    DirectionCheck("sex_global_size_r_beyond_local_raw", "sex direction: global size it moves beyond the planted "
                   "local sex effect (partial r with a global rescaling's map)"),
    DirectionCheck("sex_global_size_r_beyond_local_size_controlled", "size-controlled sex direction: global size "
                   "it moves beyond the local effect (partial r)"),
    DirectionCheck("sex_local_size_controlled_less_size", "size control moves less global size beyond the local "
                   "effect (1 = yes)"),
    # Size-free r: the whole map against the part of the local map a global rescaling does not explain, so the
    # global size a direction moves counts against it; with directions.map_bootstrap, the refit interval.
    DirectionCheck("sex_local_map_r_size_free_raw", "sex direction: whole map vs the size-free part of the planted "
                   "local sex effect (r)"),
    DirectionCheck("sex_local_map_r_size_free_size_controlled", "size-controlled sex direction: the same "
                   "(size-free r)"),
    DirectionCheck("sex_local_size_controlled_better_size_free", "size control recovers the size-free local sex "
                   "effect better (1 = yes)", 1.0, _AE_VAE),
    DirectionCheck("sex_local_size_controlled_minus_raw_r_size_free_low", "size-free r, size-controlled minus raw: "
                   "lower 95% bound over probe refits (directions.map_bootstrap)"),
    DirectionCheck("sex_local_size_controlled_minus_raw_r_size_free_high", "size-free r, size-controlled minus "
                   "raw: upper 95% bound over probe refits"),
    DirectionCheck("planted_auc", "positive control: probe AUC of the planted label, test split"),
    DirectionCheck("planted_map_r", "positive control: direction map vs planted effect (r)"),
    DirectionCheck("planted_size_controlled_better", "positive control: size control recovers it better (1 = yes)"),
    DirectionCheck("planted_map_r_beyond_size", "positive control: direction map vs planted effect beyond global size "
                   "(partial r)"),
    DirectionCheck("planted_map_r_beyond_size_size_controlled", "positive control: size-controlled, the same "
                   "(partial r)"),
    DirectionCheck("planted_size_controlled_better_beyond_size", "positive control: size control recovers it better "
                   "beyond global size (1 = yes)"),
    DirectionCheck("planted_size_controlled_less_size", "positive control: size control moves less global size "
                   "beyond the planted effect (1 = yes)"),
    DirectionCheck("planted_map_r_size_free", "positive control: whole map vs the size-free part of the planted "
                   "effect (r)"),
    DirectionCheck("planted_map_r_size_free_size_controlled", "positive control: size-controlled, the same "
                   "(size-free r)"),
    # Counterfactual checks (directions/counterfactual.py): reported, no targets yet.
    DirectionCheck("cf_composition_mae", "counterfactual composition: mean |decode(encode(x)) - x| in the brain"),
    DirectionCheck("cf_age_group_reversibility_ratio", "age direction: reversibility (+d, -d) residual / change"),
    DirectionCheck("cf_age_group_effectiveness", "age direction: effectiveness, signed monotonicity of an "
                   "independent predictor"),
    DirectionCheck("cf_sex_effectiveness", "sex direction: effectiveness (same)"),
    DirectionCheck("cf_sex_size_controlled_effectiveness", "size-controlled sex direction: effectiveness (same)"),
    DirectionCheck("cf_sex_size_controlled_minimality_outside_share", "size-controlled sex direction: share of "
                   "the change outside the planted local region"),
    DirectionCheck("cf_sex_size_controlled_minimality_chance", "the same for a change spread evenly (chance)"),
    DirectionCheck("cf_planted_minimality_outside_share", "positive control: share of the change outside the "
                   "planted region"),
)


@dataclass(frozen=True)
class ReportOutcome:
    run_id: str
    out_dir: Path
    table: pd.DataFrame  # rows = family, columns = metrics; exactly the evaluation runs' values
    models: pd.DataFrame  # rows = family: model version, evaluation run, feature extractor, protocol
    warnings: list[str]
    run_url: str


@dataclass(frozen=True)
class _Row:
    family: str
    version: str
    run: Run


# ------------------------------------------------------------------------------------------ collect
def latest_evaluation(client: MlflowClient, experiment_id: str, family: str, version: str) -> Run | None:
    """The most recent finished evaluation run of ``brainlatent-<family>`` version ``version``, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(f"tags.model = '{family}' AND tags.model_version = '{version}' "
                       "AND attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def _evaluated_rows(root: Path) -> tuple[list[_Row], list[str]]:
    """One row per family whose trained version (``trained/<family>.json``) has a finished evaluation run;
    notes for the others."""
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name(tracking.EVAL_EXPERIMENT)
    rows, notes = [], []
    for family in FAMILIES:
        try:
            ref = model_ref.read_ref(root, family)
        except ValueError as err:
            notes.append(f"{family}: {err}")
            continue
        run = latest_evaluation(client, exp.experiment_id, family, ref.version) if exp is not None else None
        if run is None:
            notes.append(f"{family}: {ref.name} v{ref.version} has no finished evaluation run; "
                         f"run `brainlatent evaluate --model {family}`")
            continue
        rows.append(_Row(family, ref.version, run))
    return rows, notes


def _champion_version(family: str) -> str:
    try:
        return str(MlflowClient().get_model_version_by_alias(registry.registered_name(family), registry.CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        return "none"


def _flat_numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON object as ``{"a.b": value}`` (booleans and strings are left out)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(_flat_numbers(value, f"{prefix}{key}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = float(obj)
    return out


def directions_columns(root: Path, family: str) -> dict[str, float]:
    """Headline numbers of ``metrics/directions/<family>.json`` (if present) as ``directions.<key>``."""
    path = root / "metrics" / "directions" / f"{family}.json"
    if not path.is_file():
        return {}
    try:
        values = _flat_numbers(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    return {f"{DIRECTIONS_PREFIX}{k}": v for k, v in values.items()}


def directions_summary(table: pd.DataFrame) -> pd.DataFrame | None:
    """Rows = the ``DIRECTION_CHECKS`` questions present in ``table`` (rows = family, ``directions.<key>``
    columns), columns = ``target`` and one per family: the value, marked pass / FAIL where a target applies.
    None when no family has directions numbers."""
    rows = {}
    for check in DIRECTION_CHECKS:
        column = f"{DIRECTIONS_PREFIX}{check.key}"
        if column not in table.columns or not table[column].notna().any():
            continue
        target = ""
        if check.minimum is not None:
            target = f">= {check.minimum:g} ({', '.join(f for f in check.families if f in table.index) or 'none here'})"
        cells = {}
        for family, value in table[column].items():
            text = "" if pd.isna(value) else f"{value:.3g}"  # a summary: the full table keeps 6 digits
            if text and check.minimum is not None and family in check.families:
                text += " pass" if value >= check.minimum else " FAIL"
            cells[family] = text
        rows[check.question] = {"target": target, **cells}
    if not rows:
        return None
    summary = pd.DataFrame(rows).T
    summary.index.name = "question"
    return summary


def _with_floor(value: float | None, *floors: tuple[str, float | None]) -> str:
    """``0.0074 (real 0.0049; AE 0.0056)``: a number beside its floors, 3 significant digits."""
    if value is None or pd.isna(value):
        return ""
    shown = [f"{name} {v:.3g}" for name, v in floors if v is not None and not pd.isna(v)]
    return f"{value:.3g}" + (f" ({'; '.join(shown)})" if shown else "")


# The headline's direction columns: (label, directions key, ((baseline name, its key), ...)).
_HEADLINE_DIRECTIONS = (
    ("sex AUC, test (brain-mask volume alone)", "sex_auc", (("baseline", "sex_brain_mask_volume_auc"),)),
    ("sex AUC at fixed head size, test", "sex_size_controlled_auc", ()),
    ("young/old AUC, test (PCA of voxels; of the reconstructions)", "age_old_auc",
     (("voxels", "age_old_pca_voxels_auc"), ("reconstructions", "age_old_pca_reconstructions_auc"))),
    ("age map vs planted (r)", "age_map_r", ()),
)
# A latent probe this far below the PCA-of-voxels baseline gets a reason in the report (below_baseline_reason).
BELOW_BASELINE_MARGIN = 0.05


def below_baseline_reason(target: str, values: dict[str, float]) -> str | None:
    """Why ``target``'s probe on the latents is below the PCA-of-voxels baseline, in numbers, or None when it
    is not (or the numbers are missing). ``values``: a family's ``metrics/directions`` headline numbers.

    The PCA of the model's reconstructions splits the loss in two: below the voxels, the encoding (a GAN's
    inversion) loses the label; near the voxels, the reconstructions keep it but the latents do not hold it
    linearly, so a linear probe cannot read it."""
    latent, voxels = values.get(f"{target}_auc"), values.get(f"{target}_pca_voxels_auc")
    recon, psnr_db = values.get(f"{target}_pca_reconstructions_auc"), values.get("encode_psnr_db")
    if latent is None or voxels is None or pd.isna(latent) or pd.isna(voxels) or latent >= voxels - BELOW_BASELINE_MARGIN:
        return None
    head = f"latents {latent:.2f} < PCA of the voxels {voxels:.2f}"
    fidelity = f" (encode PSNR {psnr_db:.1f} dB)" if psnr_db is not None and not pd.isna(psnr_db) else ""
    if recon is None or pd.isna(recon):
        return head + fidelity
    if recon < voxels - BELOW_BASELINE_MARGIN:
        return f"{head}: the encoding loses it, PCA of the reconstructions reaches {recon:.2f}{fidelity}"
    return (f"{head}: the reconstructions keep it (PCA of them {recon:.2f}), the latents do not hold it linearly"
            f"{fidelity}")


def headline_table(table: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """The first table of the report: per family, does it make brains (the quality gate, then the sample-quality
    numbers beside the real-vs-real floor and the AE's reconstructions) and what the directions found (held-out
    AUCs beside their baselines). A blank a reader could misread says why it is blank."""
    def get(family: str, key: str) -> float | None:
        return table.at[family, key] if key in table.columns and pd.notna(table.at[family, key]) else None

    recon = {k: get("ae", f"floor_recon.{k}") if "ae" in table.index else None
             for k in ("c2st_auc", "intensity_w1", "coverage")}
    rows = {}
    for family in table.index:
        samples = bool(models.at[family, "has_samples"])
        gate = models.at[family, "quality_gate"]
        if not samples:
            verdict = "not a sampler (its reconstructions are the AE floor)" if family == "ae" else "not a sampler"
        elif gate == "fail":
            verdict = f"NO: {models.at[family, 'quality_gate_reason']}"
        elif gate == "pass":
            verdict = "yes (quality gate passed)"
        else:
            verdict = "not judged (too few evaluation scans for the quality metrics)"
        w1, ae_w1 = get(family, "intensity_w1"), recon["intensity_w1"]
        row = {"makes brains?": verdict}
        for key, label in (("c2st_auc", "C2ST AUC ↓ (0.5 = real)"), ("intensity_w1", "intensity W1 ↓"),
                           ("coverage", "coverage ↑")):
            if samples:
                row[label] = _with_floor(get(family, key), ("real", get(family, f"floor_real.{key}")),
                                         ("AE", recon[key])) or "(not measured: too few evaluation scans)"
            else:
                row[label] = (_with_floor(recon[key]) + " (reconstructions)" if family == "ae" and recon[key] is not None
                              else "(not a sampler)")
        if not samples:
            row["W1 / AE floor"] = row["FID ↓"] = "(not a sampler)"
        else:
            row["W1 / AE floor"] = f"{w1 / ae_w1:.1f}x" if w1 is not None and ae_w1 else "(no AE floor measured)"
            row["FID ↓"] = _with_floor(get(family, "fid")) or "(not measured)"
        d = DIRECTIONS_PREFIX
        has_directions = any(k.startswith(d) and pd.notna(v) for k, v in table.loc[family].items())
        for label, key, baselines in _HEADLINE_DIRECTIONS:
            shown = _with_floor(get(family, d + key), *[(name, get(family, d + b)) for name, b in baselines])
            row[label] = shown or ("(not measured: the cohort or split lacks it)" if has_directions
                                   else "(no directions run)")
        rows[family] = row
    out = pd.DataFrame(rows).T
    out.index.name = "family"
    return out


def comparability_warnings(models: pd.DataFrame) -> list[str]:
    """Why some rows of the table cannot be compared: ``models`` (rows = family) needs the columns
    ``featurenet`` (extractor id), ``protocol`` (evaluation protocol hash) and ``has_samples`` (bool)."""
    out = []
    generative = models[models["has_samples"].astype(bool)]
    if generative["featurenet"].nunique() > 1:
        out.append("FID / KID / MMD of these rows come from different feature extractors and are NOT comparable: "
                   + ", ".join(f"{f}: {v}" for f, v in generative["featurenet"].items())
                   + " (re-run `brainlatent evaluate` for every family)")
    if models["protocol"].nunique() > 1:
        out.append("rows were evaluated under different protocols (split, sample count, data or settings): "
                   + ", ".join(f"{f}: {v}" for f, v in models["protocol"].items()))
    return out


# ------------------------------------------------------------------------------------------- figures
def _load_logged_volumes(run_id: str, artifact_path: str, limit: int) -> list[nib.Nifti1Image] | None:
    """Up to ``limit`` NIfTI volumes an evaluation run logged under ``artifact_path`` (sorted by name), read into
    memory with their affine; None when the run has none."""
    if not any(a.path.endswith(".nii.gz") for a in MlflowClient().list_artifacts(run_id, artifact_path)):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp))
        files = sorted(local.glob("*.nii.gz"))[:limit]
        return [nib.Nifti1Image(np.asarray(img.get_fdata(dtype=np.float32)), img.affine)
                for img in map(nib.load, files)]


def samples_figure(rows: list[_Row], n: int, path: Path) -> Path:
    """Real scans, then each family's logged samples (reconstructions for the AE), side by side: ``n`` rows
    of nilearn ortho views (world mm, L/R) per column group. Returns ``path`` (PNG)."""
    groups: list[tuple[str, list[nib.Nifti1Image]]] = []
    for row in rows:
        reals = _load_logged_volumes(row.run.info.run_id, "volumes/reals", n)
        if reals is not None:
            groups.append(("real scans", reals))
            break
    for row in rows:
        for artifact, what in (("volumes/samples", "samples"), ("volumes/reconstructions", "reconstructions")):
            got = _load_logged_volumes(row.run.info.run_id, artifact, n)
            if got is not None:
                groups.append((f"{row.family} v{row.version}: {what}", got))
                break
    if not groups:
        raise ValueError("report: the evaluation runs logged no volumes (volumes/samples, volumes/reconstructions)")
    comparison_montage(groups, path)
    return path


def mean_processed_volume(root: Path, processed_dir: str) -> np.ndarray | None:
    """The cohort's mean processed scan (X, Y, Z) on the processed grid: the maps' background. None when the
    processed data is not there (a report built elsewhere than the pipeline ran)."""
    path = root / processed_dir / "volumes.npy"
    if not path.is_file():
        log.info("report: %s not found; direction maps are shown without background", path)
        return None
    volumes = np.load(path, mmap_mode="r")
    return np.asarray(volumes.mean(axis=0, dtype=np.float64), np.float32)


def direction_maps(root: Path, families: list[str], processed_dir: str, out_dir: Path) -> dict[str, list[ReportMap]]:
    """Glass brains and viewers of each family's direction maps (``directions/<family>/maps/``) under
    ``out_dir`` (emptied first: no map of an earlier run survives)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    background = None
    maps = {}
    for family in families:
        folder = root / "directions" / family
        if not (folder / "maps").is_dir():
            continue
        if background is None:
            background = mean_processed_volume(root, processed_dir)
        maps[family] = render_direction_maps(family, folder, out_dir, background)
    return maps


def planted_maps(root: Path, processed_dir: str, out_dir: Path) -> list[ReportMap]:
    """Glass brains and viewers of the cohort's planted effects (none for a real cohort). Call after
    :func:`direction_maps`, which empties ``out_dir``."""
    processed = root / processed_dir
    if not (processed / "ground_truth").is_dir():
        return []
    grid = Grid.load(processed / "grid.json")
    return render_planted_maps(processed / "ground_truth", grid, out_dir, mean_processed_volume(root, processed_dir))


def _direction(key: str) -> str | None:
    try:
        return metric_direction(key)
    except ValueError:
        return None


def metrics_figure(table: pd.DataFrame, path: Path) -> Path:
    """One bar plot per headline metric present in ``table`` (rows = family). Returns ``path`` (PNG)."""
    keys = [k for k in HEADLINE_METRICS if k in table.columns and table[k].notna().any()]
    ncols = min(4, max(1, len(keys)))
    nrows = max(1, math.ceil(len(keys) / ncols))
    fig = Figure(figsize=(3.2 * ncols, 2.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors = matplotlib.colormaps["tab10"]
    for ax, key in zip(axes, keys):
        values = table[key].dropna()
        ax.bar(values.index, values.to_numpy(), color=[colors(FAMILIES.index(f) % 10) for f in values.index])
        better = {"min": "lower", "max": "higher"}[metric_direction(key)]
        ax.set_title(f"{key} ({better} is better)", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# -------------------------------------------------------------------------------------- table render
def format_value(value: float) -> str:
    """How a number is shown in Markdown / HTML: 6 significant digits (metrics.csv keeps every digit)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6g}"


def _best(table: pd.DataFrame) -> dict[str, str]:
    """Column -> family holding its best value (rankable columns with at least two values)."""
    out = {}
    for col in table.columns:
        direction, values = _direction(col), table[col].dropna()
        if direction and len(values) >= 2:
            out[col] = values.idxmin() if direction == "min" else values.idxmax()
    return out


def _header(col: str) -> str:
    direction = _direction(col)
    return f"{col} {'↓' if direction == 'min' else '↑'}" if direction else col


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    """Lines of a plain Markdown table of ``frame``: its index (named by ``frame.index.name``) first."""
    lines = [f"| {frame.index.name} | " + " | ".join(map(str, frame.columns)) + " |",
             "|---|" + "---|" * len(frame.columns)]
    return lines + [f"| {i} | " + " | ".join(str(v) for v in row.to_numpy()) + " |" for i, row in frame.iterrows()]


def _html_table(frame: pd.DataFrame) -> str:
    """A plain, scrollable HTML table of ``frame``: its index (named by ``frame.index.name``) first."""
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in frame.columns)
    body = "".join(
        f"<tr><th>{esc(str(i))}</th>" + "".join(f"<td>{esc(str(v))}</td>" for v in row.to_numpy()) + "</tr>\n"
        for i, row in frame.iterrows()
    )
    return f"<div class=scroll><table><tr><th>{esc(str(frame.index.name))}</th>{head}</tr>\n{body}</table></div>"


@dataclass(frozen=True)
class ReportContent:
    """Everything the two renderings (:func:`to_markdown`, :func:`to_html`) show, in reading order."""

    top: pd.DataFrame | None  # :func:`headline_table`
    sections: dict[str, pd.DataFrame]  # family -> :func:`family_section`
    maps: dict[str, list[ReportMap]]  # family -> its directions' maps (glass brain + viewer)
    planted: list[ReportMap]  # the synthetic cohort's planted effects (empty for a real cohort)
    table: pd.DataFrame  # the full metrics table (rows = family)
    models: pd.DataFrame  # rows = family; ``has_samples`` and ``quality_gate_reason`` are used, not shown
    summary: pd.DataFrame | None  # :func:`directions_summary`
    notes: list[str]
    warnings: list[str]
    figures: dict[str, Path]


def blank_reason(family: str, column: str, models: pd.DataFrame, table: pd.DataFrame) -> str:
    """Why ``table`` has no value for ``family`` in ``column``: what an empty cell shows instead."""
    if column.startswith(DIRECTIONS_PREFIX):
        has_directions = any(c.startswith(DIRECTIONS_PREFIX) and pd.notna(v) for c, v in table.loc[family].items())
        return "not measured by its directions run" if has_directions else "no directions run"
    if "has_samples" in models.columns and not bool(models.at[family, "has_samples"]):
        return "not a sampler"
    return "not measured for this family"


def _cell(value: Any, reason: str) -> str:
    text = format_value(value)
    return text if text else f"({reason})"


def family_section(family: str, table: pd.DataFrame, models: pd.DataFrame, summary: pd.DataFrame | None
                   ) -> pd.DataFrame:
    """One family's numbers as a short vertical table: rows = the headline metrics it has (each beside its
    floors) and the latent-direction questions (beside their targets); columns ``value`` and ``reference``."""
    rows: dict[str, dict[str, str]] = {}
    blank: dict[str, list[str]] = {}  # reason -> the metrics it leaves out: one row, not one per metric
    for key in HEADLINE_METRICS:
        if key not in table.columns or not table[key].notna().any():
            continue
        floors = [(label, table.at[family, f"{prefix}.{key}"]) for label, prefix in
                  (("real", "floor_real"), ("AE", "floor_recon")) if f"{prefix}.{key}" in table.columns]
        shown = "; ".join(f"{label} floor {format_value(v)}" for label, v in floors if pd.notna(v))
        reason = blank_reason(family, key, models, table)
        if pd.isna(table.at[family, key]) and not shown:
            blank.setdefault(reason, []).append(key)
            continue
        rows[_header(key)] = {"value": _cell(table.at[family, key], reason), "reference": shown}
    for reason, keys in blank.items():
        rows[", ".join(keys)] = {"value": f"({reason})", "reference": ""}
    if summary is not None and family in summary.columns:
        for question, row in summary.iterrows():
            reason = blank_reason(family, DIRECTIONS_PREFIX, models, table)
            rows[f"directions: {question}"] = {"value": row[family] or f"({reason})", "reference": row["target"]}
    values = {c.removeprefix(DIRECTIONS_PREFIX): v for c, v in table.loc[family].items()
              if c.startswith(DIRECTIONS_PREFIX)}
    for target in ("age_old", "sex"):
        why = below_baseline_reason(target, values)
        if why:
            rows[f"directions: why {target} is below the PCA-of-voxels baseline"] = {"value": why, "reference": ""}
    out = pd.DataFrame(rows).T if rows else pd.DataFrame(columns=["value", "reference"])
    out.index.name = "quantity"
    return out


def _full_table(table: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """The full metrics table as shown: 6 significant digits, empty cells saying why."""
    shown = pd.DataFrame({_header(c): [_cell(table.at[f, c], blank_reason(f, c, models, table)) for f in table.index]
                          for c in table.columns}, index=table.index)
    shown.index.name = "family"
    return shown


def to_markdown(content: ReportContent) -> str:
    """metrics.md: headline, one section per family, then the full tables (best values in bold)."""
    c = content
    lines = ["# Model comparison", ""]
    lines += [f"> **Warning:** {w}" for w in c.warnings] + ([""] if c.warnings else [])
    if c.top is not None:
        lines += ["## Headline", "", _HEADLINE_NOTE, "", *_markdown_table(c.top), ""]
    for family, section in c.sections.items():
        lines += [f"## {family}: {_family_title(family, c.models)}", "", *_markdown_table(section), ""]
        lines += [f"![{m.family} {m.name}]({MAPS_DIR}/{m.family}/{m.glass_png.name})"
                  for m in c.maps.get(family, [])]
        lines += [""] if c.maps.get(family) else []
    if c.planted:
        lines += ["## Planted effects (ground truth)", "", _PLANTED_NOTE, ""]
        lines += [f"![planted {m.name}]({MAPS_DIR}/planted/{m.glass_png.name})" for m in c.planted] + [""]
    best = _best(c.table)
    full = _full_table(c.table, c.models)
    for col, family in best.items():
        full.at[family, _header(col)] = f"**{full.at[family, _header(col)]}**"
    lines += ["## Metrics (full table)", "", _METRICS_NOTE, "", *_markdown_table(full)]
    lines += ["", "## Models", "", *_markdown_table(shown_models(c.models))]
    if c.summary is not None:
        lines += ["", "## Latent directions (all families)", "", _DIRECTIONS_NOTE, "", *_markdown_table(c.summary)]
    lines += ["", "![samples](samples.png)", "", "![metrics](metrics.png)", ""]
    if c.notes:
        lines += ["## Not included", ""] + [f"- {n}" for n in c.notes] + [""]
    return "\n".join(lines)


def shown_models(models: pd.DataFrame) -> pd.DataFrame:
    """The models table as the report shows it (without the columns only its other tables use)."""
    return models.drop(columns=["has_samples", "quality_gate_reason"], errors="ignore")


def _family_title(family: str, models: pd.DataFrame) -> str:
    version = models.at[family, "model_version"] if "model_version" in models.columns else "?"
    return f"{registry.registered_name(family)} v{version}"


_HEADLINE_NOTE = ("Does each family make brains, and what did its latent directions find? Sample quality "
                  "(metrics/quality.py) on the evaluation split, each number beside its floors: `real` = other real "
                  "scans in the role of samples, `AE` = the autoencoder's reconstructions of them (docs/metrics.md). "
                  "Direction AUCs on the untouched test split beside their baselines.")
_METRICS_NOTE = ("Rows: families; columns: metrics (↓ lower is better, ↑ higher; best in bold). Values are the "
                 "evaluation runs' MLflow metrics at 6 significant digits (full precision: `metrics.csv`); an empty "
                 "cell says why in brackets. Reconstruction metrics (mse, psnr, ssim) of the GAN families come from "
                 "latent inversion (the `reconstruction` tag of each evaluation run); PSNR is capped at 100 dB.")
_DIRECTIONS_NOTE = ("From `metrics/directions/<family>.json` (held out: the test split, which no model selection "
                    "sees; CV: train + val; docs/directions_method.md). "
                    "Targets are the checks on the embedded synthetic cohort; ground-truth rows appear only "
                    "where the cohort has planted effects.")
_MAPS_NOTE = ("Each direction's group difference map (last minus first traversal step, mean over the held-out "
              "subjects; `directions/<family>/maps/`), thresholded at 5% of its colour range: nilearn's viewer over the cohort's mean processed scan "
              "(click to move the cuts; works offline), then a glass brain.")


_PLANTED_NOTE = ("What the synthetic cohort's recipe planted (`data/processed/ground_truth/`), on the processed grid "
                 "as the directions stage compares it: a direction found the planted effect when its map above looks "
                 "like these (the `map_r` numbers measure it).")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_maps(maps: list[ReportMap], heading: str = "<h3>Direction maps</h3>") -> str:
    if not maps:
        return ""
    esc = html.escape
    blocks = "".join(
        f'<div class=direction-map><h4>{esc(m.name)}</h4>{m.viewer}<br><img src="{_data_uri(m.glass_png)}" '
        f'alt="{esc(m.family)} {esc(m.name)} glass brain"></div>'
        for m in maps
    )
    return f"{heading}<p>{esc(_MAPS_NOTE)}</p>{blocks}" if heading else blocks


def to_html(content: ReportContent) -> str:
    """index.html, self-contained (figures as data URIs, viewers inlined; each figure also links to its file):
    the same reading order as :func:`to_markdown`."""
    c, esc = content, html.escape
    best = _best(c.table)
    full = _full_table(c.table, c.models)
    head = "".join(f"<th>{esc(col)}</th>" for col in full.columns)
    body = ""
    for family, row in full.iterrows():
        cells = "".join(f"<td{' class=best' if best.get(col) == family else ''}>{esc(row[_header(col)])}</td>"
                        for col in c.table.columns)
        body += f"<tr><th>{esc(str(family))}</th>{cells}</tr>\n"
    warn = "".join(f"<p class=warn><b>Warning:</b> {esc(w)}</p>" for w in c.warnings)
    headline = "" if c.top is None else f"<h2>Headline</h2><p>{esc(_HEADLINE_NOTE)}</p>{_html_table(c.top)}"
    sections = "".join(
        f"<section id=family-{esc(family)}><h2>{esc(family)}: {esc(_family_title(family, c.models))}</h2>"
        f"{_html_table(section)}{_html_maps(c.maps.get(family, []))}</section>"
        for family, section in c.sections.items()
    )
    planted = "" if not c.planted else (
        f"<h2>Planted effects (ground truth)</h2><p>{esc(_PLANTED_NOTE)}</p>{_html_maps(c.planted, heading='')}")
    directions = "" if c.summary is None else (
        f"<h2>Latent directions (all families)</h2><p>{esc(_DIRECTIONS_NOTE)}</p>{_html_table(c.summary)}")
    note = ("<h2>Not included</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in c.notes) + "</ul>") if c.notes else ""
    figs = "".join(
        f'<h2>{esc(title)}</h2><a href="{esc(p.name)}"><img src="{_data_uri(p)}" alt="{esc(title)}"></a>'
        for title, p in c.figures.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>brainlatent: model comparison</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; font-size: 0.85em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; }} td {{ text-align: right; }}
td.best {{ font-weight: bold; background: #e8f5e9; }} .scroll {{ overflow-x: auto; }}
.warn {{ color: #b71c1c; }} img {{ max-width: 100%; }} .direction-map {{ margin-bottom: 1.5em; }}
</style></head><body>
<h1>Model comparison</h1>{warn}{headline}
{sections}{planted}
<h2>Metrics (full table)</h2>
<p>{esc(_METRICS_NOTE)} Full precision: <a href="metrics.csv">metrics.csv</a>.</p>
<div class=scroll><table><tr><th>family</th>{head}</tr>
{body}</table></div>
<h2>Models</h2>{_html_table(shown_models(c.models))}
{directions}
{figs}{note}
</body></html>
"""


# ---------------------------------------------------------------------------------------------- stage
def build_report(params: Params, root: Path | None = None) -> ReportOutcome:
    """Build report/ from the evaluation runs of the versions this pipeline trained and log it to MLflow (DVC
    stage ``report``). ValueError when no family has an evaluated version."""
    root = (root or tracking.project_root()).resolve()
    tracking.configure(root)
    rows, notes = _evaluated_rows(root)
    if not rows:
        raise ValueError("report: no family has an evaluated trained version; run `dvc repro` (or `brainlatent "
                         "train` and `brainlatent evaluate`) first\n  " + "\n  ".join(notes))
    table = pd.DataFrame({r.family: dict(r.run.data.metrics) for r in rows}).T
    headline = [k for k in HEADLINE_METRICS if k in table.columns]
    table = table[headline + sorted(set(table.columns) - set(headline))]
    directions = pd.DataFrame({r.family: directions_columns(root, r.family) for r in rows}).T
    if not directions.empty:
        table = table.join(directions[sorted(directions.columns)])
    table.index.name = "family"
    models = pd.DataFrame({
        r.family: {
            "model_version": r.version,
            "champion_now": _champion_version(r.family),
            "champion_decision": r.run.data.tags.get("champion.decision", ""),
            "evaluation_run": r.run.info.run_id,
            "trained_run": r.run.data.tags.get("evaluated_run_id", ""),
            "reconstruction": r.run.data.tags.get("reconstruction", ""),
            "featurenet": r.run.data.tags.get("featurenet.id", ""),
            "protocol": r.run.data.tags.get("eval_protocol", ""),
            "has_samples": any(k == "fid" for k in r.run.data.metrics),
            "quality_gate": r.run.data.tags.get("quality_gate", ""),
            "quality_gate_reason": r.run.data.tags.get("quality_gate_reason", ""),
        }
        for r in rows
    }).T
    models.index.name = "family"
    warnings = comparability_warnings(models)
    for w in warnings:
        log.warning("report: %s", w)

    out_dir = root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "metrics.csv")  # repr of each float: round-trips exactly
    figures = {
        "Samples (nilearn ortho views, world mm)": samples_figure(rows, params.train.n_samples, out_dir / "samples.png"),
        "Headline metrics": metrics_figure(table, out_dir / "metrics.png"),
    }
    top = headline_table(table, models)
    top.to_csv(out_dir / "headline.csv")
    for family, verdict in top["makes brains?"].items():
        if verdict.startswith("NO"):
            log.warning("report: %s DOES NOT GENERATE BRAINS: %s", family, verdict)
    summary = directions_summary(table)
    content = ReportContent(
        top=top, sections={f: family_section(f, table, models, summary) for f in table.index},
        maps=direction_maps(root, list(table.index), params.data.processed_dir, out_dir / MAPS_DIR),
        planted=planted_maps(root, params.data.processed_dir, out_dir / MAPS_DIR),
        table=table, models=models, summary=summary, notes=notes, warnings=warnings, figures=figures,
    )
    (out_dir / "metrics.md").write_text(to_markdown(content))
    (out_dir / "index.html").write_text(to_html(content))

    exp_id = tracking.experiment_id(tracking.REPORT_EXPERIMENT, root)
    lineage = tracking.lineage_tags(params.data.processed_dir, root)
    with mlflow.start_run(experiment_id=exp_id, run_name=f"report-{time.strftime('%Y%m%d-%H%M%S')}",
                          tags={"stage": "report", **lineage}) as run:
        tracking.log_dataset(params.data.processed_dir, "report", root, lineage)
        mlflow.log_param("families", ",".join(r.family for r in rows))
        mlflow.set_tags({f"eval_run.{r.family}": r.run.info.run_id for r in rows})
        mlflow.set_tags({f"model_version.{r.family}": r.version for r in rows})
        mlflow.log_metrics({
            f"{family}.{key}": float(value)
            for family, row in table.iterrows() for key, value in row.items() if pd.notna(value)
        })
        mlflow.log_artifacts(str(out_dir), artifact_path="report")
    return ReportOutcome(run.info.run_id, out_dir, table, shown_models(models), warnings, tracking.run_url(run))
