"""The `featurenet` and `evaluate@<family>` stages: the feature network, then every family's metrics.

``train_featurenet`` trains :class:`~brainlatent.models.featurenet.FeatureNet` on the train split (the val
split picks the epoch), logs it to MLflow (experiment ``brainlatent-featurenet``) and registers it as
``brainlatent-featurenet`` with the same artifact layout as the generative families (``weights.pt`` +
``config.json``, family ``featurenet``); its champion rule is ``kept/sex_auc`` (higher is better). With
``featurenet.backbone: medicalnet`` nothing is trained: the stage records the user's MedicalNet weights file.

``evaluate_family`` loads the version ``train@<family>`` registered (``trained/<family>.json``, see
``model_ref.py``; ``--model-uri`` names another by hand) and the feature extractor, and computes on
``evaluate.split`` (the validation split by default: the champion decision may see it, the test split stays
untouched for the directions' held-out numbers):

* reconstruction (every family): MSE, PSNR (capped at :data:`PSNR_CAP_DB`), 3D SSIM. AE/VAE reconstruct by
  encode/decode; GAN/StyleGAN by inversion with ``evaluate.inversion_steps`` Adam steps;
* generation (families with ``sample()``: vae, gan, stylegan): ``evaluate.n_samples`` seeded samples against
  the real split: FID, KID, RBF-MMD, MS-SSIM diversity, anatomical plausibility and, with FeatureNet, the
  sex / age-group mix the feature net predicts.

Metrics go to an MLflow run (experiment ``brainlatent-evaluate``, tag ``model=<family>``), to the model
version's tags (``eval.<metric>``) and to ``metrics/evaluate/<family>.json`` (with the version's number). Then
the champion decision (``champion.py``) compares the version with the others evaluated under the same protocol
by ``evaluate.champion_metric.<family>`` (docs/metrics.md, "Champion rules").
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from brainlatent import champion, model_ref, registry, tracking
from brainlatent.champion import ChampionDecision
from brainlatent.anatomy import sex_region_of
from brainlatent.config import EvaluateConfig, Params, to_flat_dict
from brainlatent.data.dataset import ProcessedData
from brainlatent.grid import Grid
from brainlatent.metric_groups import grouped
from brainlatent.metrics import anatomical, generative, quality
from brainlatent.metrics.reconstruction import reconstruction_per_volume
from brainlatent.models.base import LatentModel
from brainlatent.models.featurenet import (
    FeatureExtractor,
    FeatureNet,
    encode_age_group,
    encode_sex,
    evaluate_featurenet,
    extract_features,
    fit_featurenet,
    load_medicalnet,
    predict_attributes,
)
from brainlatent.train.device import resolve_device, seed_everything

log = logging.getLogger(__name__)

FEATURENET_FAMILY = "featurenet"
FEATURENET_MODEL = registry.registered_name(FEATURENET_FAMILY)
# PSNR of an exact reconstruction is +inf; a cap keeps the mean finite and every store able to hold it.
PSNR_CAP_DB = 100.0


@dataclass(frozen=True)
class FeatureNetOutcome:
    run_id: str
    backbone: str
    model_version: str | None  # None for MedicalNet (not registered: the user's file is the model)
    champion: bool
    metrics: dict[str, float]
    run_url: str


@dataclass(frozen=True)
class EvalOutcome:
    family: str
    run_id: str
    model_version: str
    metrics: dict[str, float]
    champion: ChampionDecision  # the decision taken after this evaluation
    run_url: str


def _root(root: Path | None) -> Path:
    return (root or tracking.project_root()).resolve()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Strict JSON for DVC: a non-finite number (e.g. a mean ratio over a zero real mean) becomes null."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in obj.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- featurenet stage
def _labels(data: ProcessedData, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(volumes (n, 1, X, Y, Z) float32, sex (n,) 1 = male, age-group index (n,)) of one split."""
    rows = data.subjects.iloc[data.split_indices(split)]
    return data.load_split(split), encode_sex(rows["sex"].tolist()), encode_age_group(rows["age_group"].tolist())


def _medicalnet_path(params: Params, root: Path) -> Path:
    raw = Path(params.featurenet.medicalnet_path or "")
    path = raw if raw.is_absolute() else root / raw
    if not path.is_file():
        raise ValueError(f"featurenet.medicalnet_path: MedicalNet weights file not found: {path}")
    return path


def train_featurenet(params: Params, root: Path | None = None) -> FeatureNetOutcome:
    """Train, log and register the feature network (DVC stage ``featurenet``); writes metrics/featurenet.json.

    FeatureNet: per-epoch ``train/loss`` and ``val/*`` as MLflow metrics (step = epoch), then the validation
    metrics of the kept (lowest val loss) weights: ``kept/loss``, ``kept/sex_auc``, ``kept/sex_acc``,
    ``kept/age_acc``, ``kept/age_mae_groups``, ``kept/epoch``. MedicalNet: loads the weights once (fails early on a bad file)
    and records the file's path and sha256; nothing is trained or registered.
    """
    root = _root(root)
    cfg = params.featurenet
    tracking.configure(root)
    seed_everything(params.seed)
    lineage = tracking.lineage_tags(params.data.processed_dir, root)
    flat = {**to_flat_dict(cfg, "featurenet."), "seed": params.seed, "device": params.device,
            "data.shape": list(params.data.shape), "data.processed_dir": params.data.processed_dir}
    exp_id = tracking.experiment_id(tracking.FEATURENET_EXPERIMENT, root)
    name = f"featurenet-{cfg.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"

    if cfg.backbone == "medicalnet":
        path = _medicalnet_path(params, root)
        net = load_medicalnet(path, cfg.medicalnet_depth)
        sha = _file_sha256(path)
        with mlflow.start_run(experiment_id=exp_id, run_name=name,
                              tags={"model": FEATURENET_FAMILY, "stage": "featurenet", "backbone": "medicalnet",
                                    "medicalnet.sha256": sha, **lineage}) as run:
            mlflow.log_params(flat)
            out = {"backbone": "medicalnet", "medicalnet_depth": cfg.medicalnet_depth,
                   "feature_dim": int(net.backbone.layer4[-1].conv2.out_channels)}
            mlflow.log_metric("feature_dim", out["feature_dim"])
        _write_json(root / "metrics" / "featurenet.json", out)
        return FeatureNetOutcome(run.info.run_id, "medicalnet", None, False, {}, tracking.run_url(run))

    device = resolve_device(params.device)
    data = ProcessedData.open(root / params.data.processed_dir)
    x_tr, s_tr, a_tr = _labels(data, "train")
    x_va, s_va, a_va = _labels(data, "val")
    if len(x_va) == 0:
        raise ValueError(f"{data.root}: the validation split is empty; the feature net needs it to pick its epoch")
    run = mlflow.start_run(experiment_id=exp_id, run_name=name, log_system_metrics=params.train.system_metrics,
                           tags={"model": FEATURENET_FAMILY, "stage": "featurenet", "backbone": "featurenet",
                                 **lineage})
    try:
        mlflow.log_params(flat)
        mlflow.set_tag("device", str(device))
        model, history = fit_featurenet(
            x_tr, s_tr, a_tr, x_va, s_va, a_va, channels=cfg.channels, feature_dim=cfg.feature_dim,
            dropout=cfg.dropout, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size, age_weight=cfg.age_weight, seed=params.seed, augment=cfg.augment,
            device=device,
        )
        # Curves as train/* and val/* (step = epoch); the kept (lowest val loss) epoch's values under kept/*,
        # which MLflow would otherwise hide behind the last epoch's (its "latest" value is the highest step).
        for row in history:
            curves = {k.replace("_", "/", 1): v for k, v in row.items() if k != "epoch"}
            mlflow.log_metrics(curves, step=int(row["epoch"]))
        held_out = evaluate_featurenet(model, x_va, s_va, a_va, device=device, age_weight=cfg.age_weight)
        metrics = grouped("kept", held_out)
        metrics["kept/epoch"] = float(min(history, key=lambda r: r["val_loss"])["epoch"])
        mlflow.log_metrics(metrics)
        version, champion = registry.log_and_register(
            model, FEATURENET_FAMILY, model.config, metrics,
            tags={**lineage, "run_id": run.info.run_id, "backbone": "featurenet"},
            champion_metric=registry.FEATURENET_CHAMPION_METRIC,
        )
        mlflow.set_tag("model_version", version)
        _write_json(root / "metrics" / "featurenet.json", {"backbone": "featurenet", **metrics})
        mlflow.end_run()
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    return FeatureNetOutcome(run.info.run_id, "featurenet", version, champion, metrics, tracking.run_url(run))


# ------------------------------------------------------------------------------------ feature extractor
@dataclass(frozen=True)
class ResolvedExtractor:
    """A feature extractor and where it came from (recorded with every FID it produces)."""

    extractor: FeatureExtractor
    backbone: str
    ident: str  # models:/brainlatent-featurenet/<version>, or medicalnet-<depth>:<sha256 prefix>
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def predicts_attributes(self) -> bool:
        """Only FeatureNet has sex / age heads (attribute metrics)."""
        return isinstance(self.extractor, FeatureNet)


def resolve_feature_extractor(
    params: Params, root: Path | None = None, device: str | torch.device = "cpu"
) -> ResolvedExtractor:
    """The evaluation's feature extractor: ``models:/brainlatent-featurenet@champion`` (``@candidate`` when no
    version has won the rule yet, e.g. a NaN AUC on a one-sex val split), or the MedicalNet weights file.

    FeatureNet is rebuilt from config.json and ``torch.load(weights_only=True)``; it must have been trained on
    volumes of ``data.shape``.
    """
    root = _root(root)
    cfg = params.featurenet
    if cfg.backbone == "medicalnet":
        path = _medicalnet_path(params, root)
        ident = f"medicalnet-{cfg.medicalnet_depth}:{_file_sha256(path)[:16]}"
        net = load_medicalnet(path, cfg.medicalnet_depth).to(device)
        return ResolvedExtractor(net, "medicalnet", ident, {"featurenet.path": str(path)})

    client = MlflowClient()
    mv = None
    for alias in (registry.CHAMPION, registry.CANDIDATE):
        try:
            mv = client.get_model_version_by_alias(FEATURENET_MODEL, alias)
            break
        except mlflow.exceptions.MlflowException:
            continue
    if mv is None:
        raise ValueError(
            f"no registered feature net: {FEATURENET_MODEL} has no 'champion' or 'candidate' version in "
            f"{tracking.redact_url(mlflow.get_tracking_uri())}; run `brainlatent featurenet` first"
        )
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(mlflow.artifacts.download_artifacts(f"models:/{FEATURENET_MODEL}/{mv.version}", dst_path=tmp))
        meta = json.loads((art / "artifacts" / "config.json").read_text())
        state = registry.load_weights(art / "artifacts" / "weights.pt")
    if meta.get("family") != FEATURENET_FAMILY:
        raise ValueError(f"{FEATURENET_MODEL} version {mv.version}: config.json is for {meta.get('family')!r}")
    model = FeatureNet(**meta["config"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{FEATURENET_MODEL} version {mv.version}: weights do not match config.json ({err})") from None
    shape = tuple(params.data.shape)
    if model.volume_shape != shape:
        raise ValueError(
            f"{FEATURENET_MODEL} version {mv.version} was trained on volumes {model.volume_shape} but data.shape is "
            f"{shape}; re-run `brainlatent featurenet`"
        )
    tags = {"featurenet.version": str(mv.version), "featurenet.run_id": mv.run_id or ""}
    sha = (mv.tags or {}).get("data.content_sha256")
    if sha:
        tags["featurenet.data_sha256"] = sha
    return ResolvedExtractor(model.to(device).eval(), "featurenet", f"models:/{FEATURENET_MODEL}/{mv.version}", tags)


# ------------------------------------------------------------------------------------ evaluation parts
@torch.no_grad()
def generate(model: LatentModel, n: int, seed: int, batch_size: int = 8) -> torch.Tensor:
    """``n`` samples (n, 1, X, Y, Z) float32 on the CPU, drawn in batches from one seeded CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    out = [model.sample(min(batch_size, n - i), generator=gen).float().cpu() for i in range(0, n, batch_size)]
    return torch.cat(out)


def reconstruct(
    model: LatentModel, volumes: torch.Tensor, inversion_steps: int, batch_size: int = 8
) -> torch.Tensor:
    """Reconstructions (n, 1, X, Y, Z) float32 on the CPU of ``volumes`` (n, 1, X, Y, Z).

    ``decode(encode(x))`` in the family's default latent space, through the directions' :class:`LatentCodec` (the
    one place that knows how to encode any family): AE/VAE in one pass; families that invert (``model.inverts``;
    GAN: z optimised from zeros, StyleGAN: w in W optimised from w_avg) with ``inversion_steps`` Adam steps;
    ``decode`` clamps to [0, 1] with fixed noise.
    """
    from brainlatent.directions.codec import LatentCodec  # lazy: only reconstruction needs the directions package

    codec = LatentCodec.for_model(model, "w", inversion_steps)
    out = []
    for i in range(0, len(volumes), batch_size):
        z = codec.encode(volumes[i : i + batch_size])
        with torch.no_grad():
            out.append(codec.decode(z).float().cpu())
    return torch.cat(out)


def reconstruction_metrics(reconstructions: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Means over volumes of MSE, PSNR (dB, each volume capped at :data:`PSNR_CAP_DB`) and 3D SSIM."""
    per = reconstruction_per_volume(reconstructions, targets)
    return {
        "mse": float(per["mse"].mean()),
        "psnr": float(np.minimum(per["psnr"], PSNR_CAP_DB).mean()),
        "ssim": float(per["ssim"].mean()),
    }


def anatomy_metrics(
    samples: torch.Tensor, reals: torch.Tensor, grid: Grid, percentiles: tuple[float, float],
    sex_region: str | None = None,
) -> dict[str, float]:
    """Anatomical plausibility (docs/metrics.md) on (N, 1, X, Y, Z) volumes. Both sets are measured with the
    tissue levels of the *real* scans (samples with a wrong contrast must not be measured against their own),
    and the sex-region measure uses the cohort's local sex region. A measure that is constant or not finite
    over the real scans (e.g. a region outside a tiny field of view) cannot normalise the W1 distance and is
    skipped with a warning rather than failing the whole evaluation."""
    from brainlatent.anatomy import DEFAULT_SEX_REGION, estimate_tissue_levels, measure_volumes  # lazy: the template

    real_np = reals[:, 0].numpy()
    levels = estimate_tissue_levels(real_np, grid)
    region = sex_region or DEFAULT_SEX_REGION
    real = measure_volumes(real_np, grid, percentiles, levels=levels, sex_region=region)
    fake = measure_volumes(samples[:, 0].numpy(), grid, percentiles, levels=levels, sex_region=region)
    usable = [c for c in real.columns if np.isfinite(real[c]).sum() >= 2 and np.nanstd(real[c].to_numpy()) > 0]
    skipped = sorted(set(real.columns) - set(usable))
    if skipped:
        log.warning("anatomy: measure(s) %s are constant over the real scans; left out", skipped)
    if not usable:
        return {}
    return anatomical.measure_distances(fake, real, usable)


def generative_metrics(
    samples: torch.Tensor,
    reals: torch.Tensor,
    extractor: ResolvedExtractor,
    grid: Grid,
    cfg: EvaluateConfig,
    seed: int,
    percentiles: tuple[float, float] = (0.5, 99.5),
    device: str | torch.device = "cpu",
    sex_region: str | None = None,
) -> dict[str, float]:
    """FID, KID, RBF-MMD (feature space), MS-SSIM diversity, anatomy and attribute distances of ``samples``
    (N, 1, X, Y, Z) against ``reals`` (M, 1, X, Y, Z)."""
    f_s = extract_features(extractor.extractor, samples, device=device)
    f_r = extract_features(extractor.extractor, reals, device=device)
    subset = min(cfg.kid_subset_size, len(f_s), len(f_r))
    out = {
        **generative.fid(f_s, f_r),
        **generative.kid(f_s, f_r, subset_size=subset, seed=seed),
        **generative.mmd_rbf(f_s, f_r),
        **generative.ms_ssim_diversity(samples, reals, n_pairs=cfg.ms_ssim_pairs, seed=seed),
        **anatomy_metrics(samples, reals, grid, percentiles, sex_region),
    }
    if extractor.predicts_attributes:
        out.update(anatomical.attribute_distances(
            predict_attributes(extractor.extractor, samples, device=device),
            predict_attributes(extractor.extractor, reals, device=device),
        ))
    return out


# The floors every sample-quality number is shown beside (metrics/quality.py): training-split scans in the role of
# samples (what a generator that reproduced real brains would score) and, in evaluate@ae, the autoencoder's
# reconstructions of the same scans. Both are scored against the same reference split as the samples.
FLOOR_REAL = "floor_real."
FLOOR_RECON = "floor_recon."


def floor_scans(data: ProcessedData, n: int, seed: int) -> torch.Tensor:
    """``n`` seeded training-split scans (n, 1, X, Y, Z) float32 (all of them when the split is smaller)."""
    rows = data.split_indices("train")
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(rows, size=min(n, len(rows)), replace=False))
    return torch.from_numpy(np.asarray(data.volumes[picked], np.float32))[:, None]


def quality_gate(metrics: dict[str, float], cfg: EvaluateConfig) -> tuple[bool, str]:
    """Whether samples are brains at all, judged against the real-vs-real floor of the same evaluation.

    Fails when the in-head intensity distribution is more than ``cfg.gate_intensity_ratio`` times further from
    the reals than other real scans are (noise, saturation, wrong contrast), or when the samples cover fewer
    than ``cfg.gate_min_coverage`` of the real scans (blobs far from every brain, one brain repeated).
    Returns (passed, one-line reason with the numbers).
    """
    w1, floor_w1 = metrics["intensity_w1"], metrics[f"{FLOOR_REAL}intensity_w1"]
    ratio = w1 / max(floor_w1, 1e-12)
    problems = []
    if ratio > cfg.gate_intensity_ratio:
        problems.append(f"intensity_w1 {w1:.3g} is {ratio:.0f}x the real-vs-real floor {floor_w1:.3g} "
                        f"(limit {cfg.gate_intensity_ratio:g}x)")
    if metrics["coverage"] < cfg.gate_min_coverage:
        problems.append(f"coverage {metrics['coverage']:.2f} of the real scans (minimum {cfg.gate_min_coverage:g})")
    if problems:
        return False, "; ".join(problems)
    return True, (f"intensity_w1 {ratio:.1f}x the real-vs-real floor (limit {cfg.gate_intensity_ratio:g}x), "
                  f"coverage {metrics['coverage']:.2f} (minimum {cfg.gate_min_coverage:g})")


def evaluation_protocol(params: Params, extractor_ident: str, data_sha256: str) -> str:
    """A short hash of everything that makes two evaluations comparable: the feature extractor, the real
    reference set (split and data content), sample count, metric settings and seed (not the champion metric
    nor the quality gate's limits)."""
    # The champion rule and the gate's limits decide on the numbers; they do not change them.
    settings = {k: v for k, v in to_flat_dict(params.evaluate).items()
                if not k.startswith(("champion_metric.", "gate_"))}
    spec = {"extractor": extractor_ident, "data": data_sha256, "evaluate": settings, "seed": params.seed}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _sample_quality(family: str, model: LatentModel, samples: torch.Tensor | None, reals: torch.Tensor,
                    data: ProcessedData, cfg: EvaluateConfig, seed: int, batch: int,
                    metrics: dict[str, float]) -> tuple[bool, str] | None:
    """Add the sample-quality metrics (metrics/quality.py) and their floors to ``metrics``; return the quality
    gate's (passed, reason) for a family that samples, None otherwise.

    The reference is ``reals`` (the evaluation split). Floors: ``floor_real.*`` (training scans) for every
    family that samples, ``floor_recon.*`` (the autoencoder's reconstructions of the same training scans) in
    evaluate@ae. Skipped, with a warning, when a set is smaller than quality.MIN_VOLUMES (tiny test cohorts).
    """
    if samples is None and family != "ae":
        return None
    floor = floor_scans(data, cfg.n_samples, seed)
    if min(len(reals), len(floor)) < quality.MIN_VOLUMES:
        log.warning("%s: sample-quality metrics skipped: %d evaluation and %d training scans, %d of each needed",
                    family, len(reals), len(floor), quality.MIN_VOLUMES)
        return None
    reference = quality.QualityReference(reals, seed=seed)
    if samples is None:  # the autoencoder: its reconstructions are the floor the samplers are compared with
        recons = reconstruct(model, floor, cfg.inversion_steps, batch)
        metrics.update({f"{FLOOR_RECON}{k}": v for k, v in reference.score(recons, seed=seed).items()})
        return None
    metrics.update({f"{FLOOR_REAL}{k}": v for k, v in reference.score(floor, seed=seed).items()})
    metrics.update(reference.score(samples, seed=seed))
    passed, reason = quality_gate(metrics, cfg)
    if passed:
        log.info("%s: samples pass the quality gate: %s", family, reason)
    else:
        log.warning("%s: THE SAMPLES ARE NOT BRAINS: %s. This version will not take the champion alias.",
                    family, reason)
    return passed, reason


# ------------------------------------------------------------------------------------------ evaluate
def _load_evaluated(uri: str, family: str, data: ProcessedData, device) -> registry.LoadedModel:
    """The model version to evaluate; ValueError unless it is of ``family`` and made for ``data``'s volumes."""
    loaded = registry.load_model(uri, device)
    if loaded.name != registry.registered_name(family):
        raise ValueError(f"{uri} is a version of {loaded.name!r}, not of the {family} family "
                         f"({registry.registered_name(family)!r})")
    if tuple(loaded.model.volume_shape) != tuple(data.grid.shape):
        raise ValueError(
            f"{uri}: trained on volumes {tuple(loaded.model.volume_shape)}, but {data.root} holds {data.grid.shape}"
        )
    return loaded


def _measure(family: str, model: LatentModel, reals: torch.Tensor, data: ProcessedData, params: Params,
             extractor, device, batch: int) -> tuple[dict[str, float], tuple[bool, str] | None]:
    """Reconstruction metrics; for a sampler, the generative and sample-quality metrics and the quality gate.
    Logs the first reals, reconstructions and samples as volumes."""
    cfg = params.evaluate
    recons = reconstruct(model, reals, cfg.inversion_steps, batch)
    metrics = reconstruction_metrics(recons, reals)
    affine = data.grid.affine
    k = min(params.train.n_fixed, len(reals))
    tracking.log_volumes(reals[:k, 0].numpy(), affine, "volumes/reals", [f"real_{i:02d}" for i in range(k)])
    tracking.log_volumes(recons[:k, 0].numpy(), affine, "volumes/reconstructions",
                         [f"reconstruction_{i:02d}" for i in range(k)])
    samples = generate(model, cfg.n_samples, params.seed, batch) if model.generative else None
    if samples is not None:
        metrics.update(generative_metrics(samples, reals, extractor, data.grid, cfg, params.seed,
                                          params.data.intensity_percentiles, device,
                                          sex_region_of(data.ground_truth_dir)))
        k = min(params.train.n_samples, len(samples))
        tracking.log_volumes(samples[:k, 0].numpy(), affine, "volumes/samples",
                             [f"sample_{i:02d}" for i in range(k)])
    gate = _sample_quality(family, model, samples, reals, data, cfg, params.seed, batch, metrics)
    return metrics, gate


def _tag_evaluated_version(loaded: registry.LoadedModel, metrics: dict[str, float], run_id: str, protocol: str,
                           featurenet: str, gate: tuple[bool, str] | None) -> None:
    """``eval.<metric>`` tags, the run, protocol and feature net, and the quality gate on the model version."""
    version_tags = {f"eval.{k}": repr(float(v)) for k, v in metrics.items()}
    version_tags.update({"eval.run_id": run_id, "eval.protocol": protocol, "eval.featurenet": featurenet})
    if gate is not None:
        version_tags.update({champion.GATE_TAG: "pass" if gate[0] else "fail", "eval.quality_gate_reason": gate[1]})
        mlflow.set_tags({"quality_gate": "pass" if gate[0] else "fail", "quality_gate_reason": gate[1]})
    client = MlflowClient()
    for key, value in version_tags.items():
        client.set_model_version_tag(loaded.name, str(loaded.version), key, value)


def evaluate_family(family: str, params: Params, root: Path | None = None, model_uri: str | None = None) -> EvalOutcome:
    """Evaluate the version ``train@<family>`` registered (``trained/<family>.json``; DVC stage
    ``evaluate@<family>``), or ``model_uri`` (any ``models:/`` URI, e.g. an alias, by hand).

    Logs an MLflow run tagged with the model version and the training run it evaluates (``evaluated_run_id``),
    tags the model version ``eval.<metric>``, then takes the champion decision (:mod:`brainlatent.champion`).
    Writes metrics/evaluate/<family>.json (naming the version) for the pipeline's own model only: a version
    named with ``model_uri`` is not what the DVC pipeline trained, so its numbers stay out of the DVC metrics.
    """
    root = _root(root)
    params.family(family)  # unknown family -> ConfigError naming the choices
    cfg = params.evaluate
    uri = model_ref.model_uri(root, family, model_uri)  # before any expensive work: a missing file is an error
    tracking.configure(root)
    seed_everything(params.seed)
    device = resolve_device(params.device)
    data = ProcessedData.open(root / params.data.processed_dir)
    reals = data.load_split(cfg.split)
    if len(reals) < 2:
        raise ValueError(
            f"evaluate.split: the {cfg.split!r} split of {data.root} has {len(reals)} volume(s); need >= 2"
        )

    loaded = _load_evaluated(uri, family, data, device)
    model: LatentModel = loaded.model
    extractor = resolve_feature_extractor(params, root, device)
    lineage = tracking.lineage_tags(params.data.processed_dir, root)
    protocol = evaluation_protocol(params, extractor.ident, lineage["data.content_sha256"])
    if extractor.tags.get("featurenet.data_sha256", lineage["data.content_sha256"]) != lineage["data.content_sha256"]:
        log.warning("the feature net was trained on other data than %s; FIDs are still comparable between "
                    "models evaluated with it, but not with earlier evaluations", params.data.processed_dir)
    batch = params.family(family).batch_size

    exp_id = tracking.experiment_id(tracking.EVAL_EXPERIMENT, root)
    tags = {
        "model": family, "stage": "evaluate", "model_name": loaded.name, "model_version": str(loaded.version),
        "model_uri": f"models:/{loaded.name}/{loaded.version}", "requested_uri": uri,
        "evaluated_run_id": loaded.run_id or "", "eval_protocol": protocol, "split": cfg.split,
        "featurenet.backbone": extractor.backbone, "featurenet.id": extractor.ident,
        "reconstruction": f"inversion ({cfg.inversion_steps} steps)" if model.inverts else "encode/decode",
        **extractor.tags, **lineage,
    }
    run = mlflow.start_run(experiment_id=exp_id, run_name=f"eval-{family}-v{loaded.version}", tags=tags)
    try:
        tracking.log_dataset(params.data.processed_dir, "evaluation", root, lineage)  # the runs table's Dataset
        mlflow.log_params({**to_flat_dict(cfg, "evaluate."), "seed": params.seed, "device": params.device,
                           "n_real": len(reals)})
        metrics, gate = _measure(family, model, reals, data, params, extractor, device, batch)
        mlflow.log_metrics(metrics)
        tracking.log_json(metrics, "metrics.json")

        _tag_evaluated_version(loaded, metrics, run.info.run_id, protocol, extractor.ident, gate)

        decision = champion.decide(family, cfg.champion_metric[family], protocol, str(loaded.version))
        mlflow.set_tags({"champion_version": decision.champion or "none",
                         "champion_changed": str(decision.moved).lower(), "champion.decision": decision.reason})
        log.info("%s v%s: %s", loaded.name, loaded.version, decision.reason)
        if model_uri is None:
            _write_json(root / "metrics" / "evaluate" / f"{family}.json",
                        {**metrics, "model_version": int(loaded.version), "model_uri": tags["model_uri"]})
        else:
            log.info("evaluated %s by hand: metrics/evaluate/%s.json (the pipeline's model) left as it is", uri,
                     family)
        mlflow.end_run()
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    return EvalOutcome(family, run.info.run_id, str(loaded.version), metrics, decision, tracking.run_url(run))

