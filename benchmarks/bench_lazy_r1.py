"""Lazy R1 (the penalty every ``r1_every`` discriminator steps, StyleGAN2) vs R1 on every step: cost per step.

    python benchmarks/bench_lazy_r1.py        # default params, batch 4, GAN and StyleGAN (final level)
"""
import time, torch
from brainlatent.config import load_params
from brainlatent.train.runner import make_task
p = load_params("params.yaml")
for fam in ("gan", "stylegan"):
    torch.manual_seed(0)
    task = make_task(fam, p, tuple(p.data.shape), torch.device("cpu"))
    epoch = 10_000 if fam == "stylegan" else 0
    task.steps_per_epoch = 1; task.on_epoch_start(epoch)
    x = task.prepare_batch(torch.rand(4, 1, *p.data.shape))
    task.train_step(x, epoch, 0); task.train_step(x, epoch, 1)
    def t(step, n=4):
        t0 = time.perf_counter()
        for _ in range(n): task.train_step(x, epoch, step)
        return (time.perf_counter() - t0) / n
    with_r1, without = t(0), t(1)  # step % r1_every == 0 -> R1 on
    k = task.cfg.r1_every
    lazy = (with_r1 + (k - 1) * without) / k
    print(f"{fam}: step with R1 {with_r1*1e3:.0f} ms, without {without*1e3:.0f} ms; R1 every step {with_r1*1e3:.0f} ms/step vs lazy (every {k}) {lazy*1e3:.0f} ms/step: {with_r1/lazy:.2f}x")
