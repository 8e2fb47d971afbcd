"""Which autoencoder design, trained how long, keeps the cohort's anatomy: conv vs dense vs linear, AE vs
VAE, against PCA and the scans themselves.

For each design: train on the train split with the pipeline's own task and loop, then on the held-out
(val + test) scans report the reconstruction MSE, the correlation of the ventricle volume measured on the
reconstruction with the one measured on the scan, held-out AUCs of a logistic probe (standardised
latents, C = 0.1, fitted on the train split) for sex and young/old, and how much of each planted effect the
held-out reconstructions keep: the voxel-wise linear model reconstruction ~ sex + brain volume + age group
(``effect_maps``) correlated with the planted age map and the planted local (size-independent) sex map. A
latent direction can only render what the reconstructions keep. Needs a prepared synthetic cohort:

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

import pandas as pd

from brainlatent.anatomy import atlas_on_grid, load_effect_map, measure_volumes
from brainlatent.config import load_params
from brainlatent.data.dataset import ProcessedData
from brainlatent.directions.groundtruth import effect_maps, map_correlation
from brainlatent.directions.targets import brain_volume, target_labels
from brainlatent.train.device import seed_everything
from brainlatent.train.loop import LoopConfig, run_loop
from brainlatent.train.runner import make_task

DESIGNS = {  # name -> (family, overrides of params.yaml)
    "conv AE, 20 epochs": ("ae", {"ae.arch": "conv", "ae.epochs": 20}),
    "conv AE, 60 epochs": ("ae", {"ae.arch": "conv", "ae.epochs": 60}),
    "dense AE [256], 20 epochs": ("ae", {"ae.arch": "dense", "ae.hidden": [256], "ae.epochs": 20}),
    "dense AE [256], 40 epochs (default)": ("ae", {"ae.arch": "dense", "ae.hidden": [256], "ae.epochs": 40}),
    "dense AE [256], 60 epochs": ("ae", {"ae.arch": "dense", "ae.hidden": [256], "ae.epochs": 60}),
    "linear AE, 40 epochs": ("ae", {"ae.arch": "dense", "ae.hidden": [], "ae.epochs": 40}),
    "dense VAE [256], 20 epochs": ("vae", {"vae.arch": "dense", "vae.hidden": [256], "vae.epochs": 20}),
    "dense VAE [256], 50 epochs (default)": ("vae", {"vae.arch": "dense", "vae.hidden": [256], "vae.epochs": 50}),
}


def probe_auc(z: np.ndarray, y: np.ndarray, train: np.ndarray) -> float:
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced"))
    probe.fit(z[train], y[train])
    return float(roc_auc_score(y[~train], probe.decision_function(z[~train])))


def planted_fidelity(volumes: np.ndarray, data: ProcessedData, rows: np.ndarray) -> dict[str, float]:
    """r of the age and the size-controlled sex coefficient maps of ``volumes[rows]`` with the planted maps."""
    if data.ground_truth_dir is None:
        raise SystemExit(f"{data.root}: no ground_truth/ (planted effect maps); use the synthetic cohort")
    subjects = data.subjects.iloc[np.flatnonzero(rows)]
    size = brain_volume(subjects)[:, 0]
    design = pd.DataFrame({"sex": target_labels(subjects, "sex"), "size": (size - size.mean()) / size.std(),
                           "age": target_labels(subjects, "age_group")})
    maps = effect_maps(volumes[rows], design)
    mask = atlas_on_grid(data.grid).brain > 0.5
    planted = {k: load_effect_map(data.ground_truth_dir / f"{k}_effect.nii.gz", data.grid) for k in ("age", "sex_local")}
    return {"age_map_r": map_correlation(maps["age"], planted["age"], mask),
            "local_sex_map_r": map_correlation(maps["sex"], planted["sex_local"], mask)}


def scores(recon: np.ndarray, latents: np.ndarray | None, data: ProcessedData, train: np.ndarray) -> dict[str, float]:
    scans = np.asarray(data.volumes, np.float32)
    held = ~train
    truth, rec = measure_volumes(scans[held], data.grid), measure_volumes(recon[held].clip(0, 1), data.grid)
    out = {
        "heldout_mse": float(((recon[held] - scans[held]) ** 2).mean()),
        "ventricle_r": float(np.corrcoef(truth["ventricle_volume_mm3"], rec["ventricle_volume_mm3"])[0, 1]),
        **planted_fidelity(recon, data, held),
    }
    if latents is not None:
        out["sex_auc"] = probe_auc(latents, target_labels(data.subjects, "sex"), train)
        out["young_old_auc"] = probe_auc(latents, target_labels(data.subjects, "age_old"), train)
    return out


def run_design(family: str, overrides: dict, params_path: Path, data: ProcessedData,
               train: np.ndarray) -> dict[str, float]:
    params = load_params(params_path, overrides)
    cfg = params.family(family)
    seed_everything(params.seed)
    x = torch.from_numpy(np.asarray(data.volumes, np.float32))[:, None]
    task = make_task(family, params, data.grid.shape, torch.device("cpu"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_loop(task, x[train], x[~train][:8], LoopConfig(
            epochs=cfg.epochs, batch_size=cfg.batch_size, seed=params.seed, checkpoint=Path(tmp) / "c.pt"))
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
    scans = np.asarray(data.volumes, np.float32)
    rows = {"the scans themselves (ceiling)": scores(scans, None, data, train)}
    scans = scans.reshape(len(train), -1)
    for k in (8, 64):  # PCA fitted on the train split: what any autoencoder should at least match
        pca = PCA(k, random_state=0).fit(scans[train])
        recon = pca.inverse_transform(pca.transform(scans)).reshape(np.asarray(data.volumes).shape)
        rows[f"PCA {k}"] = scores(recon, pca.transform(scans), data, train)
    for name in args.designs:
        rows[name] = run_design(*DESIGNS[name], args.params, data, train)
        print(name, json.dumps({k: round(v, 4) for k, v in rows[name].items()}), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{int(train.sum())} train / {int((~train).sum())} held-out scans, grid {data.grid.shape}")
    print("| design | held-out MSE | ventricle r | age map r | local sex map r | sex AUC | young/old AUC | train s |\n"
          "|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for name, r in rows.items():
        print(f"| {name} | {r['heldout_mse']:.4f} | {r['ventricle_r']:.2f} | {r['age_map_r']:.2f} | "
              f"{r['local_sex_map_r']:.2f} | {r.get('sex_auc', nan):.2f} | {r.get('young_old_auc', nan):.2f} | "
              f"{r.get('train_seconds', nan):.0f} |")


if __name__ == "__main__":
    main()
