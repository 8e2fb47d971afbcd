"""Training throughput per family: volumes/s and achieved FLOP/s as a fraction of the machine's matmul peak.

FLOPs of one training step are counted by torch's FlopCounterMode (convolutions and matmuls, forward and
backward); the peak is a dense fp32 matmul measured in the same process, so the ratio is like for like.

    python benchmarks/bench_training.py                        # default shape, all families
    python benchmarks/bench_training.py --shape 64 80 64 --families ae vae
    python benchmarks/bench_training.py --families ae vae --arch conv   # the research-scale architecture
    python benchmarks/bench_training.py --families ae --data-path --optimizers

``--data-path`` times what the loop does to get a batch (index the in-memory training split, move it to
the device, channels-last) as a share of the step; ``--optimizers`` times the optimiser step alone, fused
vs foreach Adam (the before/after of `train/device.py: adam`).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from brainlatent.config import load_params
from brainlatent.train.runner import make_task


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Dense fp32 matmul FLOP/s (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def step_flops(task, x, epoch) -> int:
    """FLOPs of a step without the (lazy) R1 double backward, which FlopCounterMode cannot trace."""
    with FlopCounterMode(display=False) as counter:
        task.train_step(x, epoch, 1)
    return counter.get_total_flops()


def bench(family: str, params, shape, batch: int, steps: int, channels_last: bool, bf16: bool) -> dict:
    p = dataclasses.replace(params, train=dataclasses.replace(params.train, channels_last=channels_last, bf16=bf16))
    torch.manual_seed(0)
    task = make_task(family, p, shape, torch.device("cpu"))
    return time_task(task, family, shape, batch, steps)


def time_task(task, family: str, shape, batch: int, steps: int) -> dict:
    epoch = 10_000 if family == "stylegan" else 0  # StyleGAN: time the final resolution level
    task.steps_per_epoch = 1
    task.on_epoch_start(epoch)
    x = task.prepare_batch(torch.rand(batch, 1, *shape))
    flops = step_flops(task, x, epoch)
    task.train_step(x, epoch, 1)  # warm-up
    t = time.perf_counter()
    for i in range(1, steps + 1):  # steps without R1, like the FLOP count (R1 runs on 1 step in r1_every)
        task.train_step(x, epoch, i)
    dt = (time.perf_counter() - t) / steps
    return {"family": family, "shape": "x".join(map(str, shape)), "batch": batch, "s_per_step": dt,
            "volumes_per_s": batch / dt, "gflop_per_step": flops / 1e9, "gflops": flops / dt / 1e9}


def data_path_seconds(task, shape, batch: int, n_train: int = 112, repeats: int = 20) -> float:
    """Seconds to produce one batch the way run_loop does: index the in-memory split, prepare_batch."""
    train = torch.rand(n_train, 1, *shape)
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for _ in range(repeats):
        idx = torch.randperm(n_train, generator=gen)[:batch]
        task.prepare_batch(train[idx])
    return (time.perf_counter() - t) / repeats


def optimizer_step_seconds(task, fused: bool, repeats: int = 10) -> float:
    """The optimiser step alone (gradients already in place), fused vs foreach Adam."""
    params = [q for q in task.model.parameters() if q.requires_grad]
    for q in params:
        q.grad = torch.randn_like(q)
    opt = torch.optim.Adam(params, lr=1e-4, fused=fused, foreach=None if fused else True)
    opt.step()  # allocate state
    t = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--shape", type=int, nargs=3, default=None, help="volume shape (default: data.shape)")
    ap.add_argument("--families", nargs="+", default=["ae", "vae", "gan", "stylegan"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compare-layouts", action="store_true", help="also time NCDHW fp32 and channels_last+bf16")
    ap.add_argument("--arch", choices=["conv", "dense"], default=None, help="ae/vae architecture (default: params)")
    ap.add_argument("--data-path", action="store_true", help="time batch preparation as a share of the step")
    ap.add_argument("--optimizers", action="store_true", help="time fused vs foreach Adam steps")
    args = ap.parse_args()
    overrides = {f"{f}.arch": args.arch for f in ("ae", "vae")} if args.arch else None
    params = load_params(args.params, overrides)
    shape = tuple(args.shape or params.data.shape)
    peak = matmul_peak()
    print(f"# {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    layouts = [(True, False)] + ([(False, False), (True, True)] if args.compare_layouts else [])
    print("| family | shape | layout | batch | s/step | volumes/s | GFLOP/step | GFLOP/s | % of matmul peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fam in args.families:
        for cl, bf in layouts:
            r = bench(fam, params, shape, args.batch, args.steps, cl, bf)
            layout = ("channels_last" if cl else "NCDHW") + (" + bf16" if bf else " fp32")
            print(f"| {fam} | {r['shape']} | {layout} | {r['batch']} | {r['s_per_step']:.3f} | "
                  f"{r['volumes_per_s']:.1f} | {r['gflop_per_step']:.1f} | {r['gflops']:.1f} | "
                  f"{100 * r['gflops'] * 1e9 / peak:.0f}% |", flush=True)
        if args.data_path or args.optimizers:
            torch.manual_seed(0)
            task = make_task(fam, params, shape, torch.device("cpu"))
            step = time_task(task, fam, shape, args.batch, args.steps)["s_per_step"]
        if args.data_path:
            data = data_path_seconds(task, shape, args.batch)
            print(f"  {fam}: batch preparation {data * 1e3:.2f} ms = {100 * data / (data + step):.2f}% of a "
                  f"{step * 1e3:.0f} ms step (target < 5%)", flush=True)
        if args.optimizers:
            fused, foreach = optimizer_step_seconds(task, True), optimizer_step_seconds(task, False)
            print(f"  {fam}: Adam step fused {fused * 1e3:.2f} ms, foreach {foreach * 1e3:.2f} ms "
                  f"({foreach / fused:.2f}x); step total {step * 1e3:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
