"""End to end: the real dvc.yaml in a temporary git repository, run with the real DVC on a tiny configuration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_params_dict

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture
def dvc_repo(tmp_path) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "BRAINLATENT_ROOT": str(repo),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    _run(["git", "init", "-q"], repo, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def test_dvc_repro_prepare_on_tiny_config(dvc_repo):
    repo, env = dvc_repo
    _run([sys.executable, "-m", "dvc", "repro", "prepare"], repo, env)
    processed = repo / "data" / "processed"
    for name in ("volumes.npy", "subjects.csv", "grid.json", "qc.json", "qc_montage.png"):
        assert (processed / name).is_file(), name
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {"synthesize", "prepare"} <= set(lock["stages"])
    qc = json.loads((processed / "qc.json").read_text())
    assert qc["counts"]["accepted"] == 16 and qc["rejected"] == []

    # Nothing changed: DVC must not re-run anything.
    status = _run([sys.executable, "-m", "dvc", "status", "prepare"], repo, env).stdout
    assert "changed" not in status
