"""`dvc repro` interrupted in the middle of training resumes from the last checkpoint instead of starting
over: `train@<family>` runs `brainlatent train --resume`, and its checkpoints are not a DVC output, so DVC never
deletes them before re-running the stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_params_dict
from e2e_utils import dvc, make_project, run
from mlflow.tracking import MlflowClient

from brainlatent.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # real DVC subprocesses: ~40 s

EPOCHS = 150  # long enough that the kill lands well before the end, short enough to finish quickly after


def _checkpoint_epoch(path) -> int:
    try:
        return int(load_checkpoint(path)["epoch"])
    except (ValueError, FileNotFoundError):  # not written yet (writes are atomic: never half-read)
        return 0


def test_killed_dvc_repro_resumes_training_from_its_checkpoint(tmp_path):
    params = tiny_params_dict(synth={"n_subjects": 8}, data={"qc_subjects": 2},
                              train={"artifact_every": 10_000}, ae={"epochs": EPOCHS}, tune={"families": []})
    repo, env = make_project(tmp_path / "repo", params)
    dvc(["repro", "tune@ae"], repo, env)  # the upstream stages, so the kill below lands in training
    ckpt = repo / "checkpoints" / "ae" / "last.pt"

    # The whole process group (dvc and the stage it started) dies at once, like a lost machine or a kill -9.
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train@ae"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300  # a safety net against a hung child, not a timing assertion
    while _checkpoint_epoch(ckpt) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _checkpoint_epoch(ckpt)
    assert 3 <= killed_at < EPOCHS, f"the kill should land mid-training (checkpoint at epoch {killed_at})"

    out = run([sys.executable, "-m", "dvc", "repro", "train@ae"], repo, env)
    log = out.stdout + out.stderr
    assert "resuming from epoch" in log, log[-3000:]
    final = load_checkpoint(ckpt)
    assert final["epoch"] == EPOCHS
    assert final["history"][0]["epoch"] == 1 and len(final["history"]) == EPOCHS  # nothing trained twice

    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)  # not the process-wide registry URI
    runs = client.search_runs([client.get_experiment_by_name("brainlatent-train").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run, continued
    assert "up to date" in dvc(["status", "train@ae"], repo, env)  # DVC recorded the resumed stage as done
