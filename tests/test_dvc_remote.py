"""A team shares the data through a DVC remote: `dvc push` from one checkout, `dvc pull` into a fresh
`git clone`, and the processed volumes arrive byte-identical with the pipeline up to date. The remote is a
folder (a shared-filesystem remote, as on a lab NAS); S3-compatible remotes use the same commands."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_params_dict
from e2e_utils import dvc, make_project, run

pytestmark = pytest.mark.slow  # real DVC subprocesses: ~30 s

# Only the two cheap stages run: 8 synthetic subjects, 16^3 volumes.
STAGES = ("synthesize", "prepare")
PARAMS = tiny_params_dict(synth={"n_subjects": 8}, data={"qc_subjects": 2})


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(repo, remote, env): the two stages run, committed and pushed to a local-folder default remote."""
    base = tmp_path_factory.mktemp("dvc-remote")
    repo, env = make_project(base / "repo", PARAMS)
    dvc(["repro", *STAGES], repo, env)
    remote = base / "remote"
    dvc(["remote", "add", "-d", "storage", str(remote)], repo, env)
    run(["git", "add", "-A"], repo, env)  # dvc.lock, .dvc/config and the .gitignore files DVC wrote
    run(["git", "commit", "-qm", "data"], repo, env)
    dvc(["push", *STAGES], repo, env)
    return repo, remote, env


def test_push_fills_the_remote_and_it_is_in_sync(pushed):
    repo, remote, env = pushed
    assert (repo / "data" / "processed" / "volumes.npy").is_file()
    cached = [p for p in (remote / "files" / "md5").rglob("*") if p.is_file()]  # DVC 3 remote layout
    assert cached, f"nothing was pushed to {remote}"
    assert json.loads(dvc(["status", "--cloud", "--json", *STAGES], repo, env)) == {}


def test_fresh_clone_pulls_identical_data_and_is_up_to_date(pushed, tmp_path):
    repo, remote, env = pushed
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    clone_env = {**env, "BRAINLATENT_ROOT": str(clone)}
    assert not (clone / "data" / "processed").exists()  # outputs are not in git
    assert not (clone / ".dvc" / "cache").exists()  # nor the cache: everything must come from the remote
    dvc(["pull", *STAGES], clone, clone_env)

    for out in ("data/processed", "data/raw/synthetic"):
        original, pulled = digests(repo / out), digests(clone / out)
        assert pulled == original, f"{out} differs after dvc pull"
    assert "volumes.npy" in digests(clone / "data" / "processed")
    # Deps, params and outputs all match dvc.lock: a `dvc repro` of these stages would run nothing.
    assert json.loads(dvc(["status", "--json", *STAGES], clone, clone_env)) == {}
    out = dvc(["repro", *STAGES], clone, clone_env)
    assert "Running stage" not in out, out


def test_pull_of_data_never_pushed_names_the_missing_files(pushed, tmp_path):
    """A teammate's clone cannot pull what was never pushed: DVC fails and says which output is missing."""
    repo, _, env = pushed
    empty = tmp_path / "empty-remote"
    empty.mkdir()
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    dvc(["remote", "modify", "--local", "storage", "url", str(empty)], clone, env)
    proc = subprocess.run([sys.executable, "-m", "dvc", "pull", *STAGES], cwd=clone, env=env, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "failed to pull" in said and "data/processed" in said, said


def test_credentials_set_with_local_go_to_an_ignored_file(pushed, tmp_path):
    """`dvc remote modify --local` writes .dvc/config.local, which git ignores: keys never get committed."""
    repo, _, env = pushed
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    dvc(["remote", "add", "lab-s3", "s3://lab-bucket/brainlatent"], clone, env)
    dvc(["remote", "modify", "lab-s3", "endpointurl", "https://s3.lab.example.org"], clone, env)
    dvc(["remote", "modify", "--local", "lab-s3", "access_key_id", "AKIAEXAMPLE"], clone, env)
    dvc(["remote", "modify", "--local", "lab-s3", "secret_access_key", "not-a-real-secret"], clone, env)
    assert "not-a-real-secret" in (clone / ".dvc" / "config.local").read_text()
    assert "not-a-real-secret" not in (clone / ".dvc" / "config").read_text()
    assert "endpointurl = https://s3.lab.example.org" in (clone / ".dvc" / "config").read_text()
    run(["git", "check-ignore", "-q", ".dvc/config.local"], clone, env)  # exits 1 if not ignored
    status = run(["git", "status", "--porcelain", "--ignored=no"], clone, env).stdout
    assert "config.local" not in status and ".dvc/config" in status
