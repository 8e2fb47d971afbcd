"""Data-parallel training under ``torchrun``: one process per GPU (or per CPU slice), one global batch.

Launch with ``torchrun --nproc-per-node N -m brainlatent.cli train --model ae`` (several nodes: add
``--nnodes``, ``--rdzv-backend c10d``, ``--rdzv-endpoint host:port``), or set ``BRAINLATENT_NPROC_PER_NODE=N``
and run ``brainlatent train`` (or ``dvc repro``), which then starts torchrun on this node itself. torchrun
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without a world size
above one every helper here is a no-op, so single-process training runs exactly the code it always did.

The semantics are those of single-process training with the same *global* batch: every rank draws the same
seeded permutation, takes its equal slice of each batch, and steps with gradients averaged over the ranks.
AE/VAE use :class:`~torch.nn.parallel.DistributedDataParallel` (bucketed all-reduce overlapping the backward);
GAN/StyleGAN all-reduce their flattened gradients before each optimiser step instead, because DDP cannot
run the double backward of R1 / the gradient penalty (StyleGAN2-ADA's training loop does the same). Only
rank 0 talks to MLflow and writes checkpoints, artifacts and DVC outputs.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

NPROC_ENV = "BRAINLATENT_NPROC_PER_NODE"
# Rank 0 validates, logs artifacts and writes the checkpoint while the other ranks wait in their next
# collective: the group timeout must cover that (torch's default for NCCL is 10 minutes).
TIMEOUT = datetime.timedelta(minutes=60)


def launched() -> bool:
    """True in a process torchrun started for a world of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_rank0() -> bool:
    return rank() == 0


def env_rank() -> int:
    """This process's rank from torchrun's environment (usable before :func:`init`)."""
    return int(os.environ.get("RANK", "0"))


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); return this rank's device.

    Without torchrun (or with one process) nothing happens and ``device`` is returned unchanged."""
    if not launched():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; start at most that "
                "many processes per node (torchrun --nproc-per-node / BRAINLATENT_NPROC_PER_NODE)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(
            f"device {device.type!r}: multi-process training runs on cuda (nccl) or cpu (gloo); "
            "set device: cuda or cpu in params.yaml, or run one process"
        )
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=TIMEOUT)
        log.info("rank %d of %d (%s, %s)", dist.get_rank(), dist.get_world_size(), backend, device)
    return device


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the rank's GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_global_batch(batch_size: int, key: str) -> None:
    """The configured batch size is the global one; it must split evenly over the processes."""
    n = world_size()
    if batch_size % n:
        raise ValueError(
            f"{key}={batch_size} is the global batch size; it must be divisible by the {n} training processes"
        )


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's equal slice of a global batch of indices (its length is a multiple of the world size)."""
    if not active():
        return idx
    assert len(idx) % world_size() == 0, (len(idx), world_size())
    return idx.tensor_split(world_size())[rank()]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the checkpoint to resume, which only rank 0 reads)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_state(module: torch.nn.Module, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every rank."""
    if not active():
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    with torch.no_grad():
        for t in tensors:
            if t.device.type == _comm_device().type:
                dist.broadcast(t.data, src=0)
            else:
                tmp = t.data.to(_comm_device())
                dist.broadcast(tmp, src=0)
                t.data.copy_(tmp)


def mean_across_ranks(values: list[float]) -> list[float]:
    """Element-wise mean over the ranks (float64); a NaN on any rank makes that entry NaN on all of them."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world_size()).tolist()


def allreduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks, in one flattened all-reduce.

    Every rank runs the same code path, so the same parameters have gradients everywhere (e.g. StyleGAN's
    not-yet-grown levels have none on any rank)."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_comm_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def average_grads_before_step(optimizer: torch.optim.Optimizer) -> None:
    """Make every ``optimizer.step()`` average its gradients over the ranks first (a step pre-hook)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: allreduce_grads(params))


class _LossForward(torch.nn.Module):
    """DDP synchronises the gradients of what goes through its wrapped module's forward; this forward is
    the model's training loss, so ``model.loss(x)`` stays the one definition of the objective."""

    def __init__(self, model: torch.nn.Module, loss: Callable[..., Any]):
        super().__init__()
        self.model, self._loss = model, loss

    def forward(self, *args, **kwargs):
        return self._loss(*args, **kwargs)


def ddp_loss(model: torch.nn.Module, device: torch.device) -> Callable[..., Any]:
    """``model.loss`` computed through DistributedDataParallel (gradients averaged over the ranks in the
    backward). The optimiser and the checkpoint keep using ``model`` itself, so checkpoints are the same
    whether 1 or N processes wrote them."""
    ddp = torch.nn.parallel.DistributedDataParallel
    # No buffer broadcast in forward: rank 0 alone validates through the model, so no collective may hide
    # there. torch >= 2.13 names the switch forward_sync_buffers (broadcast_buffers is deprecated).
    new = "forward_sync_buffers" in inspect.signature(ddp).parameters
    no_sync = "forward_sync_buffers" if new else "broadcast_buffers"
    return ddp(
        _LossForward(model, model.loss),
        device_ids=[device.index] if device.type == "cuda" else None,
        **{no_sync: False},
    )


def rank_rng(seed: int, epoch: int, step: int, device: torch.device):
    """Under torchrun: run a training step with a torch RNG seeded from (seed, epoch, step, rank), restoring
    the shared state afterwards. Each rank then draws its own latent codes / VAE noise (the same draws would
    duplicate the fakes of every rank), reproducibly, while the global RNG stays identical on all ranks, as
    the checkpoint (written by rank 0) records it. A no-op in a single process."""
    if not active():
        return contextlib.nullcontext()
    return _forked(int(np.random.SeedSequence([seed, epoch, step, rank()]).generate_state(1)[0]), device)


@contextlib.contextmanager
def _forked(seed: int, device: torch.device):
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.manual_seed(seed)
        yield


def assert_in_sync(module: torch.nn.Module, when: str) -> None:
    """Raise if any parameter or buffer differs between ranks (a missed gradient sync would show here).

    Compares a per-tensor float64 (sum, sum of squares) fingerprint: two all-reduces of 2 numbers a tensor."""
    if not active():
        return
    names, stats = [], []
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point():
            d = t.detach().double()
            names.append(name)
            stats.append(torch.stack([d.sum(), (d * d).sum()]))
    if not stats:
        return
    lo = torch.stack(stats).to(_comm_device())
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    differ = [names[i] for i in torch.nonzero((lo != hi).any(dim=1)).flatten().tolist()]
    if differ:
        raise RuntimeError(
            f"model state differs between the {world_size()} training processes {when}: "
            f"{', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}; gradients were not synchronised"
        )
