"""A tracking store that does not answer is a user's problem to fix, not a crash: every command that uses MLflow
prints one `error: ...` line naming the store and exits 2, as `brainlatent` does for other user mistakes.

Each command runs once as a user runs it (the console script, in a subprocess) against a free localhost port.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import typer

from brainlatent.cli import app
from e2e_utils import assert_one_error_line, free_port, stop_process_group, wait_healthy

CLI = Path(sys.executable).parent / "brainlatent"

# Every command that opens the MLflow store, with arguments that get it as far as the store.
# evaluate/directions name a version (else a missing trained/<family>.json is the first error); traverse needs an
# existing input file.
TRACKED = {
    "registry": [],
    "show": ["models:/brainlatent-vae@champion"],
    "traverse": ["--model-uri", "models:/brainlatent-vae@champion", "--input", "scan.nii.gz",
                 "--direction", "age_old", "--out", "traversal"],
    "train": ["--model", "vae"],
    "tune": ["--model", "vae"],
    "featurenet": [],
    "evaluate": ["--model", "vae", "--model-uri", "models:/brainlatent-vae/1"],
    "directions": ["--model", "vae", "--model-uri", "models:/brainlatent-vae/1"],
    "report": [],
    "ui": ["--port", "1"],  # never bound: the store check comes first
}
# Commands that never touch MLflow: the synthetic cohort, the positive-control cohort (data/plant.py) and
# preprocessing write files only.
UNTRACKED = {"synth", "plant", "prepare"}


def _run(args: list[str], cwd: Path, env_uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": env_uri}
    return subprocess.run([str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_every_command_is_classified():
    """A new command must be added to TRACKED (and so tested below) or to UNTRACKED."""
    commands = set(typer.main.get_command(app).commands)
    assert not commands - set(TRACKED) - UNTRACKED, f"unclassified commands: {sorted(commands - set(TRACKED))}"
    assert set(TRACKED) <= commands, f"TRACKED names commands that are gone: {sorted(set(TRACKED) - commands)}"


@pytest.mark.slow  # ten interpreters, each importing torch and MLflow
def test_every_tracked_command_says_the_server_is_down_in_one_line(project):
    (project / "scan.nii.gz").write_bytes(b"")  # exists: traverse checks the input before the store
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = dict(zip(TRACKED, pool.map(lambda name: _run([name, *TRACKED[name]], project, uri), TRACKED)))
    for name, proc in procs.items():
        assert_one_error_line(proc, f"brainlatent {name}",
                               f"MLflow tracking server {uri} (from MLFLOW_TRACKING_URI) is unreachable")
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()


@pytest.mark.slow  # starts a real `mlflow server`
def test_ui_on_a_reachable_tracking_server_points_there(project, tmp_path):
    """`brainlatent ui` serves a SQLite or database store; for a tracking server it says where its UI is."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server)
        proc = _run(["ui", "--port", "1"], project, f"http://127.0.0.1:{port}")
    finally:
        stop_process_group(server)
    assert_one_error_line(proc, "brainlatent ui", f"is the tracking server http://127.0.0.1:{port}: open its UI")


@pytest.mark.parametrize("uri, expected", [
    ("postgresql+psycopg2://user:secret@127.0.0.1:{port}/mlflow", "is unreachable at 127.0.0.1:{port}"),
    # SQLAlchemy 2 reads a bare postgresql:// as psycopg 3, which the project does not install (docs/scaling.md)
    ("postgresql://user:secret@127.0.0.1:{port}/mlflow", "needs a database driver that is not installed"),
])
def test_a_database_store_that_is_down_or_has_no_driver_is_one_line(project, uri, expected):
    port = free_port()
    proc = _run(["registry"], project, uri.format(port=port))
    assert_one_error_line(proc, "brainlatent registry", expected.format(port=port))
    assert "secret" not in proc.stdout + proc.stderr  # the password never reaches a message
