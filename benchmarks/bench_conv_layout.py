"""The profile finding behind `train.channels_last: true`: conv3d forward/backward time by memory layout.

On CPU (oneDNN), the backward of a 3x3x3 conv3d with 8 input channels in NCDHW takes a slow path that is an
order of magnitude slower than the same convolution in channels_last_3d; wider layers are also faster
channels-last. Narrow networks (the default 8 base channels) hit this path in every layer.

    python benchmarks/bench_conv_layout.py
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn


def timed(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(shape=(24, 32, 24), batch: int = 8) -> None:
    print(f"# conv3d 3x3x3, batch {batch}, volume {shape}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| in -> out | GFLOP fwd | NCDHW fwd s | NCDHW bwd s | channels_last fwd s | channels_last bwd s | bwd speed-up |")
    print("|---|---|---|---|---|---|---|")
    for cin, cout in [(1, 8), (8, 8), (8, 16), (16, 16), (16, 32), (32, 32)]:
        row = []
        for cl in (False, True):
            fmt = torch.channels_last_3d if cl else torch.contiguous_format
            conv = nn.Conv3d(cin, cout, 3, padding=1, bias=False).to(memory_format=fmt)
            x = torch.rand(batch, cin, *shape).contiguous(memory_format=fmt).requires_grad_(True)
            fwd = timed(lambda: conv(x))
            y = conv(x)
            g = torch.ones_like(y)
            bwd = timed(lambda: torch.autograd.grad(conv(x), (x, conv.weight), g))
            row += [fwd, bwd - fwd]
        gf = batch * cin * cout * 27 * 2 * int(torch.tensor(shape).prod()) / 1e9
        print(f"| {cin} -> {cout} | {gf:.2f} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | {row[3]:.3f} | "
              f"{row[1] / row[3]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
