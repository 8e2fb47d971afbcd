"""Sample-quality metrics (metrics/quality.py): time and memory at the default and research grids, and their
spread between two random halves of the real scans (the real-vs-real null the tests' tolerances rest on).

    python benchmarks/bench_quality.py [--processed data/processed] [--splits 25]

Time: the reference fitted on M real scans, then one ``score`` of 64 volumes. The research grid (64 x 80 x 64,
M = 90) uses the processed volumes resampled to it (the cost depends on sizes only). Null: ``--splits``
random disjoint groups of the processed scans, one in the role of the samples, the other of the reals.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from brainlatent.metrics.quality import QualityReference

NULL_KEYS = ("c2st_auc", "intensity_w1", "tissue_tv", "density", "coverage")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(reals: np.ndarray, samples: np.ndarray) -> str:
    """Wall and CPU seconds (CPU time is what a shared, loaded machine does not inflate as much)."""
    before = _peak_rss_mib()
    w0, c0 = time.perf_counter(), time.process_time()
    ref = QualityReference(reals)
    w1, c1 = time.perf_counter(), time.process_time()
    ref.score(samples, seed=0)
    w2, c2 = time.perf_counter(), time.process_time()
    grid = "x".join(map(str, reals.shape[1:]))
    return (f"| {grid} | {len(reals)} | {len(samples)} | {w1 - w0:.2f} / {c1 - c0:.2f} | {w2 - w1:.2f} / {c2 - c1:.2f} | "
            f"{max(0.0, _peak_rss_mib() - before):.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processed", default="data/processed")
    ap.add_argument("--splits", type=int, default=25)
    ap.add_argument("--sizes", default="16x16,64x24", help="null group sizes, samples x reals, comma-separated")
    ap.add_argument("--skip-null", action="store_true", help="time and memory only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # Only the volumes are needed: read volumes.npy directly (independent of the subjects table's columns).
    volumes = np.load(Path(args.processed) / "volumes.npy").astype(np.float32)
    print(f"# {len(volumes)} processed scans of {volumes.shape[1:]} from {args.processed}")

    print("\n| grid | reals M | samples N | reference s (wall / CPU) | score s (wall / CPU) | peak RSS increase MiB |")
    print("|---|---|---|---|---|---|")
    print(_time(volumes[:24], volumes[24:88]), flush=True)
    zoom = np.array((64, 80, 64)) / np.array(volumes.shape[1:])
    research = np.stack([ndimage.zoom(v, zoom, order=1) for v in volumes[:154]])
    print(_time(research[np.arange(90) % len(research)], research[-64:]), flush=True)
    del research

    if args.skip_null:
        return
    rng = np.random.default_rng(0)
    print(f"\nReal vs real ({args.splits} random disjoint splits): mean +- SD")
    print("\n| samples N x reals M | " + " | ".join(NULL_KEYS) + " |")
    print("|---|" + "---|" * len(NULL_KEYS))
    for size in args.sizes.split(","):
        n, m = map(int, size.split("x"))
        rows = []
        for split in range(args.splits):
            order = rng.permutation(len(volumes))
            out = QualityReference(volumes[order[n : n + m]]).score(volumes[order[:n]], seed=split)
            rows.append([out[k] for k in NULL_KEYS])
        mean, sd = np.mean(rows, axis=0), np.std(rows, axis=0)
        print(f"| {n} x {m} | " + " | ".join(f"{a:.4f} +- {b:.4f}" for a, b in zip(mean, sd)) + " |", flush=True)


if __name__ == "__main__":
    main()
