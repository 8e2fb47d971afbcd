"""Inversion (real scan -> latent) time per scan for the GAN families at the default shape, batched.

Untrained networks of the default width: the cost of an optimisation step does not depend on the weights.

    python benchmarks/bench_inversion.py [--batch 16] [--steps 50]
"""

from __future__ import annotations

import argparse
import time

import torch

from brainlatent.config import load_params
from brainlatent.models.base import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="default: directions.inversion_steps")
    args = ap.parse_args()
    p = load_params(args.params)
    steps = args.steps or p.directions.inversion_steps
    shape = tuple(p.data.shape)
    print(f"# shape {shape}, batch {args.batch}, {steps} steps, torch {torch.get_num_threads()} threads")
    print("| family | s per batch | s per scan |")
    print("|---|---|---|")
    for family in ("gan", "stylegan"):
        cfg = p.family(family)
        torch.manual_seed(0)
        model = build_model(family, {**cfg.model_kwargs(), "volume_shape": list(shape)})
        model = model.to(memory_format=torch.channels_last_3d).eval()
        x = torch.rand(args.batch, 1, *shape)
        t = time.perf_counter()
        if family == "stylegan":
            model.project(x, "w", steps=steps)
        else:
            model.encode(x, steps=steps)
        dt = time.perf_counter() - t
        print(f"| {family} | {dt:.1f} | {dt / args.batch:.2f} |", flush=True)


if __name__ == "__main__":
    main()
