"""The epoch loop every family shares: batching, checkpoints, resume, NaN guard, progress.

A family plugs in as a :class:`Task` (its optimisers, one training step, validation, artifacts). The loop
owns everything else, so resume and determinism are written once:

* batches come from a seeded ``torch.Generator`` whose state is checkpointed with the global torch RNG,
  so 2 epochs straight and 1 + resume + 1 give bit-identical weights on CPU;
* a checkpoint is written atomically after every epoch; a non-finite loss stops the run before the
  epoch's checkpoint, so the last checkpoint on disk is the last good state;
* under torchrun (``train/distributed.py``) every rank draws the same batches and trains on its slice of
  each; losses are averaged over the ranks every step (so a NaN on one rank stops all of them at the same
  step) and rank 0 alone validates and writes the checkpoint, which is the same for 1 or N processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from brainlatent.data.dataset import StreamedSplit
from brainlatent.metric_groups import grouped
from brainlatent.train import distributed
from brainlatent.train.checkpoint import load_checkpoint, save_atomic
from brainlatent.train.device import autocast, to_memory_format

log = logging.getLogger(__name__)

# Per-epoch metrics are grouped (metric_groups.grouped): train/<loss>, val/<metric>, schedule/<value>, and this.
EPOCH_SECONDS = "time/epoch_seconds"


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


class Terminated(SystemExit):
    """SIGTERM arrived under :func:`deferred_sigterm`; raised at the loop's next step boundary (status 143)."""

    def __init__(self, epochs_done: int):
        super().__init__(128 + signal.SIGTERM)
        self.epochs_done = epochs_done


class _Flag:
    """Set from a signal handler: a plain attribute (an Event's lock could deadlock a handler)."""

    received = False


_sigterm = _Flag()


@contextlib.contextmanager
def deferred_sigterm():
    """Within: SIGTERM (Slurm preemption, torchrun stopping a failed job) only sets a flag, and
    :func:`run_loop` raises :class:`Terminated` at its next step boundary, so the caller can close its MLflow
    run as KILLED. Raising straight from the handler could interrupt an MLflow write halfway and leave the
    SQLite store locked. SIGKILL cannot be caught: a resume reopens such a run all the same."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _sigterm.received = False

    def handler(signum, frame):
        _sigterm.received = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _sigterm.received = False


class Task(ABC):
    """One family's training logic. Subclasses set ``self.model`` and create their optimisers."""

    model: torch.nn.Module
    steps_per_epoch: int = 1
    # Reconstruction families: the runner logs the fixed validation volumes once per run (volumes/inputs),
    # beside their reconstructions at every artifact epoch.
    shows_inputs: bool = False

    def __init__(self, device: torch.device, bf16: bool = False, channels_last: bool = False):
        self.device, self.bf16, self.channels_last = device, bf16, channels_last

    def autocast(self):
        return autocast(self.device, self.bf16)

    def prepare_batch(self, x: torch.Tensor) -> torch.Tensor:
        return to_memory_format(x.to(self.device, non_blocking=True), self.channels_last)

    @abstractmethod
    def optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def schedulers(self) -> dict[str, Any]:
        return {}

    def fit_data(self, train: torch.Tensor | StreamedSplit) -> None:
        """Data-dependent set-up from the training split before the first step (the dense autoencoders'
        template). A resume then restores the same buffers from the checkpoint.

        ``train`` here and in :meth:`on_train_end` may be a :class:`StreamedSplit` (a split too large for
        memory): use only ``len``, ``.shape`` / ``.ndim``, slices ``train[i:j]``, index tensors, ``.float()``
        and ``.mean(0, keepdim=...)``, which it supports by reading the file batch by batch."""

    def on_train_end(self, train: torch.Tensor | StreamedSplit) -> None:
        """After the last epoch's steps, before its validation, checkpoint and artifacts: fit what depends on
        the trained weights (the VAE's sampling prior), so the final checkpoint and registered model hold it.
        Runs on every rank under torchrun (same weights and data give the same fit)."""

    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        """Per-epoch schedule (KL warm-up, progressive-growing level). Returns values worth logging."""
        return {}

    @abstractmethod
    def train_step(self, x: torch.Tensor, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch ``(B, 1, X, Y, Z)``. Returns losses; must include ``loss``."""

    @abstractmethod
    def validate(self, val: torch.Tensor) -> dict[str, float]:
        """Validation metrics on the whole validation split ``(N, 1, X, Y, Z)``, unprefixed (the loop logs
        them as ``val/<name>``)."""

    def artifacts(self, fixed: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Volumes worth looking at (reconstructions of ``fixed``, samples): name -> ``(N, 1, X, Y, Z)``."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def model_for_registry(self) -> torch.nn.Module:
        return self.model

    def distribute(self) -> None:
        """Called once under torchrun, before training: make every optimiser step use gradients averaged
        over the ranks. This default all-reduces them just before each step (it works with the double
        backward of R1 / gradient penalty); a task whose step is one plain backward can use DDP instead."""
        for opt in self.optimizers().values():
            distributed.average_grads_before_step(opt)


@dataclass
class LoopConfig:
    epochs: int
    batch_size: int
    seed: int
    checkpoint: Path
    artifact_every: int = 5
    # Stop after this epoch (checkpoint written, run left resumable): time-sliced jobs and tests.
    stop_after_epoch: int | None = None
    identity: dict[str, Any] = field(default_factory=dict)  # config + data hash a resume must match


@dataclass
class LoopResult:
    epochs_done: int
    finished: bool
    history: list[dict[str, float]]
    resumed_from: int | None


def _batches(n: int, batch_size: int, generator: torch.Generator, world: int = 1) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    # Drop a last batch of one volume: norm layers and minibatch-std need at least two.
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks.pop()
    # With N processes a ragged last batch that does not split into N equal slices is dropped too:
    # averaging the ranks' gradients is the global batch's gradient only for equal slices.
    if world > 1 and chunks and len(chunks[-1]) % world:
        chunks.pop()
    if not chunks:
        raise ValueError(f"training split has {n} volumes: too few for one batch split over {world} processes")
    return chunks


def _remove_stale_temporaries(checkpoint: Path) -> None:
    """A kill while a checkpoint was being written leaves its temporary file (never the checkpoint itself,
    which is only ever replaced by an atomic rename); nothing reads those files, so drop them."""
    if checkpoint.parent.is_dir():
        for tmp in checkpoint.parent.glob(f".{checkpoint.name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def resumable_checkpoint(
    path: Path, identity: dict[str, Any], epochs: int, *, include_finished: bool = False
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this exact configuration and data and is unfinished
    (or, with ``include_finished``, has all ``epochs``: a run killed while registering its model)."""
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    if ckpt.get("identity") != identity:
        log.info("checkpoint %s is for another configuration or data; starting fresh", path)
        return None
    if ckpt["epoch"] > epochs or (ckpt["epoch"] == epochs and not include_finished):
        return None
    return ckpt


def _restore(resume_from: dict[str, Any], task: Task, optimizers: dict, schedulers: dict, gen: torch.Generator
             ) -> tuple[int, list[dict[str, float]]]:
    """Load a checkpoint's weights, optimiser / scheduler / task state and RNG states; (epochs done, history)."""
    task.model.load_state_dict(resume_from["model"])
    for k, opt in optimizers.items():
        opt.load_state_dict(resume_from["optimizers"][k])
    for k, sch in schedulers.items():
        sch.load_state_dict(resume_from["schedulers"][k])
    task.load_extra_state(resume_from.get("extra", {}))
    gen.set_state(resume_from["rng"]["batches"])
    torch.set_rng_state(resume_from["rng"]["torch"])
    return int(resume_from["epoch"]), list(resume_from.get("history", []))


def _epoch_data(train: torch.Tensor | StreamedSplit, batches: list[torch.Tensor], task: Task) -> Iterable[torch.Tensor]:
    """This rank's slice of each index batch, as volumes: indexed from the in-memory split, or read from the
    memmap by a streamed split's DataLoader workers (the same batches in the same order, pinned on CUDA)."""
    shards = [distributed.shard(idx) for idx in batches]
    if isinstance(train, StreamedSplit):
        return train.epoch_loader(shards, pin_memory=task.device.type == "cuda")
    return (train[idx] for idx in shards)


def _train_epoch(task: Task, train: torch.Tensor | StreamedSplit, cfg: LoopConfig, gen: torch.Generator, epoch: int
                 ) -> tuple[dict[str, float], int, dict[str, float]]:
    """One pass over the shuffled training split: (summed losses, batches, the schedule values of the epoch).

    Raises NonFiniteLossError on a NaN / Inf loss (mean over ranks) and Terminated on SIGTERM.
    """
    world, rank0 = distributed.world_size(), distributed.is_rank0()
    task.model.train()
    batches = _batches(len(train), cfg.batch_size, gen, world)
    task.steps_per_epoch = len(batches)  # lets schedules (fade-in alpha) advance per step
    sched_values = task.on_epoch_start(epoch)
    sums: dict[str, float] = {}
    bar = tqdm(
        _epoch_data(train, batches, task), total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False, unit="batch", mininterval=1.0, disable=not rank0,
    )
    for step, x in enumerate(bar):
        with distributed.rank_rng(cfg.seed, epoch, step, task.device):
            losses = task.train_step(task.prepare_batch(x), epoch, step)
        keys = list(losses)
        values = distributed.mean_across_ranks([float(losses[k]) for k in keys])
        for k, value in zip(keys, values):
            if not math.isfinite(value):
                where = f" (mean over {world} processes)" if world > 1 else ""
                raise NonFiniteLossError(
                    f"{k} became {value}{where} at epoch {epoch + 1}, step {step + 1}; stopping. The last "
                    f"good checkpoint (end of epoch {epoch}) is kept at {cfg.checkpoint}. Lower the learning "
                    "rate or disable bf16."
                )
            sums[k] = sums.get(k, 0.0) + value
        bar.set_postfix(loss=f"{values[keys.index('loss')]:.4g}")
        if _sigterm.received:
            raise Terminated(epoch)
    return sums, len(batches), sched_values


def _checkpoint(task: Task, optimizers: dict, schedulers: dict, gen: torch.Generator, epochs_done: int,
                history: list[dict[str, float]], cfg: LoopConfig, extra: dict[str, Any] | None) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly where this one stopped."""
    return {
        "family": getattr(task.model, "family", type(task.model).__name__),
        "model": task.model.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "extra": task.extra_state(),
        "rng": {"batches": gen.get_state(), "torch": torch.get_rng_state()},
        "epoch": epochs_done,
        "history": history,
        "identity": cfg.identity,
        "config": cfg.identity.get("config", {}),
        **(extra or {}),
    }


def run_loop(
    task: Task,
    train: torch.Tensor | StreamedSplit,
    val: torch.Tensor,
    cfg: LoopConfig,
    *,
    resume_from: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, float], bool], None] | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
) -> LoopResult:
    """Train ``task`` on ``train`` (N, 1, X, Y, Z) for ``cfg.epochs`` epochs, validating on ``val``.

    ``train`` is a tensor in memory or a :class:`StreamedSplit` (``data.dataset.open_split``: a split too
    large for memory), whose batches DataLoader workers read from the memmap; both give the same batches,
    hence the same weights, and the loader's workers are stopped when the loop returns or fails.

    ``on_epoch_end(epoch, metrics, log_artifacts)`` is where the caller logs to MLflow (0-based epoch); under
    torchrun it, validation and the checkpoint run on rank 0 only, and ``resume_from`` must be given on
    every rank (the runner broadcasts it).
    """
    try:
        return _run_loop(task, train, val, cfg, resume_from, on_epoch_end, checkpoint_extra)
    finally:
        if isinstance(train, StreamedSplit):
            train.close()


def _run_loop(task: Task, train: torch.Tensor | StreamedSplit, val: torch.Tensor, cfg: LoopConfig,
              resume_from: dict[str, Any] | None, on_epoch_end: Callable[[int, dict[str, float], bool], None] | None,
              checkpoint_extra: dict[str, Any] | None) -> LoopResult:
    if len(train) < 2:
        raise ValueError(f"training split has {len(train)} volume(s); at least 2 are needed")
    world, rank0 = distributed.world_size(), distributed.is_rank0()
    distributed.check_global_batch(cfg.batch_size, "batch_size")
    gen = torch.Generator().manual_seed(cfg.seed)
    task.fit_data(train)
    optimizers, schedulers = task.optimizers(), task.schedulers()
    start, history = 0, []
    if resume_from is not None:
        start, history = _restore(resume_from, task, optimizers, schedulers, gen)
        if rank0:
            log.info("resuming from epoch %d (%s)", start, cfg.checkpoint)
    if rank0:
        _remove_stale_temporaries(cfg.checkpoint)
    if world > 1:
        distributed.broadcast_state(task.model)  # identical start on every rank, whatever happened before
        task.distribute()

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        sums, n_batches, sched_values = _train_epoch(task, train, cfg, gen, epoch)
        for sch in schedulers.values():
            sch.step()
        task.model.eval()
        if world > 1:
            # Buffers updated from each rank's own slice (StyleGAN's w_avg) follow rank 0, which the
            # checkpoint records; then every rank must hold exactly rank 0's state.
            distributed.broadcast_state(task.model, buffers_only=True)
            distributed.assert_in_sync(task.model, f"after epoch {epoch + 1}")
        metrics = grouped("train", {k: v / max(n_batches, 1) for k, v in sums.items()})
        last = epoch + 1 == cfg.epochs
        if last:
            task.on_train_end(train)
        if rank0:
            metrics.update(grouped("val", task.validate(val)))
        metrics.update(grouped("schedule", sched_values))
        metrics[EPOCH_SECONDS] = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, **metrics})
        if rank0:
            log.info(
                "epoch %d/%d %s", epoch + 1, cfg.epochs,
                " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "schedule/lr"),
            )
            save_atomic(_checkpoint(task, optimizers, schedulers, gen, epoch + 1, history, cfg, checkpoint_extra),
                        cfg.checkpoint)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics, last or (epoch + 1) % max(cfg.artifact_every, 1) == 0)
        if _sigterm.received and not last:
            raise Terminated(epoch + 1)
        if cfg.stop_after_epoch is not None and epoch + 1 >= cfg.stop_after_epoch and not last:
            return LoopResult(epoch + 1, False, history, start if resume_from else None)
    return LoopResult(cfg.epochs, True, history, start if resume_from else None)
