"""Run by tests/test_distributed.py as ``torchrun --nproc-per-node 2 tests/distributed_worker.py OUT``: the
distributed helpers and the epoch loop on a gloo group of two CPU processes. Any failed check raises, so the
process, and torchrun, exit non-zero; each rank writes ``OUT/rank<r>.ok`` when all its checks pass."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from brainlatent.train import distributed
from brainlatent.train.checkpoint import load_checkpoint
from brainlatent.train.loop import LoopConfig, NonFiniteLossError, Task, run_loop


class LinearTask(Task):
    """A linear map fitted to random targets with Adam; records its draws from the torch RNG."""

    def __init__(self, nan_at: tuple[int, int, int] | None = None):
        super().__init__(torch.device("cpu"))
        torch.manual_seed(0)
        self.model = torch.nn.Linear(8, 1)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.1)
        self.nan_at, self.draws, self.batch_sizes = nan_at, [], []

    def optimizers(self):
        return {"model": self.opt}

    def train_step(self, x, epoch, step):
        self.batch_sizes.append(len(x))
        self.draws.append(float(torch.rand(())))
        self.opt.zero_grad()
        loss = (self.model(x.flatten(1)) - x.flatten(1).sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        self.opt.step()
        if self.nan_at == (distributed.rank(), epoch, step):
            loss = torch.tensor(math.nan)
        return {"loss": loss.detach()}

    def validate(self, val):
        return {"val_loss": 0.0}


def main(out: Path) -> None:
    distributed.init(torch.device("cpu"))
    r = distributed.rank()
    assert distributed.active() and distributed.world_size() == 2

    # Each rank takes its equal slice of the same global batch.
    assert distributed.shard(torch.arange(6)).tolist() == [[0, 1, 2], [3, 4, 5]][r]
    # Means over ranks; a NaN on one rank is a NaN on every rank.
    mean = distributed.mean_across_ranks([float(r), math.nan if r == 1 else 1.0])
    assert mean[0] == 0.5 and math.isnan(mean[1]), mean
    assert distributed.broadcast_object({"from": r}) == {"from": 0}

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(r + 1))
    distributed.allreduce_grads([p])
    assert p.grad.tolist() == [1.5, 1.5, 1.5], p.grad

    # The consistency check catches one rank drifting from the others.
    lin = torch.nn.Linear(2, 2)
    distributed.broadcast_state(lin)
    distributed.assert_in_sync(lin, "after broadcasting")
    with torch.no_grad():
        lin.bias[0] += 1e-6 * r
    try:
        distributed.assert_in_sync(lin, "after a nudge")
    except RuntimeError as err:
        assert "bias" in str(err) and "weight" not in str(err), err
    else:
        raise AssertionError("assert_in_sync missed a parameter that differs between ranks")

    # The loop: same batches on both ranks, sliced; gradients averaged by the default distribute() (the
    # optimiser pre-hook the GANs use); the checkpoint written by rank 0 alone.
    data = torch.randn(12, 1, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    ckpt = out / "last.pt"
    task = LinearTask()
    rng_before = torch.get_rng_state()
    run_loop(task, data, data[:2], LoopConfig(epochs=2, batch_size=4, seed=0, checkpoint=ckpt),
             checkpoint_extra={"writer": r})
    assert task.batch_sizes == [2] * 6, task.batch_sizes  # 3 global batches of 4 per epoch, halved
    draws = distributed.broadcast_object(task.draws)
    assert (draws == task.draws) == (r == 0), "ranks must draw their own random numbers in a step"
    assert torch.equal(torch.get_rng_state(), rng_before)  # ... leaving the shared RNG state as it was
    distributed.assert_in_sync(task.model, "after training")
    distributed.barrier()
    assert load_checkpoint(ckpt)["writer"] == 0

    # A NaN on rank 1 alone stops both ranks at the same step with the clear message, not a deadlock.
    task = LinearTask(nan_at=(1, 1, 2))
    try:
        run_loop(task, data, data[:2], LoopConfig(epochs=2, batch_size=4, seed=0, checkpoint=out / "nan.pt"))
    except NonFiniteLossError as err:
        assert "loss became nan (mean over 2 processes) at epoch 2, step 3" in str(err), err
    else:
        raise AssertionError("the NaN on rank 1 did not stop this rank")
    distributed.barrier()
    assert load_checkpoint(out / "nan.pt")["epoch"] == 1  # the last good state

    (out / f"rank{r}.ok").write_text("ok")
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
