"""Scale-out on a real PostgreSQL (Debian's, started on 127.0.0.1 by postgres_utils): an MLflow tracking server
with a PostgreSQL backend store that `brainlatent train` and `brainlatent tune` use unchanged through
MLFLOW_TRACKING_URI, and Optuna RDB storage on the same server shared by several tuning workers.

URLs name the driver (``postgresql+psycopg2://``, postgres_utils.DRIVER): SQLAlchemy 2.1 maps a bare
``postgresql://`` to psycopg 3, which is not installed. A developer machine without PostgreSQL (and not root
with apt-get) skips these tests; CI fails instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from brainlatent import tracking
from brainlatent.tracking import redact_url as redact
from brainlatent.tuning import STORAGE_ENV, open_storage

from conftest import tiny_params_dict, write_processed
from e2e_utils import free_port, pipeline_env, run, stop_process_group, wait_healthy
from postgres_utils import DRIVER, ROLE, find_or_install_postgres, start_postgres, stop_and_remove

CLI = str(Path(sys.executable).parent / "brainlatent")  # the console script a user types


def _unavailable(why: str):
    """Skip on a developer machine; on CI (CI=true) the PostgreSQL tests must run, so fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL tests cannot run on CI: {why}")
    pytest.skip(f"PostgreSQL tests need {why}")


@pytest.fixture(scope="module")
def postgres():
    try:
        import psycopg2  # noqa: F401  (pyproject's test extra)
    except ImportError as err:
        _unavailable(f"psycopg2 (pip install -e '.[test]'): {err}")
    bindir, why = find_or_install_postgres()
    if bindir is None:
        _unavailable(why)
    server = start_postgres(bindir)
    try:
        yield server
    finally:
        stop_and_remove(server)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """`mlflow server` with its backend store in PostgreSQL and artifacts proxied to a local folder."""
    base = tmp_path_factory.mktemp("mlflow-server")
    artifacts = base / "artifacts"
    backend = postgres.create_database("mlflow")
    port = free_port()
    log = (base / "server.log").open("w")
    # The backend URL (with its password) through the environment, as the docs say: not in the process list.
    # No job runner: it serves MLflow's GenAI features (seven extra processes that slow start and stop).
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", str(artifacts),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(f"{url}/health", proc)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{(base / 'server.log').read_text()[-4000:]}") from None
        yield url, artifacts
        assert postgres.password not in (base / "server.log").read_text(), "the server logged its backend password"
    finally:
        stop_process_group(proc)
        log.close()


def _project(root: Path, **tune) -> Path:
    """A tiny project (params.yaml + processed data): what one lab machine holds."""
    root.mkdir(parents=True)
    raw = tiny_params_dict(tune={"families": ["ae"], "epochs": 1, "pruner": "none", **tune})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    write_processed(root, n=12)
    return root


def _no_local_store(project: Path) -> None:
    left = [p.name for p in (project / "mlflow.db", project / "mlartifacts", project / "optuna.db") if p.exists()]
    assert not left, f"{project} has a local store {left}: the remote one was not used"


def test_training_logs_and_registers_on_the_postgres_tracking_server(postgres, mlflow_server, tmp_path):
    url, artifacts = mlflow_server
    project = _project(tmp_path / "project")
    env = {**pipeline_env(project), "MLFLOW_TRACKING_URI": url}
    out = run([CLI, "train", "--model", "ae"], project, env, timeout=300).stdout
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", out).group(1)

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.data.tags["model"] == "ae"
    assert client.get_experiment(logged.info.experiment_id).name == tracking.TRAIN_EXPERIMENT
    assert logged.data.params["ae.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "val/mse")] == [1, 2]
    candidate = client.get_model_version_by_alias("brainlatent-ae", "candidate")
    assert candidate.run_id == run_id and candidate.version == "1"
    # The rows are in PostgreSQL and the artifacts went through the server to its destination.
    assert postgres.query("mlflow", "SELECT run_uuid, status FROM runs") == [(run_id, "FINISHED")]
    assert postgres.query("mlflow", "SELECT name, version FROM model_versions") == [("brainlatent-ae", 1)]
    assert list(artifacts.rglob("*.nii.gz")) and list(artifacts.rglob("montage.png"))
    _no_local_store(project)


def test_tuning_workers_share_one_postgres_study_without_leaking_the_password(postgres, mlflow_server, tmp_path):
    url, _ = mlflow_server
    storage = postgres.create_database("optuna")
    assert postgres.password in storage
    # Workers on several machines: create Optuna's schema once first, as docs/scaling.md says. Workers that
    # create it concurrently on a fresh database race (duplicate key in pg_type); on one machine a lock file
    # serialises them, across machines nothing does.
    optuna.storages.RDBStorage(storage)

    # Three workers, each in its own project copy (no shared lock file or folder: as on separate machines),
    # same code, params and data, one study in PostgreSQL and one MLflow server.
    n_trials, n_workers = 5, 3
    space = {"ae": {"lr": {"low": 1e-3, "high": 4e-3}}}
    projects = [_project(tmp_path / f"machine{i}", n_trials=n_trials, space=space) for i in range(n_workers)]
    workers = []
    for project in projects:
        env = {**pipeline_env(project), "MLFLOW_TRACKING_URI": url, STORAGE_ENV: storage}
        workers.append(subprocess.Popen([CLI, "tune", "--model", "ae"], cwd=project, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [w.communicate(timeout=400)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-4000:]
        assert postgres.password not in out, "a worker printed the storage password"

    summaries = [json.loads((p / "tuned" / "ae.json").read_text()) for p in projects]
    assert len({s["study"] for s in summaries}) == 1
    study = optuna.load_study(study_name=summaries[0]["study"], storage=storage)
    trials = study.get_trials()
    numbers = sorted(t.number for t in trials)
    # At least n_trials, at most one extra per other worker (trials in flight), none lost or repeated.
    assert n_trials <= len(trials) <= n_trials + n_workers - 1 and numbers == list(range(len(trials)))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    parent_id = study.user_attrs["brainlatent.mlflow_parent_run_id"]
    experiment = client.get_experiment_by_name(tracking.TUNE_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == numbers
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    assert all(r.info.status == "FINISHED" and "objective" in r.data.metrics for r in children)
    assert {r.info.run_id for r in runs} == {parent_id} | {r.info.run_id for r in children}

    # The password is in no param, tag or text artifact of any tuning run; the storage tag is the redacted URL.
    parent = client.get_run(parent_id)
    assert parent.data.tags["optuna.storage"] == redact(storage) and ":***@" in redact(storage)
    for r in runs:
        for key, value in {**r.data.params, **r.data.tags}.items():
            assert postgres.password not in f"{key}={value}", f"run {r.info.run_id} logs {key} with the password"
    local = Path(client.download_artifacts(parent_id, "", str(tmp_path / "parent-artifacts")))
    texts = [p for p in local.rglob("*") if p.suffix in (".json", ".csv", ".txt")]
    assert {"tuned.json", "trials.csv"} <= {p.name for p in texts}
    assert not [p.name for p in texts if postgres.password in p.read_text()]
    for project in projects:
        _no_local_store(project)


def test_storage_url_without_password_reads_libpq_password_file(postgres, tmp_path, monkeypatch):
    """The docs' alternative to a password in the URL: libpq's password file (~/.pgpass or $PGPASSFILE)."""
    postgres.create_database("optuna_pgpass")
    url = f"{DRIVER}://{ROLE}@127.0.0.1:{postgres.port}/optuna_pgpass"
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "missing"))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(ValueError, match=rf"Optuna storage {re.escape(url)} .* cannot be opened"):
        open_storage(url)
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{postgres.port}:optuna_pgpass:{ROLE}:{postgres.password}\n")
    pgpass.chmod(0o600)  # libpq ignores a password file that others can read
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    optuna.create_study(study_name="pgpass", storage=open_storage(url))
    assert postgres.query("optuna_pgpass", "SELECT study_name FROM studies") == [("pgpass",)]
