"""`brainlatent train --model <family>`: data + MLflow run + loop + registry, for any family.

One MLflow run per training (experiment ``brainlatent-train``, tag ``model=<family>``). ``resume=True`` picks
up an unfinished checkpoint of the *same* configuration and data and continues in the same MLflow run, also
after a SIGKILL (the run, left RUNNING, is reopened; epochs checkpointed but not yet logged are logged).
Under torchrun only rank 0 touches MLflow, the checkpoint and the outputs.
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
from brainlatent.data.dataset import ProcessedData, open_split
from brainlatent.model_ref import ModelRef, write_ref
from brainlatent.train import distributed
from brainlatent.train.device import resolve_device, seed_everything
from brainlatent.train.loop import (
    EPOCH_SECONDS, LoopConfig, Task, Terminated, deferred_sigterm, resumable_checkpoint, run_loop,
)
from brainlatent.tuning import TunedValues

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    family: str
    run_id: str
    finished: bool
    metrics: dict[str, float]
    model_version: str | None  # registered as brainlatent-<family>, alias candidate (and trained/<family>.json)
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


def _log_missing_epochs(run_id: str, history: list[dict]) -> None:
    """A kill between writing an epoch's checkpoint and logging its metrics leaves that epoch unlogged:
    log it on resume, so the run has each epoch exactly once."""
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, EPOCH_SECONDS)}
    for row in history:
        if row["epoch"] not in logged:
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])


def _checkpoint_to_resume(path: Path, identity: dict[str, Any], epochs: int) -> dict[str, Any] | None:
    """An unfinished checkpoint of this configuration and data, or a complete one whose MLflow run never
    finished (killed while registering the model): then only the finishing steps are left to do."""
    ckpt = resumable_checkpoint(path, identity, epochs, include_finished=True)
    if ckpt is None or ckpt["epoch"] < epochs:
        return ckpt
    try:
        status = mlflow.MlflowClient().get_run(ckpt["run_id"]).info.status
    except (KeyError, mlflow.exceptions.MlflowException):
        return None
    return None if status == "FINISHED" else ckpt


def train_family(
    family: str,
    params: Params,
    *,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    root: Path | None = None,
    register: bool = True,
    tuned: TunedValues | None = None,
) -> TrainOutcome:
    """Train ``family``. Under torchrun (see ``train/distributed.py``) every rank calls this; rank 0 alone
    uses MLflow, the checkpoint, the registry and the DVC outputs, and the others return its run id.

    ``tuned`` (from :func:`brainlatent.tuning.resolve_tuned`, already folded into ``params``) is recorded: its
    source and overrides as run tags, the values used as ``trained_with`` in metrics/train/<family>.json (a
    column of `dvc exp show` beside the params.yaml value)."""
    root = (root or tracking.project_root()).resolve()
    cfg = params.family(family)
    device = distributed.init(resolve_device(params.device))
    rank0 = distributed.is_rank0()
    distributed.check_global_batch(cfg.batch_size, f"{family}.batch_size")
    if rank0:
        tracking.configure(root)  # fail fast on an unreachable server, before any expensive work
    seed_everything(params.seed)
    data = ProcessedData.open(root / params.data.processed_dir)
    # The training split is streamed from the memmap when it would not fit comfortably in memory (issue 17:
    # data.dataset.should_stream, $BRAINLATENT_STREAM); validation holds its split and as many reconstructions
    # or samples in memory whatever it is given, so the (smaller) validation split stays in memory.
    train_x, val_x = open_split(data, "train"), data.load_split("val")
    if len(val_x) == 0:
        raise ValueError(f"{data.root}: the validation split is empty; increase data.split_fractions[1]")

    ckpt_path = root / params.train.checkpoint_dir / family / "last.pt"
    task = make_task(family, params, data.grid.shape, device)
    if not rank0:
        ckpt, run_id = distributed.broadcast_object(None)
        result = run_loop(
            task, train_x, val_x,
            LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=params.seed, checkpoint=ckpt_path,
                       stop_after_epoch=stop_after_epoch),
            resume_from=ckpt,
        )
        distributed.barrier()  # rank 0 registers the model and writes the outputs meanwhile
        return TrainOutcome(family, run_id, result.finished, {}, None, result.resumed_from, "")
    with deferred_sigterm():
        return _train_rank0(
            family, params, task, data, train_x, val_x, ckpt_path, root, device, resume, stop_after_epoch,
            register, tuned,
        )


def _start_train_run(family, params, task, root, device, ckpt, lineage, flat) -> mlflow.ActiveRun:
    """Reopen the checkpoint's run (resume), join the run `mlflow run` launched, or start a new one."""
    cfg = params.family(family)
    system_metrics = params.train.system_metrics
    exp_id = tracking.experiment_id(tracking.TRAIN_EXPERIMENT, root)  # created here when missing, in every case
    launched = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run` (MLproject): log into that run
    if ckpt is not None:
        # A run killed by SIGKILL is still RUNNING in the store: start_run reopens it all the same.
        run = mlflow.start_run(run_id=ckpt["run_id"], log_system_metrics=system_metrics)
        _log_missing_epochs(run.info.run_id, ckpt.get("history", []))
        return run
    if launched:
        run = mlflow.start_run(run_id=launched, log_system_metrics=system_metrics)
        mlflow.set_tags({"model": family, "stage": "train", **lineage})
        mlflow.log_params(flat)
        return run
    name = f"{family}-z{task.model.latent_dim}-e{cfg.epochs}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = mlflow.start_run(
        experiment_id=exp_id, run_name=name,
        log_system_metrics=system_metrics, tags={"model": family, "stage": "train", **lineage},
    )
    mlflow.log_params(flat)
    mlflow.set_tag("device", str(device))
    return run


def _register(task, family: str, final: dict[str, float], lineage: dict[str, str], run_id: str, affine,
              root: Path) -> str:
    """Register the trained model as a new version; write trained/<family>.json (what evaluate@ and
    directions@ read: the version this run made, never an alias)."""
    model = task.model_for_registry()
    version, _ = registry.log_and_register(
        model, family, model.config_dict(), final,
        tags={**lineage, "run_id": run_id, "volume_affine": json.dumps(affine.tolist())},
    )
    mlflow.set_tag("model_version", version)
    write_ref(root, ModelRef(family, registry.registered_name(family), version, run_id))
    return version


def _train_rank0(
    family, params, task, data, train_x, val_x, ckpt_path, root, device, resume, stop_after_epoch, register, tuned
) -> TrainOutcome:
    cfg = params.family(family)
    lineage = tracking.lineage_tags(params.data.processed_dir, root)
    flat = run_params(family, params)
    identity = {"config": flat, "data": lineage["data.content_sha256"]}
    ckpt = _checkpoint_to_resume(ckpt_path, identity, cfg.epochs) if resume else None

    run = _start_train_run(family, params, task, root, device, ckpt, lineage, flat)
    # Not a param: the process count does not change what is trained, and checkpoints move between counts.
    mlflow.set_tag("world_size", str(distributed.world_size()))
    tuned_metrics = {}
    if tuned is not None:
        mlflow.set_tags(tuned.mlflow_tags())
        tuned_metrics["trained_with"] = {k: list(v) if isinstance(v, tuple) else v for k, v in tuned.used.items()}
    fixed = val_x[: params.train.n_fixed]
    affine = data.grid.affine
    if ckpt is None and task.shows_inputs:  # unchanged across epochs: once per run, not per artifact epoch
        names = [f"inputs_{i:02d}" for i in range(len(fixed))]
        tracking.log_volumes(fixed[:, 0].numpy(), affine, "volumes/inputs", names)

    def on_epoch_end(epoch: int, metrics: dict[str, float], log_artifacts: bool) -> None:
        mlflow.log_metrics(metrics, step=epoch + 1)
        if log_artifacts:
            gen = torch.Generator().manual_seed(params.seed)  # same samples every time: comparable epochs
            vols = task.artifacts(fixed, gen)
            for kind, v in vols.items():
                names = [f"{kind}_{i:02d}" for i in range(len(v))]
                tracking.log_volumes(v[:, 0].numpy(), affine, f"volumes/epoch_{epoch + 1:03d}/{kind}", names)

    try:
        distributed.broadcast_object((ckpt, run.info.run_id))
        result = run_loop(
            task, train_x, val_x,
            LoopConfig(
                epochs=cfg.epochs, batch_size=cfg.batch_size, seed=params.seed, checkpoint=ckpt_path,
                artifact_every=params.train.artifact_every, stop_after_epoch=stop_after_epoch, identity=identity,
            ),
            resume_from=ckpt, on_epoch_end=on_epoch_end, checkpoint_extra={"run_id": run.info.run_id},
        )
        final = {k: v for k, v in result.history[-1].items() if k != "epoch"}
        version = _register(task, family, final, lineage, run.info.run_id, affine, root) if (
            result.finished and register) else None
        if result.finished:
            outputs = {**final, "epochs": result.epochs_done, **tuned_metrics}
            if version is not None:
                outputs["model_version"] = int(version)
            _write_outputs(root, family, outputs, result.history)
            mlflow.end_run()
        else:
            mlflow.set_tag("state", f"stopped after epoch {result.epochs_done}; resume with --resume")
            mlflow.end_run(status="KILLED")
    except Terminated as err:
        mlflow.set_tag("state", f"terminated by SIGTERM after epoch {err.epochs_done}; resume with --resume")
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    distributed.barrier()
    return TrainOutcome(
        family, run.info.run_id, result.finished, final, version, result.resumed_from, tracking.run_url(run),
    )
