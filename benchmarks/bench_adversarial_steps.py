"""Adversarial step times: our StyleGAN against the seed project's 3D StyleGAN, and our training phases.

Part ``seed`` (issue 22): the seed project's generator and discriminator (``StyleGAN/model_blocks.py`` and
``mri_style_gan.py`` of the 2021 repository), re-written below from their description, against ours at the
same size: batch 4, a 32^3 output grown from a 4^3 constant through three doublings, z = w = 128, mapping
depth 8, the same width C at every level, fp32. A generator step is forward + backward of a fixed loss +
Adam; a discriminator step is the non-saturating loss on a real and a fake batch + backward + Adam; an R1
step adds the R1 penalty's double backward (both critics through ``models/adversarial.py: ns_d_loss``,
so the losses are the same code). Ours runs as it trains (style mixing 0.9, random noise), in both memory layouts.

Part ``steps``: our training task's phases as ``train_step`` runs them (StyleGAN at its final level, the
DCGAN family), at the default shape and widths of params.yaml and at 64 x 80 x 64: the discriminator step
(a fresh fake batch + D update), the same with the lazy R1 penalty, and the generator step (with the EMA
update), plus the mean step of a run (R1 on one step in ``r1_every``). The generator step is timed as
(D + G step) - (D step), because ``train_step`` always runs the D step first.

Every variant is timed once per round, the rounds interleaved, and the median reported: the machine is
shared, so compare the ratios measured within one run, not seconds across runs.

    python benchmarks/bench_adversarial_steps.py                 # both parts (~10 min on 2 free cores)
    python benchmarks/bench_adversarial_steps.py --part seed --channels 64
    python benchmarks/bench_adversarial_steps.py --quick         # tiny smoke run (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from brainlatent.config import load_params
from brainlatent.models.adversarial import ns_d_loss
from brainlatent.models.stylegan import Discriminator, Generator
from brainlatent.train.device import adam
from brainlatent.train.runner import make_task

SEED_BETAS = (0.0, 0.99)
QUICK_WIDTHS = {f"{family}.{key}": value for family, keys in {
    "stylegan": {"base_channels": 4, "max_channels": 8, "z_dim": 16, "w_dim": 16},
    "gan": {"g_base_channels": 4, "g_max_channels": 8, "d_base_channels": 4, "d_max_channels": 8},
}.items() for key, value in keys.items()}


# ------------------------------------------------------------------------- the seed project's StyleGAN
# Written here (not imported: nothing is downloaded at run time) to time what the seed project trains.
# Kept as published where it costs time: weights scaled at run time by sqrt(2 / fan_in), AdaIN's
# statistics recomputed in every layer, noise and LeakyReLU as separate operations, trilinear resampling,
# both toRGB / fromRGB paths of the fade evaluated at alpha = 1. The published AdaIN nests three 1-D
# standard deviations; here it is one std over the volume (the same number of passes over the data).
class _SeedEqualized(nn.Module):
    """A layer whose N(0, 1) weight is multiplied by He's constant sqrt(2 / fan_in) on every call."""

    def __init__(self, layer: nn.Conv3d | nn.Linear) -> None:
        super().__init__()
        nn.init.normal_(layer.weight)
        self.layer, self.c = layer, math.sqrt(2.0 / math.prod(layer.weight.shape[1:]))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.layer.weight * self.c
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.layer.bias)
        return F.conv3d(x, weight, self.layer.bias, padding=self.layer.padding)


class _SeedAdaIN(nn.Module):
    def __init__(self, w_dim: int, channels: int) -> None:
        super().__init__()
        self.style = _SeedEqualized(nn.Linear(w_dim, 2 * channels))
        nn.init.ones_(self.style.layer.bias)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        mean = x.mean(dim=(2, 3, 4), keepdim=True)
        std = x.std(dim=(2, 3, 4), keepdim=True)
        x = (x - mean) / torch.sqrt(std**2 + 1e-8)
        scale, shift = self.style(w).view(w.shape[0], 2, -1, 1, 1, 1).unbind(1)
        return x * scale + shift


class _SeedConvNoiseAct(nn.Module):
    """conv (3x3x3 'same', or ``kernel`` unpadded) -> per-channel scaled noise -> LeakyReLU(0.2)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = _SeedEqualized(nn.Conv3d(c_in, c_out, kernel, padding=padding))
        self.noise_weight = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        return F.leaky_relu(x + self.noise_weight.view(1, -1, 1, 1, 1) * noise, 0.2)


def _resample(x: Tensor, factor: float) -> Tensor:
    return F.interpolate(x, scale_factor=factor, mode="trilinear", align_corners=False)


class SeedGenerator(nn.Module):
    """z (B, w_dim) -> (B, 1, 4 * 2^doublings, ...): the seed project's generator at its final level."""

    def __init__(self, channels: int, w_dim: int = 128, doublings: int = 3, mapping_depth: int = 8) -> None:
        super().__init__()
        self.mapping = nn.Sequential(
            *[m for _ in range(mapping_depth) for m in (_SeedEqualized(nn.Linear(w_dim, w_dim)), nn.LeakyReLU(0.2))]
        )
        self.const = nn.Parameter(torch.ones(1, channels, 4, 4, 4))
        self.base_adain = _SeedAdaIN(w_dim, channels)
        convs = [_SeedConvNoiseAct(channels, channels) for _ in range(1 + 2 * doublings)]
        self.convs = nn.ModuleList(convs)
        self.adains = nn.ModuleList(_SeedAdaIN(w_dim, channels) for _ in convs)
        self.to_rgb = _SeedEqualized(nn.Conv3d(channels, 1, 1))
        self.doublings, self.alpha = doublings, 1.0

    def forward(self, z: Tensor) -> Tensor:
        w = self.mapping(F.normalize(z))
        x = self.base_adain(self.const.expand(z.shape[0], -1, -1, -1, -1), w)
        x = self.adains[0](self.convs[0](x), w)
        up = x
        for level in range(self.doublings):
            x = up = _resample(x, 2.0)
            for i in (1 + 2 * level, 2 + 2 * level):
                x = self.adains[i](self.convs[i](x), w)
        return self.alpha * self.to_rgb(x) + (1 - self.alpha) * self.to_rgb(up)


class SeedDiscriminator(nn.Module):
    """(B, 1, 4 * 2^doublings, ...) -> (B, 1): the seed project's progressive discriminator, final level."""

    def __init__(self, channels: int, doublings: int = 3) -> None:
        super().__init__()
        self.from_rgb = _SeedEqualized(nn.Conv3d(1, channels, 1))
        self.blocks = nn.ModuleList(
            nn.Sequential(_SeedConvNoiseAct(channels, channels), _SeedConvNoiseAct(channels, channels))
            for _ in range(doublings)
        )
        self.head_conv = _SeedConvNoiseAct(channels + 1, channels)
        self.head_valid = _SeedConvNoiseAct(channels, channels, kernel=4, padding=0)
        self.out = _SeedEqualized(nn.Linear(channels, 1))
        self.alpha = 1.0

    def forward(self, img: Tensor) -> Tensor:
        h = _resample(self.blocks[-1](self.from_rgb(img)), 0.5)
        down = self.from_rgb(_resample(img, 0.5))  # the fade's other path, evaluated even at alpha = 1
        h = self.alpha * h + (1 - self.alpha) * down
        for block in reversed(self.blocks[:-1]):
            h = _resample(block(h), 0.5)
        std = h.std(dim=0).mean()  # minibatch standard deviation, one scalar
        h = torch.cat([h, torch.ones_like(h[:, :1]) * std], dim=1)
        return self.out(self.head_valid(self.head_conv(h)).flatten(1))


# ----------------------------------------------------------------------------------------------- timing
def interleaved_medians(variants: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Seconds per call of each variant: one warm-up call each, then ``rounds`` interleaved rounds, median."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def generator_step(G: nn.Module, z_dim: int, batch: int, **forward_kwargs) -> Callable[[], None]:
    """Forward + backward of a fixed loss (mean square of the output) + Adam."""
    opt = adam(G.parameters(), torch.device("cpu"), lr=1e-3, betas=SEED_BETAS)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        G(torch.randn(batch, z_dim), **forward_kwargs).square().mean().backward()
        opt.step()

    return step


def discriminator_step(D: nn.Module, real: Tensor, fake: Tensor, r1_gamma: float) -> Callable[[], None]:
    """ns_d_loss (+ R1 when r1_gamma > 0) + backward + Adam."""
    opt = adam(D.parameters(), torch.device("cpu"), lr=1e-3, betas=SEED_BETAS)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        ns_d_loss(D, real, fake, r1_gamma=r1_gamma)["loss"].backward()
        opt.step()

    return step


def seed_comparison(channels: int, batch: int, doublings: int, z_dim: int, rounds: int) -> dict[str, float]:
    """Median seconds of every (model, layout, phase) at width ``channels``; keys 'seed G', 'ours cl D', ..."""
    side = 4 * 2**doublings
    torch.manual_seed(0)
    models = {
        "seed": (SeedGenerator(channels, z_dim, doublings), SeedDiscriminator(channels, doublings), {}),
    }
    for layout in ("nchw", "cl"):
        G = Generator((side,) * 3, z_dim, z_dim, 8, 0.01, doublings + 1, channels, channels)
        D = Discriminator((side,) * 3, doublings + 1, channels, channels)
        if layout == "cl":
            G, D = G.to(memory_format=torch.channels_last_3d), D.to(memory_format=torch.channels_last_3d)
        models[f"ours {layout}"] = (G, D, {"mixing_prob": 0.9})
    variants = {}
    for name, (G, D, kwargs) in models.items():
        fmt = torch.channels_last_3d if name.endswith("cl") else torch.contiguous_format
        real, fake = (torch.rand(batch, 1, side, side, side).contiguous(memory_format=fmt) for _ in range(2))
        variants[f"{name} G"] = generator_step(G, z_dim, batch, **kwargs)
        variants[f"{name} D"] = discriminator_step(D, real, fake, 0.0)
        variants[f"{name} R1"] = discriminator_step(D, real, fake, 10.0)
    return interleaved_medians(variants, rounds)


def training_phases(family: str, params, shape, batch: int, rounds: int) -> dict[str, float]:
    """Median seconds of the task's D step, D step with R1, and G step (= D+G minus D), final level."""
    torch.manual_seed(0)
    task = make_task(family, params, shape, torch.device("cpu"))
    epoch = 10_000 if family == "stylegan" else 0  # StyleGAN: the final resolution level, alpha = 1
    task.steps_per_epoch = 1
    task.on_epoch_start(epoch)
    x = task.prepare_batch(torch.rand(batch, 1, *shape))
    cfg = task.cfg
    r1_step = cfg.r1_every  # step % r1_every == 0: the lazy R1 step
    never = dataclasses.replace(cfg, n_critic=10 * r1_step + 1)  # no G step at steps 1 and r1_every
    every = dataclasses.replace(cfg, n_critic=1)

    def phase(config, step: int) -> Callable[[], None]:
        def run() -> None:
            task.cfg = config
            task.train_step(x, epoch, step)

        return run

    t = interleaved_medians({"D": phase(never, 1), "D+R1": phase(never, r1_step), "D+G": phase(every, 1)}, rounds)
    task.cfg = cfg
    g = max(t["D+G"] - t["D"], 0.0)
    mean = ((r1_step - 1) * t["D+G"] + t["D+R1"] + g) / r1_step
    return {"D": t["D"], "R1": t["D+R1"], "G": g, "mean": mean, "r1_every": r1_step}


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["seed", "steps", "all"], default="all")
    ap.add_argument("--channels", type=int, nargs="+", default=[32, 64], help="seed part: widths C")
    ap.add_argument("--shapes", nargs="+", default=["default", "64x80x64"], help="steps part: volume shapes")
    ap.add_argument("--families", nargs="+", default=["stylegan", "gan"], help="steps part: families")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batch, doublings, z_dim, rounds = 4, 3, 128, args.rounds
    if args.quick:
        batch, doublings, z_dim, rounds = 2, 1, 16, 1
        args.channels, args.shapes = [4], ["16x16x16"]
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32, "
          f"median of {rounds} interleaved rounds")
    if args.part in ("seed", "all"):
        side = 4 * 2**doublings
        print(f"\n## Seed StyleGAN vs ours: batch {batch}, {side}^3 from 4^3, z = w = {z_dim}, mapping depth 8\n")
        print("| C | step | seed ms | ours NCDHW ms | ours channels-last ms | seed / ours NCDHW | seed / ours CL |")
        print("|---|---|---|---|---|---|---|")
        for c in args.channels:
            t = seed_comparison(c, batch, doublings, z_dim, rounds)
            for phase in ("G", "D", "R1"):
                seed, nchw, cl = t[f"seed {phase}"], t[f"ours nchw {phase}"], t[f"ours cl {phase}"]
                print(f"| {c} | {phase} | {seed * 1e3:.0f} | {nchw * 1e3:.0f} | {cl * 1e3:.0f} | "
                      f"{seed / nchw:.2f}x | {seed / cl:.2f}x |", flush=True)
    if args.part in ("steps", "all"):
        overrides = QUICK_WIDTHS if args.quick else None
        params = load_params(args.params, overrides)
        shapes = [tuple(params.data.shape) if s == "default" else tuple(map(int, s.split("x"))) for s in args.shapes]
        layout = "channels-last" if params.train.channels_last else "NCDHW"
        print(f"\n## Our training phases (params: {args.params}, {layout}, batch {batch})\n")
        print("| family | shape | D step ms | D step with R1 ms | G step ms | mean step ms (R1 every k) |")
        print("|---|---|---|---|---|---|")
        for family in args.families:
            for shape in shapes:
                r = training_phases(family, params, shape, batch, rounds)
                print(f"| {family} | {'x'.join(map(str, shape))} | {r['D'] * 1e3:.0f} | {r['R1'] * 1e3:.0f} | "
                      f"{r['G'] * 1e3:.0f} | {r['mean'] * 1e3:.0f} (k = {r['r1_every']}) |", flush=True)


if __name__ == "__main__":
    main()
