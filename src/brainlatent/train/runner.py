"""`brainlatent train --model <family>`: data + MLflow run + loop + registry, for any family.

One MLflow run per training (experiment ``brainlatent-train``, tag ``model=<family>``). ``resume=True`` picks
up an unfinished checkpoint of the *same* configuration and data and continues in the same MLflow run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from brainlatent import registry, tracking
from brainlatent.config import Params, to_flat_dict
from brainlatent.data.dataset import ProcessedData
from brainlatent.train.device import resolve_device, seed_everything
from brainlatent.train.loop import LoopConfig, Task, resumable_checkpoint, run_loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    family: str
    run_id: str
    finished: bool
    metrics: dict[str, float]
    model_version: str | None
    champion: bool
    resumed_from: int | None
    run_url: str


def make_task(family: str, params: Params, volume_shape, device) -> Task:
    cfg, t = params.family(family), params.train
    if family in ("ae", "vae"):
        from brainlatent.train.reconstruction import ReconstructionTask

        return ReconstructionTask(family, cfg, volume_shape, device, t.bf16, t.channels_last)
    from brainlatent.train.adversarial import make_adversarial_task

    return make_adversarial_task(family, cfg, volume_shape, device, t.bf16, t.channels_last)


def run_params(family: str, params: Params) -> dict[str, Any]:
    """Everything that defines this training run, flattened for MLflow (``vae.lr``, ``data.shape``...)."""
    flat = to_flat_dict(params.family(family), prefix=f"{family}.")
    flat.update(to_flat_dict(params.train, prefix="train."))
    flat.update(to_flat_dict(params.data, prefix="data."))
    flat.update({"seed": params.seed, "device": params.device, "model": family})
    return flat


def _write_outputs(root: Path, family: str, metrics: dict[str, float], history: list[dict]) -> None:
    """DVC metrics (metrics/train/<family>.json) and per-epoch curves (plots/train/<family>.csv)."""
    mdir, pdir = root / "metrics" / "train", root / "plots" / "train"
    mdir.mkdir(parents=True, exist_ok=True)
    pdir.mkdir(parents=True, exist_ok=True)
    (mdir / f"{family}.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    keys = sorted({k for row in history for k in row} - {"epoch"})
    with open(pdir / f"{family}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["epoch", *keys])
        w.writeheader()
        w.writerows(history)


def train_family(
    family: str,
    params: Params,
    *,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    root: Path | None = None,
    register: bool = True,
) -> TrainOutcome:
    root = (root or tracking.project_root()).resolve()
    cfg = params.family(family)
    tracking.configure(root)  # fail fast on an unreachable server, before any expensive work
    device = resolve_device(params.device)
    seed_everything(params.seed)
    data = ProcessedData.open(root / params.data.processed_dir)
    train_x, val_x = data.load_split("train"), data.load_split("val")
    if len(val_x) == 0:
        raise ValueError(f"{data.root}: the validation split is empty; increase data.split_fractions[1]")

    lineage = tracking.lineage_tags(params.data.processed_dir, root)
    flat = run_params(family, params)
    identity = {"config": flat, "data": lineage["data.content_sha256"]}
    ckpt_path = root / params.train.checkpoint_dir / family / "last.pt"
    ckpt = resumable_checkpoint(ckpt_path, identity, cfg.epochs) if resume else None

    task = make_task(family, params, data.grid.shape, device)
    exp_id = tracking.experiment_id(tracking.TRAIN_EXPERIMENT, root)
    launched = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run` (MLproject): log into that run
    if ckpt is not None:
        run = mlflow.start_run(run_id=ckpt["run_id"], log_system_metrics=params.train.system_metrics)
    elif launched:
        run = mlflow.start_run(run_id=launched, log_system_metrics=params.train.system_metrics)
        mlflow.set_tags({"model": family, "stage": "train", **lineage})
        mlflow.log_params(flat)
    else:
        name = f"{family}-z{task.model.latent_dim}-e{cfg.epochs}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = mlflow.start_run(
            experiment_id=exp_id, run_name=name, log_system_metrics=params.train.system_metrics,
            tags={"model": family, "stage": "train", **lineage},
        )
        mlflow.log_params(flat)
        mlflow.set_tag("device", str(device))
    fixed = val_x[: params.train.n_fixed]
    affine = data.grid.affine

    def on_epoch_end(epoch: int, metrics: dict[str, float], log_artifacts: bool) -> None:
        mlflow.log_metrics(metrics, step=epoch + 1)
        if log_artifacts:
            gen = torch.Generator().manual_seed(params.seed)  # same samples every time: comparable epochs
            vols = task.artifacts(fixed, gen)
            for kind, v in vols.items():
                names = [f"{kind}_{i:02d}" for i in range(len(v))]
                tracking.log_volumes(v[:, 0].numpy(), affine, f"volumes/epoch_{epoch + 1:03d}/{kind}", names)

    try:
        result = run_loop(
            task, train_x, val_x,
            LoopConfig(
                epochs=cfg.epochs, batch_size=cfg.batch_size, seed=params.seed, checkpoint=ckpt_path,
                artifact_every=params.train.artifact_every, stop_after_epoch=stop_after_epoch, identity=identity,
            ),
            resume_from=ckpt, on_epoch_end=on_epoch_end, checkpoint_extra={"run_id": run.info.run_id},
        )
        final = {k: v for k, v in result.history[-1].items() if k != "epoch"}
        version, champion = None, False
        if result.finished and register:
            version, champion = registry.log_and_register(
                task.model_for_registry(), family, task.model_for_registry().config_dict(), final,
                tags={**lineage, "run_id": run.info.run_id, "volume_affine": json.dumps(affine.tolist())},
            )
            mlflow.set_tag("model_version", version)
        if result.finished:
            _write_outputs(root, family, {**final, "epochs": result.epochs_done}, result.history)
            mlflow.end_run()
        else:
            mlflow.set_tag("state", f"stopped after epoch {result.epochs_done}; resume with --resume")
            mlflow.end_run(status="KILLED")
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    return TrainOutcome(
        family, run.info.run_id, result.finished, final, version, champion, result.resumed_from,
        tracking.run_url(run),
    )
