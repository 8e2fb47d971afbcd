"""The training data path against cohort size (issue 17): peak memory and time of one epoch, in memory vs streamed.

For each shape and cohort size it writes a processed folder directly (``volumes.npy`` float16, ``subjects.csv``,
``grid.json``: the contract of ``ProcessedData.open``; smooth random ellipsoid "brains" plus noise, written in
chunks, not by ``prepare``), then runs one training epoch of a small conv autoencoder in a fresh child process per
(size, mode), with the file dropped from the page cache first (``posix_fadvise(DONTNEED)``: a cold first epoch):

* ``memory``: ``ProcessedData.load_split("train")`` (what training did before issue 17, and still does for
  tiny cohorts);
* ``stream``: ``StreamedSplit`` (DataLoader workers read the loop's batches with pread).

Per run, one JSON line: load seconds, epoch seconds (steps measured; with ``--max-steps`` the epoch time is
extrapolated from the measured steps), data wait (time the loop waits for its next batch) as a share of step time,
peak RSS of the main process (VmHWM) and peak summed PSS of the main process and its workers (sampled
every 0.2 s: pages the forked workers share with the main process are split between them, counted once in all).

Run::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_data_path.py --workdir /tmp/bench_data \\
        --shapes 64x80x64 --subjects 100,500,1113 --modes memory,stream --out bench_data_path.jsonl

``--keep`` keeps the processed folders (N * X * Y * Z * 2 bytes each) for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SPLIT_CYCLE = ["train"] * 12 + ["val"] * 3 + ["test"] * 5  # params.yaml's 0.6 / 0.15 / 0.25


def make_processed(out: Path, n: int, shape: tuple[int, int, int], seed: int = 0, chunk: int = 16) -> Path:
    """A processed folder of ``n`` ellipsoid volumes of ``shape``, written ``chunk`` at a time (bounded memory)."""
    import pandas as pd

    from brainlatent.data.cohort import age_to_group
    from brainlatent.grid import Grid

    if (out / "grid.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = Grid.box(shape, (176.0, 224.0, 176.0), (0.0, -18.0, 18.0))
    axes = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)
    vols = np.lib.format.open_memmap(out / "volumes.npy.tmp", mode="w+", dtype=np.float16, shape=(n, *shape))
    rows = []
    for start in range(0, n, chunk):
        for i in range(start, min(n, start + chunk)):
            radius = 0.55 + 0.1 * rng.random(3).astype(np.float32)
            r = np.sqrt(sum((a / rad) ** 2 for a, rad in zip(axes, radius)))
            vol = np.clip(1.2 - r, 0, 1) * (r < 1) + rng.normal(0, 0.01, shape).astype(np.float32)
            vols[i] = np.clip(vol, 0, 1)
            age = float(rng.uniform(22, 37))
            rows.append(dict(index=i, subject_id=str(100000 + i), sex="MF"[i % 2], age_group=age_to_group(age),
                             age=age, brain_mask_volume_mm3=1.2e6, etiv_mm3=1.5e6, FS_IntraCranial_Vol=1.6e6,
                             split=SPLIT_CYCLE[i % len(SPLIT_CYCLE)], center_x_mm=0.0, center_y_mm=-18.0,
                             center_z_mm=18.0))
    vols.flush()
    del vols
    os.replace(out / "volumes.npy.tmp", out / "volumes.npy")
    pd.DataFrame(rows).to_csv(out / "subjects.csv", index=False)
    grid.save(out / "grid.json")
    return out


def drop_cache(path: Path) -> None:
    """Evict ``path``'s pages from the page cache (our own file: no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries the parent's high-water mark over fork
    and exec into it, so a child of a parent that wrote a large memmap would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class PeakRSS:
    """Peak of the summed PSS of this process and its children (forked workers' shared pages counted once),
    sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.2):
        import psutil

        self.proc, self.period, self.peak = psutil.Process(), period, 0
        self.child_cpu: dict[int, float] = {}  # pid -> last seen user + system seconds of each descendant
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                    if p.pid != self.proc.pid:
                        t = p.cpu_times()
                        self.child_cpu[p.pid] = t.user + t.system
                except Exception:  # a worker exiting
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child(args) -> dict:
    """One epoch in this (fresh) process; returns the measurements."""
    import torch
    import yaml

    from brainlatent.config import params_from_dict
    from brainlatent.data.dataset import ProcessedData, StreamedSplit
    from brainlatent.train import loop as loop_mod
    from brainlatent.train.runner import make_task

    torch.set_num_threads(args.threads)
    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    data = ProcessedData.open(args.processed)
    raw["device"] = "cpu"
    raw["data"]["shape"] = list(data.grid.shape)
    raw["ae"].update(arch="conv", hidden=[], latent_dim=32, base_channels=args.base_channels,
                     max_channels=args.max_channels, batch_size=args.batch_size, epochs=1)
    params = params_from_dict(raw)
    torch.manual_seed(0)
    task = make_task("ae", params, data.grid.shape, torch.device("cpu"))

    with PeakRSS() as peak:
        t0 = time.perf_counter()
        if args.mode == "memory":
            train = data.load_split("train")
        else:
            train = StreamedSplit.of(data, "train")
        load_s = time.perf_counter() - t0

        waits: list[float] = []
        steps: list[float] = []
        original_epoch_data = loop_mod._epoch_data

        def timed_epoch_data(train_, batches, task_):
            if args.max_steps:
                batches = batches[: args.max_steps]
            it = iter(original_epoch_data(train_, batches, task_))
            while True:
                t = time.perf_counter()
                try:
                    x = next(it)
                except StopIteration:
                    return
                waits.append(time.perf_counter() - t)
                yield x

        original_step = task.train_step

        def timed_step(x, epoch, step):
            t = time.perf_counter()
            out = original_step(x, epoch, step)
            steps.append(time.perf_counter() - t)
            return out

        loop_mod._epoch_data = timed_epoch_data
        task.train_step = timed_step
        cfg = loop_mod.LoopConfig(epochs=1, batch_size=args.batch_size, seed=0,
                                  checkpoint=Path(args.processed) / "bench.pt")
        gen = torch.Generator().manual_seed(0)
        n_batches = len(loop_mod._batches(len(train), args.batch_size, torch.Generator().manual_seed(0)))
        task.fit_data(train)
        t1 = time.perf_counter()
        loop_mod._train_epoch(task, train, cfg, gen, 0)
        measured_s = time.perf_counter() - t1
        # The data path's own CPU cost, warm page cache, in this process: index a batch from memory, or
        # read it from the file and convert float16 -> float32 (what each DataLoader worker does).
        batches = loop_mod._batches(len(train), args.batch_size, torch.Generator().manual_seed(1))
        batches = batches[: args.max_steps] if args.max_steps else batches
        t2 = time.perf_counter()
        for idx in batches:
            train[idx]
        read_s_per_volume = (time.perf_counter() - t2) / sum(len(b) for b in batches)
        if isinstance(train, StreamedSplit):
            train.close()
    measured = len(steps)
    return {
        "mode": args.mode, "shape": list(data.grid.shape), "subjects": len(data), "train": len(train),
        "batch_size": args.batch_size, "batches": n_batches, "steps_measured": measured,
        "workers": int(os.environ.get("BRAINLATENT_STREAM_WORKERS", "-1")) if args.mode == "stream" else 0,
        "load_s": round(load_s, 3), "steps_s": round(measured_s, 3),
        "epoch_s": round(load_s + measured_s * n_batches / max(measured, 1), 2),
        "step_s_mean": round(float(np.mean(steps)), 4),
        "read_ms_per_volume_warm": round(read_s_per_volume * 1000, 2),
        "data_wait_share": round(sum(waits) / max(sum(steps), 1e-9), 4),
        "first_wait_s": round(waits[0], 3) if waits else None,
        "peak_rss_main_mb": peak_rss_mb(),
        "peak_pss_with_workers_mb": round(peak.peak / 2**20, 1),
        "train_float32_mb": round(len(train) * int(np.prod(data.grid.shape)) * 4 / 2**20, 1),
    }


def make_raw(raw_dir: Path, n: int, distinct: int) -> Path:
    """A manifest of ``n`` HCP-sized subjects (260 x 311 x 260 float32 .nii.gz, bench_preprocess.make_volume),
    ``distinct`` phantom files symlinked under ``n`` names: prepare reads and resamples every one of them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_preprocess import make_volume

    raw_dir.mkdir(parents=True, exist_ok=True)
    for k in range(distinct):
        if not (raw_dir / f"phantom_{k}.nii.gz").is_file():
            make_volume(raw_dir / f"phantom_{k}.nii.gz", seed=k)
    lines = ["subject,path,sex,age"]
    for i in range(n):
        link = raw_dir / f"sub-{i:04d}.nii.gz"
        if not link.is_symlink():
            link.symlink_to(f"phantom_{i % distinct}.nii.gz")
        lines.append(f"sub-{i:04d},{link.name},{'MF'[i % 2]},{22 + (i * 7) % 15}")
    manifest = raw_dir / f"manifest_{n}.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def prepare_child(args) -> dict:
    """``prepare`` on a manifest in this process: wall and CPU time (with its joblib workers), peak PSS."""
    import psutil
    import yaml

    from brainlatent.config import params_from_dict
    from brainlatent.data.preprocess import prepare

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    shape = [int(v) for v in args.shapes.split(",")[0].split("x")]
    raw["data"].update(source="manifest", path=str(args.manifest), covariates=[], shape=shape,
                       processed_dir=str(args.processed), workers=args.prepare_workers)
    params = params_from_dict(raw)
    me = psutil.Process()
    cpu0 = me.cpu_times()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        result = prepare(params.data, project_root=root)
        wall = time.perf_counter() - t0
    cpu1 = me.cpu_times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system) + sum(peak.child_cpu.values())
    return {
        "stage": "prepare", "subjects": result.n_accepted,
        "shape": shape, "workers": args.prepare_workers, "wall_s": round(wall, 1),
        "s_per_subject": round(wall / max(1, args.n_prepare), 3),
        "cpu_s": round(cpu, 1), "cores_busy": round(cpu / wall, 2),
        "peak_rss_main_mb": peak_rss_mb(),
        "peak_pss_with_workers_mb": round(peak.peak / 2**20, 1),
        "note": "cpu_s: this process + its workers (sampled every 0.2 s: up to 0.2 s of each worker missed)",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_data_path"))
    ap.add_argument("--shapes", default="64x80x64")
    ap.add_argument("--subjects", default="100,500,1113")
    ap.add_argument("--modes", default="memory,stream")
    ap.add_argument("--workers", default="2", help="comma list of DataLoader worker counts for stream")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--base-channels", type=int, default=4)
    ap.add_argument("--max-channels", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=0, help="measure this many steps and extrapolate (0: all)")
    ap.add_argument("--repeats", type=int, default=1, help="run the modes this many times, interleaved")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--prepare", default="", help="comma list of cohort sizes: time `prepare` on HCP-sized "
                    "phantoms (data.workers = --prepare-workers) instead of training epochs")
    ap.add_argument("--prepare-workers", type=int, default=2)
    ap.add_argument("--distinct", type=int, default=8, help="distinct phantom files behind the --prepare cohort")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prepare-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", help=argparse.SUPPRESS)
    ap.add_argument("--n-prepare", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--processed", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.prepare_child:
        print(json.dumps(prepare_child(args)))
        return 0
    if args.prepare:
        for n in [int(v) for v in args.prepare.split(",")]:
            manifest = make_raw(args.workdir / "raw", n, args.distinct)
            out = args.workdir / f"prepared_{n}"
            cmd = [sys.executable, __file__, "--prepare-child", "--manifest", str(manifest), "--processed", str(out),
                   "--shapes", args.shapes.split(",")[0], "--prepare-workers", str(args.prepare_workers),
                   "--n-prepare", str(n)]
            proc = subprocess.run(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True,
                                  text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            line = proc.stdout.strip().splitlines()[-1]
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(line + "\n")
            if not args.keep:
                import shutil

                shutil.rmtree(out, ignore_errors=True)
        return 0

    for shape_s in args.shapes.split(","):
        shape = tuple(int(v) for v in shape_s.split("x"))
        for n in [int(v) for v in args.subjects.split(",")]:
            folder = args.workdir / f"{shape_s}_{n}"
            t = time.perf_counter()
            make_processed(folder, n, shape)
            print(f"# {folder}: {n} x {shape} ready ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
            runs = [(m, w) for m in args.modes.split(",") for w in (args.workers.split(",") if m == "stream" else [0])]
            runs = runs * args.repeats  # interleaved: a load change on the machine hits every mode
            for mode, workers in runs:
                # Loading a split in memory peaks at ~1.5x its float32 size (the float16 copy beside it): skip it
                # where that would take over half of the memory available now (the machine is shared).
                from brainlatent.data.dataset import available_memory

                need = 1.5 * sum(SPLIT_CYCLE[i % len(SPLIT_CYCLE)] == "train" for i in range(n)) * np.prod(shape) * 4
                if mode == "memory" and need > 0.5 * available_memory():
                    line = json.dumps({"mode": mode, "shape": list(shape), "subjects": n, "skipped":
                                       f"needs ~{need / 2**30:.1f} GiB, available {available_memory() / 2**30:.1f}"})
                    print(line, flush=True)
                    continue
                drop_cache(folder / "volumes.npy")
                env = {**os.environ, "BRAINLATENT_STREAM_WORKERS": str(workers), "OMP_WAIT_POLICY": "PASSIVE"}
                cmd = [sys.executable, __file__, "--child", "--processed", str(folder), "--mode", mode,
                       "--batch-size", str(args.batch_size), "--base-channels", str(args.base_channels),
                       "--max-channels", str(args.max_channels), "--threads", str(args.threads),
                       "--max-steps", str(args.max_steps)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return proc.returncode
                line = proc.stdout.strip().splitlines()[-1]
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(line + "\n")
            if not args.keep:
                import shutil

                shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
