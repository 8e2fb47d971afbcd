"""What buys brains: sample quality of a GAN family trained with given settings, at a known cost.

Trains ``--family`` (gan | stylegan) on a prepared project's training split exactly as ``train@<family>`` does
(the same task, loop, seed and schedule; no MLflow, no tuning: the params.yaml values plus ``--set``), then
draws 64 EMA samples and scores them with metrics/quality.py against the validation split, beside the
real-vs-real floor (64 training scans), as ``evaluate@<family>`` does. One JSON line per run on stdout and
appended to ``--out``; ``--samples`` saves the first 8 samples (.pt) to look at.

Run (on a project where ``brainlatent synth`` and ``brainlatent prepare`` have run, e.g. one made by
bench_pipeline.py ``--keep``)::

    python benchmarks/bench_adversarial_quality.py --project DIR --family gan --set gan.epochs=24 --set gan.r1_gamma=1

Training time is wall time of this process: compare settings measured under the same load, or read the
epoch count (the cost of an epoch is in BENCHMARKS.md, "Adversarial steps").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from brainlatent.config import load_params
from brainlatent.data.dataset import ProcessedData
from brainlatent.evaluation import floor_scans, generate
from brainlatent.metrics.quality import QualityReference
from brainlatent.train.loop import LoopConfig, run_loop
from brainlatent.train.runner import make_task

N_SAMPLES = 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, required=True, help="holds params.yaml and data/processed")
    parser.add_argument("--family", choices=("gan", "stylegan"), required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="append the JSON line here too")
    parser.add_argument("--samples", type=Path, help="save the first 8 samples here (.pt)")
    args = parser.parse_args()

    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE, e.g. gan.epochs=24")
        overrides[key] = yaml.safe_load(value)
    params = load_params(args.project / "params.yaml", overrides=overrides)
    cfg = params.family(args.family)
    torch.manual_seed(params.seed)
    data = ProcessedData.open(args.project / params.data.processed_dir)
    train, val = data.load_split("train"), data.load_split("val")
    task = make_task(args.family, params, train.shape[2:], torch.device("cpu"))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=params.seed, checkpoint=Path(tmp) / "c.pt")
        history = run_loop(task, train, val, loop).history
    train_s = time.perf_counter() - started

    model = task.model.eval()
    samples = generate(model, N_SAMPLES, seed=params.seed)
    reference = QualityReference(val, seed=params.seed)
    quality = reference.score(samples, seed=params.seed)
    floor = reference.score(floor_scans(data, N_SAMPLES, params.seed), seed=params.seed)
    row = {
        "family": args.family, "set": args.overrides, "epochs": cfg.epochs, "train_s": round(train_s, 1),
        "n_train": len(train), "n_val": len(val),
        **{k: round(quality[k], 4) for k in ("intensity_w1", "coverage", "density", "c2st_auc", "tissue_tv")},
        "floor_real_intensity_w1": round(floor["intensity_w1"], 4),
        "val/proxy": round(history[-1].get("val/proxy", float("nan")), 5),
    }
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")
    if args.samples:
        torch.save(samples[:8], args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
