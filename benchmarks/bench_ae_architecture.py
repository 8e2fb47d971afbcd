"""Which autoencoder design keeps the cohort's anatomy: conv vs dense vs linear, against PCA.

For each design: train on the train split with the pipeline's own task and loop, then on the held-out
(val + test) scans report the reconstruction MSE, the correlation of the ventricle volume measured on the
reconstruction with the one measured on the scan, and held-out AUCs of a logistic probe (standardised
latents, C = 0.1, fitted on the train split) for sex and young/old. Needs a prepared cohort:

    brainlatent synth && brainlatent prepare          # or: dvc repro prepare
    python benchmarks/bench_ae_architecture.py --processed data/processed
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainlatent.anatomy import measure_volumes
from brainlatent.config import load_params
from brainlatent.data.dataset import ProcessedData
from brainlatent.directions.targets import target_labels
from brainlatent.train.device import seed_everything
from brainlatent.train.loop import LoopConfig, run_loop
from brainlatent.train.runner import make_task

DESIGNS = {  # name -> ae.* overrides
    "conv (20 epochs)": {"ae.arch": "conv"},
    "conv (60 epochs)": {"ae.arch": "conv", "ae.epochs": 60},
    "dense [256] (default)": {"ae.arch": "dense", "ae.hidden": [256]},
    "linear (hidden [])": {"ae.arch": "dense", "ae.hidden": []},
}


def probe_auc(z: np.ndarray, y: np.ndarray, train: np.ndarray) -> float:
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced"))
    probe.fit(z[train], y[train])
    return float(roc_auc_score(y[~train], probe.decision_function(z[~train])))


def scores(recon: np.ndarray, latents: np.ndarray, data: ProcessedData, train: np.ndarray) -> dict[str, float]:
    scans = np.asarray(data.volumes, np.float32)
    held = ~train
    truth, rec = measure_volumes(scans[held], data.grid), measure_volumes(recon[held].clip(0, 1), data.grid)
    return {
        "heldout_mse": float(((recon[held] - scans[held]) ** 2).mean()),
        "ventricle_r": float(np.corrcoef(truth["ventricle_volume_mm3"], rec["ventricle_volume_mm3"])[0, 1]),
        "sex_auc": probe_auc(latents, target_labels(data.subjects, "sex"), train),
        "young_old_auc": probe_auc(latents, target_labels(data.subjects, "age_old"), train),
    }


def run_design(overrides: dict, params_path: Path, data: ProcessedData, train: np.ndarray) -> dict[str, float]:
    params = load_params(params_path, overrides)
    seed_everything(params.seed)
    x = torch.from_numpy(np.asarray(data.volumes, np.float32))[:, None]
    task = make_task("ae", params, data.grid.shape, torch.device("cpu"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_loop(task, x[train], x[~train][:8], LoopConfig(
            epochs=params.ae.epochs, batch_size=params.ae.batch_size, seed=params.seed, checkpoint=Path(tmp) / "c.pt"))
    seconds = time.perf_counter() - t0
    model = task.model.eval()
    with torch.no_grad():
        z = torch.cat([model.encode(task.prepare_batch(x[i : i + 32])) for i in range(0, len(x), 32)])
        recon = torch.cat([model.decode(z[i : i + 32]) for i in range(0, len(z), 32)])[:, 0].numpy()
    return {**scores(recon, z.numpy(), data, train), "train_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processed", type=Path, default=Path("data/processed"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--designs", nargs="*", default=list(DESIGNS), choices=list(DESIGNS))
    args = ap.parse_args()
    data = ProcessedData.open(args.processed)
    train = data.subjects["split"].to_numpy() == "train"
    rows = {}
    scans = np.asarray(data.volumes, np.float32).reshape(len(train), -1)
    for k in (8, 64):  # PCA fitted on the train split: what any autoencoder should at least match
        pca = PCA(k, random_state=0).fit(scans[train])
        recon = pca.inverse_transform(pca.transform(scans)).reshape(np.asarray(data.volumes).shape)
        rows[f"PCA {k}"] = scores(recon, pca.transform(scans), data, train)
    for name in args.designs:
        rows[name] = run_design(DESIGNS[name], args.params, data, train)
        print(name, json.dumps({k: round(v, 4) for k, v in rows[name].items()}), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{int(train.sum())} train / {int((~train).sum())} held-out scans, grid {data.grid.shape}")
    print("| design | held-out MSE | ventricle r | sex AUC | young/old AUC | train s |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['heldout_mse']:.4f} | {r['ventricle_r']:.2f} | {r['sex_auc']:.2f} | "
              f"{r['young_old_auc']:.2f} | {r.get('train_seconds', float('nan')):.0f} |")


if __name__ == "__main__":
    main()
