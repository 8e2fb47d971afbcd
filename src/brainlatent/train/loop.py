"""The epoch loop every family shares: batching, checkpoints, resume, NaN guard, progress.

A family plugs in as a :class:`Task` (its optimisers, one training step, validation, artifacts). The loop
owns everything else, so resume and determinism are written once:

* batches come from a seeded ``torch.Generator`` whose state is checkpointed with the global torch RNG,
  so 2 epochs straight and 1 + resume + 1 give bit-identical weights on CPU;
* a checkpoint is written atomically after every epoch; a non-finite loss stops the run *before* the
  optimiser step, so the last checkpoint on disk is the last good state.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from brainlatent.train.checkpoint import load_checkpoint, save_atomic
from brainlatent.train.device import autocast, to_memory_format

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


class Task(ABC):
    """One family's training logic. Subclasses set ``self.model`` and create their optimisers."""

    model: torch.nn.Module
    steps_per_epoch: int = 1

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

    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        """Per-epoch schedule (KL warm-up, progressive-growing level). Returns values worth logging."""
        return {}

    @abstractmethod
    def train_step(self, x: torch.Tensor, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch ``(B, 1, X, Y, Z)``. Returns losses; must include ``loss``."""

    @abstractmethod
    def validate(self, val: torch.Tensor) -> dict[str, float]:
        """Validation metrics on the whole validation split ``(N, 1, X, Y, Z)``."""

    def artifacts(self, fixed: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Volumes worth looking at (reconstructions of ``fixed``, samples): name -> ``(N, 1, X, Y, Z)``."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def model_for_registry(self) -> torch.nn.Module:
        return self.model


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


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    # Drop a last batch of one volume: norm layers and minibatch-std need at least two.
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < 2:
        chunks.pop()
    return chunks


def resumable_checkpoint(path: Path, identity: dict[str, Any], epochs: int) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it belongs to this exact configuration and data and is unfinished."""
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    if ckpt.get("identity") != identity:
        log.info("checkpoint %s is for another configuration or data; starting fresh", path)
        return None
    if ckpt["epoch"] >= epochs:
        return None
    return ckpt


def run_loop(
    task: Task,
    train: torch.Tensor,
    val: torch.Tensor,
    cfg: LoopConfig,
    *,
    resume_from: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, float], bool], None] | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
) -> LoopResult:
    """Train ``task`` on ``train`` (N, 1, X, Y, Z) for ``cfg.epochs`` epochs, validating on ``val``.

    ``on_epoch_end(epoch, metrics, log_artifacts)`` is where the caller logs to MLflow (0-based epoch).
    """
    if len(train) < 2:
        raise ValueError(f"training split has {len(train)} volume(s); at least 2 are needed")
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizers, schedulers = task.optimizers(), task.schedulers()
    start, history = 0, []
    if resume_from is not None:
        task.model.load_state_dict(resume_from["model"])
        for k, opt in optimizers.items():
            opt.load_state_dict(resume_from["optimizers"][k])
        for k, sch in schedulers.items():
            sch.load_state_dict(resume_from["schedulers"][k])
        task.load_extra_state(resume_from.get("extra", {}))
        gen.set_state(resume_from["rng"]["batches"])
        torch.set_rng_state(resume_from["rng"]["torch"])
        start, history = int(resume_from["epoch"]), list(resume_from.get("history", []))
        log.info("resuming from epoch %d (%s)", start, cfg.checkpoint)

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        task.model.train()
        batches = _batches(len(train), cfg.batch_size, gen)
        task.steps_per_epoch = len(batches)  # lets schedules (fade-in alpha) advance per step
        sched_values = task.on_epoch_start(epoch)
        sums: dict[str, float] = {}
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="batch", mininterval=1.0)
        for step, idx in enumerate(bar):
            losses = task.train_step(task.prepare_batch(train[idx]), epoch, step)
            for k, v in losses.items():
                value = float(v)
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"{k} became {value} at epoch {epoch + 1}, step {step + 1}; stopping. The last good "
                        f"checkpoint (end of epoch {epoch}) is kept at {cfg.checkpoint}. Lower the learning "
                        "rate or disable bf16."
                    )
                sums[k] = sums.get(k, 0.0) + value
            bar.set_postfix(loss=f"{float(losses['loss']):.4g}")
        for sch in schedulers.values():
            sch.step()
        task.model.eval()
        metrics = {f"train_{k}": v / max(len(batches), 1) for k, v in sums.items()}
        metrics.update(task.validate(val))
        metrics.update(sched_values)
        metrics["epoch_seconds"] = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, **metrics})
        log.info(
            "epoch %d/%d %s", epoch + 1, cfg.epochs,
            " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.startswith("lr")),
        )
        save_atomic(
            {
                "family": getattr(task.model, "family", type(task.model).__name__),
                "model": task.model.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
                "extra": task.extra_state(),
                "rng": {"batches": gen.get_state(), "torch": torch.get_rng_state()},
                "epoch": epoch + 1,
                "history": history,
                "identity": cfg.identity,
                "config": cfg.identity.get("config", {}),
                **(checkpoint_extra or {}),
            },
            cfg.checkpoint,
        )
        last = epoch + 1 == cfg.epochs
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics, last or (epoch + 1) % max(cfg.artifact_every, 1) == 0)
        if cfg.stop_after_epoch is not None and epoch + 1 >= cfg.stop_after_epoch and not last:
            return LoopResult(epoch + 1, False, history, start if resume_from else None)
    return LoopResult(cfg.epochs, True, history, start if resume_from else None)
