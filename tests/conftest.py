"""Shared fixtures: tiny processed cohorts, real MLflow stores and params on temporary directories."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from brainlatent.config import params_from_dict
from brainlatent.data.cohort import AGE_GROUPS, age_to_group
from brainlatent.grid import Grid

REPO = Path(__file__).resolve().parents[1]
TINY_SHAPE = (16, 16, 16)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny tensors: one intra-op thread is faster than two fighting over a loaded 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """Tests never touch the developer's MLflow store, DVC analytics or a display."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


def tiny_params_dict(**section_overrides) -> dict:
    """The repository's params.yaml shrunk to 16^3 volumes, narrow models and 2 epochs."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["device"] = "cpu"
    raw["data"].update(shape=list(TINY_SHAPE), fov_mm=[160.0, 160.0, 160.0], workers=1)
    raw["synth"].update(n_subjects=16, voxel_mm=6.0, workers=1)
    raw["train"].update(artifact_every=1, n_fixed=2, n_samples=2, system_metrics=False)
    for fam in ("ae", "vae"):
        raw[fam].update(latent_dim=8, hidden=[32], base_channels=4, max_channels=16, epochs=2, batch_size=4)
    raw["gan"].update(latent_dim=8, g_base_channels=4, g_max_channels=16, d_base_channels=4, d_max_channels=16,
                      epochs=2, batch_size=4)
    raw["stylegan"].update(z_dim=8, w_dim=8, n_mapping=2, base_channels=4, max_channels=8, epochs=3,
                           epochs_per_level=1, batch_size=4, mbstd_group_size=2, inversion_steps=20)
    raw["tune"].update(n_trials=2, epochs=1)
    # Tiny cohorts hold fewer evaluation scans than the sample-quality metrics need (metrics/quality.MIN_VOLUMES):
    # evaluate skips them there, so the champion rule of the samplers compares FID instead.
    raw["evaluate"]["champion_metric"] = {"ae": "mse", "vae": "fid", "gan": "fid", "stylegan": "fid"}
    for section, values in section_overrides.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project root (cwd and BRAINLATENT_ROOT) holding a tiny params.yaml."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    monkeypatch.chdir(root)
    monkeypatch.setenv("BRAINLATENT_ROOT", str(root))
    return root


@pytest.fixture
def tiny_params(project):
    return params_from_dict(yaml.safe_load((project / "params.yaml").read_text()))


def write_processed(root: Path, n: int = 24, shape=TINY_SHAPE, seed: int = 0) -> Path:
    """A processed cohort following the data contract: ellipsoid 'brains' whose size follows sex and whose
    dark central 'ventricle' grows with age. Independent of `prepare`, so training tests stand alone."""
    rng = np.random.default_rng(seed)
    out = root / "data" / "processed"
    out.mkdir(parents=True, exist_ok=True)
    grid = Grid.box(shape, (160.0, 160.0, 160.0), (0.0, -18.0, 18.0))
    ii, jj, kk = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    vols, rows = [], []
    for i in range(n):
        sex = "M" if i % 2 else "F"
        age = float(rng.uniform(22, 37))
        radius = (0.62 if sex == "M" else 0.56) + rng.normal(0, 0.02)
        vent = 0.12 + 0.01 * (age - 22)
        r = np.sqrt(ii**2 + (jj / 1.1) ** 2 + kk**2)
        vol = np.clip(1.2 - r / radius, 0, 1) * (r < radius)
        vol = np.where(r < vent, 0.1, vol) + rng.normal(0, 0.01, shape)
        vols.append(np.clip(vol, 0, 1))
        rows.append(
            dict(index=i, subject_id=str(100000 + i), sex=sex, age_group=age_to_group(age), age=age,
                 brain_mask_volume_mm3=float((vol > 0.05).sum() * grid.voxel_volume_mm3),
                 # The ellipsoid's own volume (half-axes radius * 80 mm, x1.1 along y): the ventricle never moves it.
                 etiv_mm3=float(4 / 3 * np.pi * 1.1 * (radius * 80.0) ** 3),
                 # The skull-based head size params.yaml's size control reads (data.covariates, as HCP gives it).
                 FS_IntraCranial_Vol=float(4 / 3 * np.pi * 1.1 * (radius * 80.0) ** 3) * 1.2,
                 split=("train", "train", "val", "test")[i % 4] if i >= 4 else ("train", "val", "test", "train")[i],
                 center_x_mm=0.0, center_y_mm=-18.0, center_z_mm=18.0)
        )
    np.save(out / "volumes.npy", np.stack(vols).astype(np.float16))
    pd.DataFrame(rows).to_csv(out / "subjects.csv", index=False)
    grid.save(out / "grid.json")
    (out / "qc.json").write_text(json.dumps({"counts": {"accepted": n, "rejected": 0}, "rejected": []}))
    assert set(pd.DataFrame(rows).age_group) <= set(AGE_GROUPS)
    return out


@pytest.fixture
def tiny_processed(project) -> Path:
    return write_processed(project)


def blobs(n: int, shape: tuple[int, int, int], seed: int):
    """(n, 1, *shape) soft ellipsoids in [0, 1] with random centres and radii: structured, learnable data."""
    import torch

    g = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    vols = []
    for _ in range(n):
        centre = (torch.rand(3, generator=g) - 0.5) * 0.4
        radius = 0.5 + 0.3 * torch.rand(3, generator=g)
        d2 = sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radius))
        vols.append(torch.sigmoid((1 - d2) * 8))
    return torch.stack(vols)[:, None]
