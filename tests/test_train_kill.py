"""A training killed with SIGKILL resumes from its last checkpoint into the same MLflow run and ends with the
weights of an uninterrupted run; kills at the awkward moments (while a checkpoint is written, between a
checkpoint and its MLflow metrics, after the last checkpoint) lose nothing either."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_SHAPE, blobs, tiny_params_dict, write_processed
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from brainlatent.cli import app
from brainlatent.config import params_from_dict
from brainlatent.train.checkpoint import load_checkpoint, save_atomic
from brainlatent.train.loop import LoopConfig, run_loop
from brainlatent.train.runner import make_task, train_family

EPOCHS = 4


def _project(root: Path, **overrides) -> Path:
    root.mkdir(parents=True)
    raw = tiny_params_dict(**overrides)
    raw["ae"]["epochs"] = EPOCHS
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    write_processed(root)
    return root


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "BRAINLATENT_ROOT": str(root), "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1"}


def _logged_steps(db: Path, other_than: str) -> list[int]:
    """Epochs the training process has logged so far, read straight from the project's MLflow SQLite file."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            rows = con.execute(
                "SELECT step FROM metrics WHERE key = 'time/epoch_seconds' AND run_uuid != ?", (other_than,)
            )
            return [r[0] for r in rows]
    except sqlite3.OperationalError:  # the writer holds the lock
        return []


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_into_the_same_run_with_identical_weights(tmp_path, monkeypatch, caplog):
    # No artifacts before the last epoch: the killed process spends its time training, not logging.
    root = _project(tmp_path / "project", train={"artifact_every": 100})
    monkeypatch.chdir(root)
    monkeypatch.setenv("BRAINLATENT_ROOT", str(root))
    params = params_from_dict(yaml.safe_load((root / "params.yaml").read_text()))

    # The reference: the same training without a kill (its own checkpoint folder; in this process, which
    # also runs one thread). It also creates the MLflow store, so the killed process starts faster.
    ref_params = dataclasses.replace(params, train=dataclasses.replace(params.train, checkpoint_dir="ref"))
    ref = train_family("ae", ref_params, register=False)

    log = tmp_path / "killed.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "brainlatent.cli", "train", "--model", "ae"],
            cwd=root, env=_env(root), stdout=fh, stderr=subprocess.STDOUT,
        )
    ckpt_path = root / "checkpoints" / "ae" / "last.pt"
    deadline = time.monotonic() + 300  # a safety net against a hung child, not a timing assertion
    # Epoch 1 checkpointed and logged: the process is now inside epoch 2.
    while not (ckpt_path.is_file() and 1 in _logged_steps(root / "mlflow.db", ref.run_id)):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL

    ckpt = load_checkpoint(ckpt_path)
    at_kill, run_id = ckpt["epoch"], ckpt["run_id"]
    assert 1 <= at_kill < EPOCHS  # killed before the end
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL: nobody closed it

    with caplog.at_level(logging.INFO, logger="brainlatent"):
        out = CliRunner().invoke(app, ["train", "--model", "ae", "--resume"])
    assert out.exit_code == 0, out.output
    assert f"MLflow run {run_id}" in out.output
    assert f"resuming from epoch {at_kill}" in caplog.text

    runs = client.search_runs([client.get_experiment_by_name("brainlatent-train").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([ref.run_id, run_id])  # kill + resume: one run
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("train/loss", "val/mse", "time/epoch_seconds"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, EPOCHS + 1)), key
    assert len(client.search_model_versions("name='brainlatent-ae'")) == 1

    wa, wb = load_checkpoint(root / "ref/ae/last.pt")["model"], load_checkpoint(ckpt_path)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    values = [[m.value for m in client.get_metric_history(r, "val/mse")] for r in (ref.run_id, run_id)]
    assert values[0] == values[1]


def _forge(src: Path, dst: Path, **fields) -> None:
    ckpt = load_checkpoint(src)
    save_atomic({**ckpt, **fields}, dst)


def test_kill_after_a_checkpoint_but_before_its_metrics_or_the_registry(tiny_processed, tiny_params, project):
    """The checkpoint is written before the epoch is logged and the model registered; a kill in between
    leaves the run behind its checkpoint. Reproduced without timing: a complete 2-epoch checkpoint is put
    in place of a run that logged epoch 1 only and was never closed."""
    short = dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, checkpoint_dir="ck_b"))
    first = train_family("ae", short, stop_after_epoch=1, register=False)
    full = dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, checkpoint_dir="ck_a"))
    train_family("ae", full, register=False)
    b = project / "ck_b/ae/last.pt"
    _forge(project / "ck_a/ae/last.pt", b, run_id=first.run_id, identity=load_checkpoint(b)["identity"])
    MlflowClient().update_run(first.run_id, status="RUNNING")

    out = train_family("ae", short, resume=True)
    assert out.run_id == first.run_id and out.finished and out.resumed_from == 2
    assert out.model_version is not None
    client = MlflowClient()
    assert client.get_run(first.run_id).info.status == "FINISHED"
    history = client.get_metric_history(first.run_id, "val/mse")
    assert [m.step for m in history] == [1, 2]
    assert history[1].value == load_checkpoint(b)["history"][1]["val/mse"]
    assert (project / "metrics/train/ae.json").is_file()

    # A finished run is not reopened: --resume then trains afresh, in a new run.
    again = train_family("ae", short, resume=True, register=False)
    assert again.run_id != first.run_id and again.resumed_from is None


_BLOCKED_WRITER = """
import sys, time, torch
from pathlib import Path
from brainlatent.train.checkpoint import save_atomic

class Stall:  # pickled in the middle of the checkpoint: signals the test, then waits to be killed
    def __reduce__(self):
        Path(sys.argv[2]).touch()
        time.sleep(600)

save_atomic({"model": {"w": torch.zeros(1000)}, "epoch": 2, "config": {}, "family": "ae", "stall": Stall()},
            sys.argv[1])
"""


def test_kill_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path, tiny_params):
    path = tmp_path / "ck" / "last.pt"
    save_atomic({"model": {"w": torch.ones(1000)}, "epoch": 1, "config": {}, "family": "ae"}, path)
    marker = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED_WRITER, str(path), str(marker)])
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    (partial,) = path.parent.glob(".last.pt.*.tmp")  # the interrupted write, left behind
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(partial)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(1000))

    # A checkpoint cut short anywhere is refused, never read as valid.
    whole = path.read_bytes()
    for cut in (len(whole) // 4, len(whole) // 2, len(whole) - 10):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="corrupt"):
            load_checkpoint(bad)

    # The next training run clears the leftover temporary file.
    task = make_task("ae", tiny_params, TINY_SHAPE, torch.device("cpu"))
    run_loop(task, blobs(4, TINY_SHAPE, 0), blobs(2, TINY_SHAPE, 1),
             LoopConfig(epochs=1, batch_size=2, seed=0, checkpoint=path))
    assert not list(path.parent.glob(".last.pt.*.tmp"))
    assert load_checkpoint(path)["epoch"] == 1  # the new run's own epoch 1


def test_sigterm_closes_the_run_as_killed_and_resume_continues_it(tiny_processed, tiny_params, project):
    """SIGTERM (Slurm preemption, torchrun stopping a failed job's other ranks) can be caught, unlike
    SIGKILL: the run is closed as KILLED instead of being left RUNNING, and --resume continues it."""
    params = dataclasses.replace(
        tiny_params, ae=dataclasses.replace(tiny_params.ae, epochs=6),
        train=dataclasses.replace(tiny_params.train, artifact_every=100),
    )
    ckpt_path = project / "checkpoints/ae/last.pt"

    def terminate_after_first_checkpoint():
        while not ckpt_path.is_file():
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_after_first_checkpoint, daemon=True).start()
    with pytest.raises(SystemExit) as exc:
        train_family("ae", params, register=False)
    assert exc.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler does not outlive the training
    ckpt = load_checkpoint(ckpt_path)
    run = MlflowClient().get_run(ckpt["run_id"])
    assert run.info.status == "KILLED" and "resume" in run.data.tags["state"]
    assert ckpt["epoch"] < 6

    out = train_family("ae", params, resume=True, register=False)
    assert out.run_id == ckpt["run_id"] and out.finished and out.resumed_from == ckpt["epoch"]


@pytest.mark.slow
def test_two_training_processes_on_one_fresh_store_lose_no_run(tmp_path):
    """`brainlatent train --model ae` and `--model vae` start at the same moment on a project with no MLflow
    store yet: both create/find the schema and experiment, and both runs, metrics and versions are kept."""
    root = _project(tmp_path / "project", train={"artifact_every": 100})
    procs = [
        subprocess.Popen([sys.executable, "-m", "brainlatent.cli", "train", "--model", fam], cwd=root,
                         env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for fam in ("ae", "vae")
    ]
    outputs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]

    store = f"sqlite:///{root / 'mlflow.db'}"
    # registry_uri explicitly: otherwise MLflow takes the process-wide one, which earlier tests may have set.
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    exp = client.get_experiment_by_name("brainlatent-train")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["model"] for r in runs) == ["ae", "vae"]
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/mse")]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    registered = {m.name for m in client.search_registered_models()}
    assert registered >= {"brainlatent-ae", "brainlatent-vae"}, f"{registered}\n" + "\n".join(o[-2500:] for o in outputs)
    for fam in ("ae", "vae"):
        assert str(client.get_model_version_by_alias(f"brainlatent-{fam}", "candidate").version) == "1"
