"""torch.compile on the autoencoder's training step: steady-state speed-up vs the one-off compile cost.

    python benchmarks/bench_compile.py            # both architectures at the default shape, batch 8

A step is zero_grad + loss + backward + Adam, as in ReconstructionTask.train_step; the model's ``loss`` is
what gets compiled (the optimiser step stays eager, it is already fused).
"""

from __future__ import annotations

import platform
import time

import torch

from brainlatent.config import load_params
from brainlatent.train.runner import make_task


def step_seconds(arch: str, compiled: bool, batch: int = 8, steps: int = 10) -> tuple[float, float]:
    """(seconds per steady-state step, seconds for the first two steps incl. compilation)."""
    params = load_params("params.yaml", {"ae.arch": arch})
    torch.manual_seed(0)
    task = make_task("ae", params, tuple(params.data.shape), torch.device("cpu"))
    loss_fn = torch.compile(task.model.loss) if compiled else task.model.loss
    x = task.prepare_batch(torch.rand(batch, 1, *params.data.shape))

    def step() -> None:
        task.opt.zero_grad(set_to_none=True)
        loss_fn(x)["loss"].backward()
        task.opt.step()

    t0 = time.perf_counter()
    step(), step()
    warm = time.perf_counter() - t0
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps, warm


def main() -> None:
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| ae arch | eager ms/step | compiled ms/step | speed-up | compile warm-up s |\n|---|---|---|---|---|")
    for arch in ("dense", "conv"):
        (eager, _), (comp, warm) = step_seconds(arch, False), step_seconds(arch, True)
        print(f"| {arch} | {eager * 1e3:.1f} | {comp * 1e3:.1f} | {eager / comp:.2f}x | {warm:.1f} |", flush=True)


if __name__ == "__main__":
    main()
