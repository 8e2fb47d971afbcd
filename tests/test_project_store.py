"""Where the project, its MLflow store and its outputs are found: from a subfolder (a notebook kernel), from
outside the project, inside a DVC stage and inside DVC's temporary workspace of a queued experiment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from brainlatent import registry, tracking
from brainlatent.models.base import build_model


def test_project_root_is_found_upwards_and_respects_overrides(project, monkeypatch, tmp_path):
    (project / "dvc.yaml").write_text("stages: {}\n")
    sub = project / "notebooks" / "deeper"
    sub.mkdir(parents=True)
    monkeypatch.delenv("BRAINLATENT_ROOT")
    monkeypatch.chdir(sub)
    assert tracking.project_root() == project
    monkeypatch.setenv("BRAINLATENT_ROOT", str(tmp_path))
    assert tracking.project_root() == tmp_path.resolve()
    # DVC runs a stage in its workspace: that is where its outputs must go, whatever BRAINLATENT_ROOT says.
    monkeypatch.setenv("DVC_STAGE", "train@ae")
    assert tracking.project_root() == sub.resolve()


def test_a_queued_experiments_workspace_shares_the_projects_store(tmp_path):
    repo = tmp_path / "repo"
    workspace = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    assert tracking.store_root(workspace) == repo.resolve()
    assert tracking.store_root(workspace / "src") == repo.resolve()
    assert tracking.store_root(repo) == repo.resolve()
    assert tracking.tracking_uri(workspace) == f"sqlite:///{repo.resolve() / 'mlflow.db'}"


def _lookup(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """README's one-line look-up in a fresh interpreter (what a notebook kernel started in ``cwd`` runs)."""
    code = ("from brainlatent.registry import load_model\n"
            "m = load_model('models:/brainlatent-ae@candidate')\n"
            "print('loaded', m.name, m.version, type(m.model).__name__)")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_load_model_works_from_a_subfolder_and_never_creates_a_store(project, tmp_path):
    (project / "dvc.yaml").write_text("stages: {}\n")
    tracking.configure(project)
    model = build_model("ae", {"latent_dim": 4, "volume_shape": [16, 16, 16], "hidden": [8]})
    with mlflow.start_run(experiment_id=tracking.experiment_id("lookup", project)):
        registry.log_and_register(model, "ae", model.config_dict(), {})
    env = {k: v for k, v in os.environ.items()
           if k not in ("BRAINLATENT_ROOT", "MLFLOW_TRACKING_URI", "DVC_STAGE", "DVC_ROOT")}

    notebooks = project / "notebooks"
    notebooks.mkdir()
    found = _lookup(notebooks, env)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.startswith("loaded brainlatent-ae 1 ")
    assert not (notebooks / "mlflow.db").exists() and not (notebooks / "mlruns").exists()

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    lost = _lookup(outside, env)
    assert lost.returncode != 0
    assert f"no MLflow store at {outside.resolve() / 'mlflow.db'}" in lost.stderr
    assert "BRAINLATENT_ROOT" in lost.stderr
    assert list(outside.iterdir()) == []  # nothing created as a side effect
    assert _lookup(outside, {**env, "BRAINLATENT_ROOT": str(project)}).returncode == 0


@pytest.mark.parametrize("env_name", ["DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"])
def test_runs_inside_a_dvc_experiment_are_tagged_with_it(tiny_processed, project, monkeypatch, env_name):
    monkeypatch.setenv(env_name, "value-1")
    tags = tracking.lineage_tags("data/processed", project)
    assert tags[tracking.DVC_EXPERIMENT_ENV[env_name]] == "value-1"
