"""benchmarks/gpu_check.sh, the prepared GPU check (issue 17 item 3), in its tiny CPU mode: every family's
training step runs, the numbers reach the output folder, and nothing the GPU machine lacks is imported."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FAMILY_MODELS = {"ae-dense", "ae-conv", "vae", "gan", "stylegan"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--allow-cpu", "--tiny", "--simulate-device-env"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def test_tiny_cpu_run_measures_every_family(tiny_run):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    assert results["failures"] == [] and "failures_env" not in results
    assert results["peaks_tflops"]["bf16"] > 0
    rows = [r for r in results["steps"] if r["stage"] == "research"]
    assert {r["model"] for r in rows} == FAMILY_MODELS
    for r in rows:
        assert r["ok"] and r["losses_finite"] and "status" not in r, r
        assert r["step_ms_median"] > 0 and r["volumes_per_s"] > 0 and r["flop_per_step"] > 0, r
        if r["variant"] == "bf16 CL":  # really ran in bf16 (the losses moved), and agrees with fp32
            assert 0 < r["rel_diff_vs_fp32"] <= 0.05, r
    seed = {(r["model"], r["phase"]) for r in results["seed_comparison"]}
    assert seed == {(m, p) for m in ("seed", "ours NCDHW", "ours CL") for p in ("G", "D", "R1")}
    report = (out / "gpu_check.md").read_text()
    assert "| research | stylegan | 8x10x8 | 2 | bf16 CL |" in report and "Seed project's StyleGAN" in report
    assert (out / "gpu_check.log").read_text().strip().endswith(f"results in {out}/")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_refuses_to_run_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr and "--allow-cpu" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_simulated_device_refuses_what_the_gpu_image_lacks(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    gpu_check = importlib.import_module("gpu_check")
    finder = gpu_check.DeviceImageOnly(gpu_check.DEVICE_IMAGE | gpu_check.CARRIED)
    with pytest.raises(ModuleNotFoundError, match="mlflow .* is not on the GPU machine"):
        finder.find_spec("mlflow.tracking", None)
    assert finder.find_spec("monai.metrics", None) is None  # carried as a wheel
    assert finder.find_spec("numpy", None) is None  # in the image
