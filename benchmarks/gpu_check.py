"""The prepared GPU check (issue 17, item 3): every family's training step on one CUDA device, in one run.

Made for a lent accelerator that has PyTorch (and the usual scientific stack) but none of our other
dependencies and no network: ``benchmarks/gpu_check.sh`` installs the carried wheels (monai, pydantic) and
runs this file from the repository root with ``src`` on the path. Nothing here imports MLflow, DVC or Optuna
(the end of the run checks ``sys.modules``); ``--simulate-device-env`` blocks, here on a CPU, every package
that machine lacks, so a dependency that would break there breaks here first.

Stages, most wanted first; a time budget (``--budget-s``) skips what no longer fits, so the run ends in time:

1. ``research``: params.research.yaml at 64 x 80 x 64, batch 16 (ae dense and conv, vae, gan, stylegan at its
   final level), fp32 and bf16 autocast, channels_last_3d on and off, deterministic as training runs them;
2. ``default``: params.yaml at 24 x 32 x 24, batch 4 (ae conv: params.yaml's conv widths), the same variants;
3. ``seed``: bench_adversarial_steps.py's seed-project StyleGAN against ours (G, D, R1 steps), on the device;
4. ``hcp128``: the research widths at 128 x 160 x 128, batch 4, bf16, both layouts (a 128^3-class HCP run);
5. ``nondeterministic``: research, bf16 + channels-last with cuDNN autotuning (what determinism costs);
6. ``compile``: research, bf16 + channels-last, torch.compile of the AE / VAE loss and the GAN generator.

Per case: median and mean step time after warm-up, volumes/s, FLOPs of a step (torch's flop_counter formulas over
one lazy-R1 cycle) and the achieved TFLOP/s as a share of a bf16 matrix-product peak measured in the same run,
peak GPU memory, every loss finite, and the first step's losses against the fp32 run's (same weights, batch
and random draws) within ``--rtol``. Results go to ``<out>/gpu_check.json`` and ``gpu_check.md`` after every
case, so a run cut short still brings back what it measured. Exit status 1 when a check failed.

    benchmarks/gpu_check.sh                            # on the CUDA machine (docs/research_scale.md, "GPU check")
    benchmarks/gpu_check.sh --allow-cpu --tiny         # here: tiny shapes, a few steps (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gc
import importlib.abc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parent.parent
FINAL_LEVEL_EPOCH = 10_000  # StyleGAN: an epoch past the last level's fade, so steps run at full resolution

# The GPU image's Python distributions (KINDS.md of the device tool, read 2026-11-17), and what gpu_check.sh
# carries as wheels: --simulate-device-env lets this check import from nothing else.
DEVICE_IMAGE = set("""
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
    patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
    py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
    uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
CARRIED = {"monai", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"}
NOT_ON_DEVICE = ("mlflow", "dvc", "optuna", "brainlatent.train.runner", "brainlatent.tracking", "brainlatent.registry")


# ------------------------------------------------------------------------------------- the environment
def _normalised(distribution: str) -> str:
    return distribution.lower().replace("_", "-").replace(".", "-")


class DeviceImageOnly(importlib.abc.MetaPathFinder):
    """Refuses a top-level module whose installed distribution is neither in the GPU image nor carried."""

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = {_normalised(d) for d in allowed} | {"brainlatent"}
        self.owners = importlib.metadata.packages_distributions()

    def find_spec(self, name, path, target=None):
        top = name.partition(".")[0]
        owners = {_normalised(d) for d in self.owners.get(top, ())}
        if owners and not owners & self.allowed:
            raise ModuleNotFoundError(f"{top} ({', '.join(sorted(owners))}) is not on the GPU machine", name=top)
        return None  # allowed, or not from an installed distribution (stdlib, src/): the usual finders decide


def require_imports() -> None:
    """Import what the check needs now, so a missing package is one clear message, not a traceback later."""
    try:
        import monai  # noqa: F401  (metrics and inversion import it at module level)
        import pydantic  # noqa: F401  (brainlatent.config validates params files with it)

        import brainlatent.train.adversarial  # noqa: F401
        import brainlatent.train.reconstruction  # noqa: F401
    except ImportError as exc:
        sys.exit(f"gpu_check: cannot import {exc.name or exc}: {exc}. On the GPU machine run this through "
                 "benchmarks/gpu_check.sh with `.whl` in carry (docs/research_scale.md, 'GPU check').")


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "device": str(device), "cpu_threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    import monai
    import pydantic

    env.update({m.__name__: f"{m.__version__} ({Path(m.__file__).parent.parent})" for m in (monai, pydantic)})
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return env


# ------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], n: int, device: torch.device) -> tuple[list[float], float, list]:
    """Run ``fn`` n times: (seconds of each call, wall seconds of all n, what each returned). On CUDA each
    call is timed by events, with no host synchronisation between calls (it would serialise them)."""
    outs: list = []
    sync(device)
    wall = time.perf_counter()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            outs.append(fn())
            end.record()
        sync(device)
        each = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        each = []
        for _ in range(n):
            t = time.perf_counter()
            outs.append(fn())
            each.append(time.perf_counter() - t)
    sync(device)
    return each, time.perf_counter() - wall, outs


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Median TFLOP/s of an n x n x n product on random data (zeros run faster than real data)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    time_calls(lambda: a @ b, 3, device)
    each, _, _ = time_calls(lambda: a @ b, reps, device)
    return float(f"{2 * n**3 / statistics.median(each) / 1e12:.4g}")


class FlopCount(TorchDispatchMode):
    """FLOPs of the matrix products and convolutions run within (torch's flop_counter formulas). Not
    FlopCounterMode itself: its per-module tracking breaks R1's autograd.grad on an input (torch 2.13)."""

    total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


# ------------------------------------------------------------------------------------------- the cases
@dataclasses.dataclass(frozen=True)
class Variant:
    bf16: bool
    channels_last: bool
    deterministic: bool = True  # as training runs (seed_everything); False: cuDNN autotuning
    compiled: bool = False

    @property
    def label(self) -> str:
        parts = ["bf16" if self.bf16 else "fp32", "CL" if self.channels_last else "NCDHW"]
        return " ".join(parts + ([] if self.deterministic else ["autotuned"]) + (["compiled"] if self.compiled else []))


ALL_LAYOUTS = (Variant(False, False), Variant(False, True), Variant(True, False), Variant(True, True))
BF16_CL = Variant(True, True)
MODEL_OVERRIDES = {  # model name -> (family, params overrides)
    "ae-dense": ("ae", {"ae.arch": "dense", "ae.hidden": [256]}),
    "ae-conv": ("ae", {"ae.arch": "conv"}),
    "vae": ("vae", {}),
    "gan": ("gan", {}),
    "stylegan": ("stylegan", {}),
}
ALL_MODELS = tuple(MODEL_OVERRIDES)
TINY_WIDTHS = {
    **{f"{f}.{k}": v for f in ("ae", "vae") for k, v in
       {"base_channels": 4, "max_channels": 8, "latent_dim": 8}.items()},
    "gan.g_base_channels": 4, "gan.g_max_channels": 8, "gan.d_base_channels": 4, "gan.d_max_channels": 8,
    "gan.latent_dim": 8,
    "stylegan.base_channels": 4, "stylegan.max_channels": 8, "stylegan.z_dim": 8, "stylegan.w_dim": 8,
    "gan.r1_every": 2, "stylegan.r1_every": 2,  # a lazy-R1 cycle in two steps
}


@dataclasses.dataclass(frozen=True)
class Scale:
    label: str
    params_file: str
    shape: tuple[int, int, int]
    batch: int


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    scale: Scale | None  # None: the seed comparison
    models: tuple[str, ...] = ALL_MODELS
    variants: tuple[Variant, ...] = ALL_LAYOUTS


def plan(tiny: bool) -> list[Stage]:
    if tiny:  # every code path, at shapes a loaded 2-core CPU runs in seconds
        research = Scale("research-tiny", "params.research.yaml", (8, 10, 8), 2)
        return [Stage("research", research, variants=(Variant(False, False), BF16_CL)), Stage("seed", None),
                Stage("nondeterministic", research, ("ae-conv",), (Variant(True, True, False),))]
    research = Scale("research", "params.research.yaml", (64, 80, 64), 16)
    return [
        Stage("research", research),
        Stage("default", Scale("default", "params.yaml", (24, 32, 24), 4)),
        Stage("seed", None),
        Stage("hcp128", Scale("hcp128", "params.research.yaml", (128, 160, 128), 4),
              ("ae-conv", "vae", "gan", "stylegan"), (BF16_CL, Variant(True, False))),
        Stage("nondeterministic", research, variants=(Variant(True, True, False),)),
        Stage("compile", research, ("ae-conv", "vae", "gan"), (Variant(True, True, compiled=True),)),
    ]


def load_family_config(scale: Scale, model: str, tiny: bool):
    from brainlatent.config import load_params

    family, overrides = MODEL_OVERRIDES[model]
    overrides = {**overrides, "data.shape": list(scale.shape), **(TINY_WIDTHS if tiny else {})}
    params = load_params(ROOT / scale.params_file, overrides)
    return family, params.family(family), params.seed


def make_task(family: str, cfg, shape, device: torch.device, variant: Variant):
    """The training task as train/runner.py's make_task builds it (runner itself imports MLflow)."""
    if family in ("ae", "vae"):
        from brainlatent.train.reconstruction import ReconstructionTask

        return ReconstructionTask(family, cfg, shape, device, variant.bf16, variant.channels_last)
    from brainlatent.train.adversarial import make_adversarial_task

    return make_adversarial_task(family, cfg, shape, device, variant.bf16, variant.channels_last)


def compile_step(task, family: str) -> None:
    """torch.compile where the step allows it: the reconstruction loss (as bench_compile.py), the GAN
    generator. Not the critics: R1's double backward does not go through compiled graphs."""
    if family in ("ae", "vae"):
        task.model.loss = torch.compile(task.model.loss)
    elif family == "gan":
        task.model.generator.forward = torch.compile(task.model.generator.forward)
    else:
        raise ValueError(f"no compile recipe for {family!r}")


def relative_difference(losses: dict[str, float], reference: dict[str, float]) -> float:
    return max(abs(losses[k] - reference[k]) / max(abs(reference[k]), 1e-3) for k in reference)


class Check:
    """Runs the cases of the plan, keeps every result and writes them after each case."""

    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device, self.started = args, device, time.perf_counter()
        self.out = Path(args.out)
        self.results: dict = {"environment": environment(device), "settings": vars(args) | {"out": str(self.out)},
                              "peaks_tflops": {}, "steps": [], "seed_comparison": [], "skipped": []}
        self.reference_losses: dict[tuple[str, str], dict[str, float]] = {}
        self.flops_per_step: dict[tuple[str, str], float] = {}
        self.last_seconds: dict[str, float] = {}  # per stage: the last case's cost, to see whether one more fits

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fits(self, stage: str, extra_s: float = 0.0) -> bool:
        return self.elapsed() + self.last_seconds.get(stage, 0.0) + extra_s <= self.args.budget_s

    # -- peaks ---------------------------------------------------------------------------------------
    def measure_peaks(self) -> None:
        n, reps = (256, 3) if self.args.tiny else (8192, 10)
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            self.results["peaks_tflops"][name] = matmul_peak_tflops(self.device, dtype, n, reps)
        print(f"matmul peaks (n = {n}): {self.results['peaks_tflops']} TFLOP/s", flush=True)

    # -- training steps ------------------------------------------------------------------------------
    def run_training_case(self, stage: Stage, model: str, variant: Variant, row: dict) -> None:
        """Fills ``row`` with the case's measurements and checks."""
        scale, args, device = stage.scale, self.args, self.device
        from brainlatent.train.device import seed_everything

        family, cfg, seed = load_family_config(scale, model, args.tiny)
        seed_everything(seed)
        torch.use_deterministic_algorithms(variant.deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not variant.deterministic
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        task = make_task(family, cfg, scale.shape, device, variant)
        if variant.compiled:
            compile_step(task, family)
        row["params_m"] = round(sum(p.numel() for p in task.model.parameters()) / 1e6, 3)
        epoch = FINAL_LEVEL_EPOCH if family == "stylegan" else 0
        task.steps_per_epoch = 1
        task.on_epoch_start(epoch)
        volumes = torch.rand(scale.batch, 1, *scale.shape, generator=torch.Generator().manual_seed(0))
        task.fit_data(volumes)  # the dense autoencoders' template
        x = task.prepare_batch(volumes)
        # One lazy-R1 cycle (R1 on one D step in r1_every) is the unit of a mean step.
        cycle = math.lcm(getattr(cfg, "r1_every", 1), getattr(cfg, "n_critic", 1))
        step = iter(range(10**9))

        def train_step() -> dict:
            return task.train_step(x, epoch, next(step))

        warm = time.perf_counter()
        torch.manual_seed(1)  # the same draws in every variant: the first step's losses are comparable
        first = train_step()
        first_losses = {k: float(first[k]) for k in ("loss", "g_loss") if k in first}
        for _ in range(args.warmup - 1):
            train_step()
        sync(device)
        row["warmup_s"] = round(time.perf_counter() - warm, 2)
        n = max(cycle, math.ceil(args.steps / cycle) * cycle)
        each, wall, outs = time_calls(train_step, n, device)
        bad_steps = [i for i, o in enumerate(outs) if not all(bool(torch.isfinite(v).all()) for v in o.values())]
        if bad_steps:
            row["nonfinite"] = {i: {k: float(v) for k, v in outs[i].items()} for i in bad_steps}
        finite = not bad_steps and all(math.isfinite(v) for v in first_losses.values())
        mean = wall / n
        row.update(step_ms_median=round(statistics.median(each) * 1e3, 2), step_ms_mean=round(mean * 1e3, 2),
                   timed_steps=n, volumes_per_s=round(scale.batch / mean, 1),
                   s_per_1k_volumes=round(1000 * mean / scale.batch, 2),
                   first_losses={k: round(v, 6) for k, v in first_losses.items()}, losses_finite=finite)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            row.update(peak_mem_gib=round(peak / 2**30, 3), peak_mib_per_volume=round(peak / 2**20 / scale.batch, 1))
        key = (model, scale.label)
        if key not in self.flops_per_step and not variant.compiled:  # FLOPs do not depend on precision or layout
            with FlopCount() as counter:
                for _ in range(cycle):
                    train_step()
            self.flops_per_step[key] = counter.total / cycle
        if key in self.flops_per_step:
            tflops = self.flops_per_step[key] / mean / 1e12
            row.update(flop_per_step=int(self.flops_per_step[key]), tflops=float(f"{tflops:.4g}"),
                       share_of_bf16_peak=float(f"{tflops / self.results['peaks_tflops']['bf16']:.4g}"))
        if not variant.bf16 and variant.deterministic and not variant.compiled:
            self.reference_losses.setdefault(key, first_losses)
        agrees = True
        if key in self.reference_losses:
            row["rel_diff_vs_fp32"] = round(relative_difference(first_losses, self.reference_losses[key]), 5)
            agrees = row["rel_diff_vs_fp32"] <= args.rtol
        row["ok"] = finite and agrees

    def run_training_stage(self, stage: Stage) -> None:
        compile_s = 90.0 if any(v.compiled for v in stage.variants) and not self.args.tiny else 0.0
        for model in stage.models:
            for variant in stage.variants:
                case = f"{stage.name} {model} {variant.label}"
                if not self.fits(stage.name, compile_s):
                    self.results["skipped"].append(f"{case}: time budget ({self.args.budget_s:.0f} s)")
                    continue
                t = time.perf_counter()
                row = {"stage": stage.name, "model": model, "shape": "x".join(map(str, stage.scale.shape)),
                       "batch": stage.scale.batch, "variant": variant.label, "ok": False}
                try:
                    self.run_training_case(stage, model, variant, row)
                except torch.OutOfMemoryError as exc:  # a result at 128^3-class shapes, not a failure
                    row.update(ok=True, status=f"OOM: {str(exc).splitlines()[0]}")
                except Exception as exc:  # keep going: one broken case must not hide the others' numbers
                    traceback.print_exc()
                    row["status"] = f"error: {type(exc).__name__}: {exc}"
                gc.collect()
                self.last_seconds[stage.name] = row["case_s"] = round(time.perf_counter() - t, 2)
                self.results["steps"].append(row)
                print(f"{case}: " + ", ".join(f"{k}={row[k]}" for k in (
                    "step_ms_median", "volumes_per_s", "tflops", "peak_mem_gib", "rel_diff_vs_fp32", "ok", "status"
                ) if k in row), flush=True)
                self.write()

    # -- the seed project's StyleGAN against ours -----------------------------------------------------
    def run_seed_stage(self) -> None:
        from brainlatent.models.adversarial import ns_d_loss
        from brainlatent.models.stylegan import Discriminator, Generator
        from brainlatent.train.device import adam, autocast

        seed = seed_project_classes()
        batch, doublings, z_dim, widths = (2, 1, 16, (4,)) if self.args.tiny else (4, 3, 128, (32, 64))
        side, device = 4 * 2**doublings, self.device
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        for bf16 in (False, True):
            for channels in widths:
                if not self.fits("seed"):
                    self.results["skipped"].append(f"seed C={channels} bf16={bf16}: time budget")
                    continue
                t = time.perf_counter()
                torch.manual_seed(0)
                models = {"seed": (seed["SeedGenerator"](channels, z_dim, doublings),
                                   seed["SeedDiscriminator"](channels, doublings), {})}
                for layout in ("NCDHW", "CL"):
                    G = Generator((side,) * 3, z_dim, z_dim, 8, 0.01, doublings + 1, channels, channels)
                    D = Discriminator((side,) * 3, doublings + 1, channels, channels)
                    fmt = torch.channels_last_3d if layout == "CL" else torch.contiguous_format
                    models[f"ours {layout}"] = (G.to(memory_format=fmt), D.to(memory_format=fmt), {"mixing_prob": 0.9})
                for name, (G, D, kwargs) in models.items():
                    G, D = G.to(device), D.to(device)
                    fmt = torch.channels_last_3d if name == "ours CL" else torch.contiguous_format
                    real, fake = (torch.rand(batch, 1, side, side, side, device=device).contiguous(memory_format=fmt)
                                  for _ in range(2))
                    opt_g = adam(G.parameters(), device, lr=1e-3, betas=(0.0, 0.99))
                    opt_d = adam(D.parameters(), device, lr=1e-3, betas=(0.0, 0.99))

                    def g_step() -> None:  # forward + backward of a fixed loss + Adam, as the bench's
                        opt_g.zero_grad(set_to_none=True)
                        with autocast(device, bf16):
                            loss = G(torch.randn(batch, z_dim, device=device), **kwargs).float().square().mean()
                        loss.backward()
                        opt_g.step()

                    def d_step(r1_gamma: float) -> Callable[[], None]:
                        def step() -> None:
                            opt_d.zero_grad(set_to_none=True)
                            with autocast(device, bf16):
                                loss = ns_d_loss(D, real, fake, r1_gamma=r1_gamma)["loss"]
                            loss.backward()
                            opt_d.step()
                        return step

                    for phase, fn in (("G", g_step), ("D", d_step(0.0)), ("R1", d_step(10.0))):
                        time_calls(fn, self.args.warmup, device)
                        each, _, _ = time_calls(fn, self.args.steps, device)
                        self.results["seed_comparison"].append({
                            "channels": channels, "precision": "bf16" if bf16 else "fp32", "model": name,
                            "phase": phase, "ms_median": round(statistics.median(each) * 1e3, 3)})
                self.last_seconds["seed"] = time.perf_counter() - t
                print(f"seed comparison C={channels} {'bf16' if bf16 else 'fp32'}: done", flush=True)
                self.write()

    # -- output --------------------------------------------------------------------------------------
    def failures(self) -> list[str]:
        return [f"{r['stage']} {r['model']} {r['variant']}: " + r.get("status", (
            "non-finite loss" if not r.get("losses_finite", True) else
            f"first-step losses differ from fp32 by {r.get('rel_diff_vs_fp32')} > {self.args.rtol}"))
            for r in self.results["steps"] if not r["ok"]]

    def write(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        self.results["failures"] = self.failures()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1))
        (self.out / "gpu_check.md").write_text(markdown(self.results))


def markdown(results: dict) -> str:
    env, peaks = results["environment"], results["peaks_tflops"]
    lines = ["# GPU check (benchmarks/gpu_check.py)", "",
             ", ".join(f"{k}: {v}" for k, v in env.items()),
             f"Matrix-product peaks measured in this run: {peaks} TFLOP/s. Elapsed {results.get('elapsed_s')} s.", "",
             "Steps are train_step of the training task (D + G for the GANs, R1 on one step in r1_every); 'fp32' "
             "convolutions may use TF32 (cudnn_allow_tf32 above). Mean step = wall time / steps; the share is "
             "of the bf16 peak.", "",
             "| stage | model | shape | batch | variant | median ms | mean ms | vol/s | s/1k vol | GFLOP/step "
             "| TFLOP/s | % bf16 peak | peak GiB | MiB/vol | warm-up s | rel. diff vs fp32 | ok |",
             "|" + "---|" * 17]
    for r in results["steps"]:
        share = r.get("share_of_bf16_peak")
        cells = [r["stage"], r["model"], r.get("shape", ""), r.get("batch", ""), r["variant"],
                 r.get("step_ms_median", r.get("status", "")), r.get("step_ms_mean", ""), r.get("volumes_per_s", ""),
                 r.get("s_per_1k_volumes", ""),
                 f"{r['flop_per_step'] / 1e9:.3g}" if "flop_per_step" in r else "", r.get("tflops", ""),
                 "" if share is None else f"{100 * share:.3g}", r.get("peak_mem_gib", ""),
                 r.get("peak_mib_per_volume", ""), r.get("warmup_s", ""), r.get("rel_diff_vs_fp32", ""),
                 "yes" if r["ok"] else "NO"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    seed = results["seed_comparison"]
    if seed:
        lines += ["", "## Seed project's StyleGAN vs ours (bench_adversarial_steps.py's models, on this device)", "",
                  "| C | precision | step | seed ms | ours NCDHW ms | ours CL ms | seed / ours NCDHW | seed / ours CL |",
                  "|---|---|---|---|---|---|---|---|"]
        by = {(r["channels"], r["precision"], r["phase"], r["model"]): r["ms_median"] for r in seed}
        for c, prec, phase in dict.fromkeys((r["channels"], r["precision"], r["phase"]) for r in seed):
            s, a, b = (by.get((c, prec, phase, m)) for m in ("seed", "ours NCDHW", "ours CL"))
            if None not in (s, a, b):
                lines.append(f"| {c} | {prec} | {phase} | {s} | {a} | {b} | {s / a:.2f}x | {s / b:.2f}x |")
    for title, items in (("Skipped", results["skipped"]), ("Failures", results.get("failures", []))):
        if items:
            lines += ["", f"## {title}", "", *[f"- {item}" for item in items]]
    return "\n".join(lines) + "\n"


def seed_project_classes() -> dict[str, type]:
    """The seed project's StyleGAN as bench_adversarial_steps.py writes it, without running that module's
    imports: its other part needs the MLflow-importing training runner, which the GPU machine lacks."""
    path = ROOT / "benchmarks" / "bench_adversarial_steps.py"
    wanted = ("_SeedEqualized", "_SeedAdaIN", "_SeedConvNoiseAct", "_resample", "SeedGenerator", "SeedDiscriminator")
    tree = ast.parse(path.read_text(), str(path))
    nodes = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in wanted]
    missing = set(wanted) - {n.name for n in nodes}
    if missing:
        raise RuntimeError(f"{path}: no longer defines {sorted(missing)}; update gpu_check.seed_project_classes")
    import torch.nn.functional as F
    from torch import Tensor, nn

    namespace = {"torch": torch, "nn": nn, "F": F, "Tensor": Tensor, "math": math, "__name__": "seed_stylegan"}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec", dont_inherit=True), namespace)
    return {name: namespace[name] for name in ("SeedGenerator", "SeedDiscriminator")}


# -------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU when CUDA is missing (tests)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and widths, few steps: a smoke run")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="output folder ($OUT)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no case after this many seconds")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per case, rounded up to whole lazy-R1 cycles (default 12; tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    ap.add_argument("--rtol", type=float, default=0.05, help="first-step losses vs fp32: largest relative diff")
    ap.add_argument("--stages", nargs="+", default=None, help="run only these stages (names in the docstring)")
    ap.add_argument("--simulate-device-env", action="store_true",
                    help="refuse packages the GPU machine lacks (to test this script on a full environment)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 12)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as seed_everything, before cuBLAS starts
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.allow_cpu:
        device = torch.device("cpu")
    else:
        print("gpu_check: CUDA is not available (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}): this check measures a GPU. Pass --allow-cpu to run it on the CPU anyway.",
              file=sys.stderr)
        return 2
    if args.simulate_device_env:
        sys.meta_path.insert(0, DeviceImageOnly(DEVICE_IMAGE | CARRIED))
    require_imports()
    check = Check(args, device)
    print(f"gpu_check on {check.results['environment']}", flush=True)
    check.measure_peaks()
    for stage in plan(args.tiny):
        if args.stages and stage.name not in args.stages:
            continue
        if stage.scale is None:
            check.run_seed_stage()
        else:
            check.run_training_stage(stage)
    leaked = [m for m in NOT_ON_DEVICE if m in sys.modules]
    if leaked:
        check.results["failures_env"] = f"imported modules the GPU machine lacks: {leaked}"
    check.write()
    print("\n" + markdown(check.results), flush=True)
    if leaked:
        print(f"gpu_check: FAILED: imported {leaked}, which the GPU machine does not have", file=sys.stderr)
        return 1
    failures = check.failures()
    if failures:
        print(f"gpu_check: FAILED: {len(failures)} case(s):\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"gpu_check: all checks passed in {check.elapsed():.0f} s; results in {check.out}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
