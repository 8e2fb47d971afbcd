"""Optuna tuning on a tiny cohort: real Optuna studies on temporary SQLite, real MLflow stores, real training."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import mlflow
import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from brainlatent import tracking
from brainlatent.config import params_from_dict
from brainlatent.tracking import redact_url
from brainlatent.train.runner import train_family
from brainlatent.tuning import FINISHED, apply_tuned, parse_space, resolve_tuned, tune_family

from conftest import tiny_params_dict, write_processed

GOOD_LR, FLAT_LR, NAN_LR = 2e-3, 1e-9, 1e30  # learns / barely moves (worse than the median) / loss becomes NaN


def _params(project, **tune):
    """Tiny params with ``tune`` overrides, also written to the project's params.yaml (for worker processes)."""
    raw = tiny_params_dict(tune={"families": ["ae"], "epochs": 2, "pruner": "none", **tune})
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    return params_from_dict(raw)


def _trial_runs(parent_run_id: str):
    exp = mlflow.get_experiment_by_name(tracking.TUNE_EXPERIMENT)
    return MlflowClient().search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000
    )


def _study(project, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{project / 'optuna.db'}")


# ---------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"low": 1e-3}, "missing"),
        ({"low": 1e-2, "high": 1e-3}, "low < high"),
        ({"low": 0.0, "high": 1e-3, "log": True}, "log range needs low > 0"),
        ({"low": 1e-4, "high": 1e-3, "log": "yes"}, "true or false"),
        ({"low": 1e-4, "high": 1e-3, "log": True, "step": 1e-4}, "cannot be combined"),
        ({"choices": []}, "non-empty list"),
        ({"choices": [1e-3], "low": 1e-4}, "cannot be combined"),
        ({"low": -1.0, "high": 1e-3}, "not a valid ae.lr"),  # the family's own range check
        ({"lo": 1, "hi": 2}, "unknown key"),
        ({"low": "1e-4", "high": 1e-3}, "write 1.0e-3"),  # PyYAML reads 1e-4 as a string
    ],
)
def test_invalid_spec_names_the_param(spec, message, tiny_params):
    tune = dataclasses.replace(tiny_params.tune, space={"ae": {"lr": spec}})
    with pytest.raises(ValueError, match=rf"tune\.space\.ae\.lr.*{message}"):
        parse_space(tune, {"ae": tiny_params.ae, "vae": tiny_params.vae})


@pytest.mark.parametrize(
    ("space", "where"),
    [
        ({"ae": {"learning_rate": {"low": 1e-4, "high": 1e-3}}}, r"tune\.space\.ae\.learning_rate.*no parameter"),
        ({"ae": {"epochs": {"low": 1, "high": 3}}}, r"tune\.space\.ae\.epochs.*tune\.epochs"),
        ({"ae": {"latent_dim": {"low": 4.5, "high": 8.0}}}, r"tune\.space\.ae\.latent_dim.*not a valid"),
        ({"diffusion": {"lr": {"low": 1e-4, "high": 1e-3}}}, r"tune\.space\.diffusion.*unknown model family"),
        ({"vae": {"lr": {"low": 1e-4, "high": 1e-3}}}, r"tune\.space\.ae: no parameters to search"),
    ],
)
def test_invalid_space_fails_before_any_work(space, where, project, tiny_params):
    params = dataclasses.replace(tiny_params, tune=dataclasses.replace(tiny_params.tune, space=space))
    with pytest.raises(ValueError, match=where):
        tune_family("ae", params)
    assert not (project / "optuna.db").exists() and not (project / "mlflow.db").exists()


def test_parse_space_kinds(tiny_params):
    tune = dataclasses.replace(tiny_params.tune, space={"vae": {
        "lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "kl_warmup_epochs": {"low": 0, "high": 10, "step": 2},
        "norm": {"choices": ["group", "none"]},
    }})
    specs = parse_space(tune, {"ae": tiny_params.ae, "vae": tiny_params.vae})["vae"]
    assert {k: s.kind for k, s in specs.items()} == {"lr": "float", "kl_warmup_epochs": "int", "norm": "categorical"}


def test_database_and_server_passwords_are_redacted():
    assert redact_url("postgresql://tuner:s3cret@db.example:5432/optuna") == "postgresql://tuner:***@db.example:5432/optuna"
    assert redact_url("http://alice:s3cret@mlflow.example:5000") == "http://alice:***@mlflow.example:5000"
    assert redact_url("sqlite:////tmp/x/mlflow.db") == "sqlite:////tmp/x/mlflow.db"  # nothing to hide: unchanged


# ------------------------------------------------------------------------------------------- studies
def test_study_writes_tuned_file_logs_nested_runs_and_feeds_training(tiny_processed, project):
    params = _params(project, n_trials=3, space={"ae": {
        "lr": {"low": 1e-3, "high": 4e-3, "log": True}, "latent_dim": {"choices": [4, 8]},
    }})
    result = tune_family("ae", params)

    tuned = json.loads((project / "tuned" / "ae.json").read_text())
    assert tuned["family"] == "ae" and tuned["metric"] == "val/mse" and tuned["study"] == result.study
    assert result.study.startswith("brainlatent-ae-")  # prefix, family, then a hash of the configuration
    assert set(tuned["params"]) == {"lr", "latent_dim"} and tuned["n_complete"] == 3
    assert tuned["value"] == pytest.approx(result.best_value) and not tuned["skipped"]
    assert not list((project / "tuned").glob(".*tmp"))  # atomic write left nothing behind

    # The study in the default embedded storage.
    study = _study(project, result.study)
    assert len(study.get_trials(states=FINISHED)) == 3
    assert study.best_trial.value == pytest.approx(tuned["value"])
    assert all(len(t.intermediate_values) == 2 for t in study.trials)  # reported every epoch

    # MLflow: one parent with the summary, three nested trial runs with params, curves and state.
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["model"] == "ae"
    assert parent.data.metrics["best_value"] == pytest.approx(tuned["value"])
    assert parent.data.tags["best.lr"] == str(tuned["params"]["lr"])
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/optimization_history.png", "figures/param_importances.png"} <= figures
    trials = _trial_runs(parent.info.run_id)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trials) == [0, 1, 2]
    for run in trials:
        assert run.info.status == "FINISHED" and run.data.tags["state"] == "complete"
        assert run.data.params["ae.epochs"] == "2" and run.data.params["ae.latent_dim"] in ("4", "8")
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mse")] == [1, 2]
    by_number = {int(r.data.tags["optuna.trial"]): r for r in trials}
    assert by_number[study.best_trial.number].info.run_id == study.best_trial.user_attrs["mlflow_run_id"]

    # Training picks the tuned values up; other sections and untuned fields stay as they were.
    applied = apply_tuned(params, "ae", project)
    assert applied.ae.lr == tuned["params"]["lr"] != params.ae.lr
    assert applied.ae.latent_dim == tuned["params"]["latent_dim"]
    assert applied.ae.epochs == params.ae.epochs and applied.vae == params.vae


class _ScriptedSampler(optuna.samplers.BaseSampler):
    """An Optuna sampler (its public plugin interface) that draws a fixed sequence of values, one per trial:
    what the pruner and the failure handling see no longer depends on how a seeded TPE of a given Optuna
    release happens to draw (a seed that drew good, good, flat, nan, nan in Optuna 5.0 drew three good ones
    in 5.1)."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.values[trial.number]


def test_prunes_bad_trials_and_survives_failing_ones(tiny_processed, project, monkeypatch):
    # lr choices that learn, stay flat (worse than the median: pruned after epoch 1) and diverge (NaN: failed),
    # drawn in the order good, good, flat, nan, nan: the median pruner (warm-up 0) has its two completed trials
    # before the flat one. The study, its storage, pruner and MLflow runs are the real ones; only the draws are
    # scripted.
    monkeypatch.setattr("brainlatent.tuning.make_sampler",
                        lambda tune, seed: _ScriptedSampler([GOOD_LR, GOOD_LR, FLAT_LR, NAN_LR, NAN_LR]))
    params = _params(project, n_trials=5, pruner="median", pruner_warmup_epochs=0, seed=10,
                     space={"ae": {"lr": {"choices": [GOOD_LR, FLAT_LR, NAN_LR]}}})
    result = tune_family("ae", params)
    assert (result.n_complete, result.n_pruned, result.n_failed) == (2, 1, 2)
    assert result.best_params == {"lr": GOOD_LR}

    study = _study(project, result.study)
    states = {t.number: (t.state, t.params["lr"]) for t in study.trials}
    assert {lr for s, lr in states.values() if s == optuna.trial.TrialState.PRUNED} == {FLAT_LR}
    assert {lr for s, lr in states.values() if s == optuna.trial.TrialState.FAIL} == {NAN_LR}
    pruned = next(t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED)
    assert list(pruned.intermediate_values) == [1]  # stopped after its first epoch

    status = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}
    runs = _trial_runs(result.parent_run_id)
    assert len(runs) == 5
    for run in runs:
        state = run.data.tags["state"]
        assert run.info.status == status[state]
        trial = study.trials[int(run.data.tags["optuna.trial"])]
        assert state == {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}[trial.state.name]
        if state == "failed":
            assert run.data.tags["fail_reason"].startswith("NonFiniteLossError: loss became nan")
            assert trial.user_attrs["fail_reason"] == run.data.tags["fail_reason"]
    tuned = json.loads((project / "tuned" / "ae.json").read_text())
    assert (tuned["n_complete"], tuned["n_pruned"], tuned["n_failed"]) == (2, 1, 2)

    # Re-running with the same budget adds no trial; a larger budget continues the same study and parent run.
    again = tune_family("ae", dataclasses.replace(params, tune=dataclasses.replace(params.tune, n_trials=6)))
    assert len(study.get_trials(states=FINISHED)) == 6 and again.parent_run_id == result.parent_run_id


def test_changed_configuration_starts_a_fresh_study(tiny_processed, project):
    params = _params(project, n_trials=1, epochs=1, space={"ae": {"lr": {"choices": [GOOD_LR]}}})
    first = tune_family("ae", params)
    tags = MlflowClient().get_run(first.parent_run_id).data.tags
    assert tags["param_importances"] == "needs >= 2 completed trials, have 1"  # and no failure because of it
    # Trials with another batch size are not comparable: `dvc repro` after such an edit tunes in a new study
    # (and a new parent run) instead of mixing them into the old one or refusing to run.
    other = dataclasses.replace(params, ae=dataclasses.replace(params.ae, batch_size=2))
    second = tune_family("ae", other)
    assert second.study != first.study and second.parent_run_id != first.parent_run_id
    assert len(_study(project, first.study).trials) == 1 and len(_study(project, second.study).trials) == 1


def test_family_not_tuned_is_skipped_and_apply_tuned_is_a_no_op(tiny_processed, project):
    params = _params(project, space={"ae": {"lr": {"choices": [GOOD_LR]}}})
    result = tune_family("vae", params)
    assert result.skipped and not (project / "optuna.db").exists()
    tuned = json.loads((project / "tuned" / "vae.json").read_text())
    assert tuned["skipped"] is True and tuned["params"] == {} and tuned["family"] == "vae"
    assert apply_tuned(params, "vae", project) is params
    assert apply_tuned(params, "ae", project) is params  # in tune.families but not tuned yet: no file


def _tuned_file(project, family: str, params: dict) -> None:
    (project / "tuned").mkdir(exist_ok=True)
    (project / "tuned" / f"{family}.json").write_text(json.dumps({"family": family, "params": params, "study": "s1"}))


def test_a_tuned_value_that_replaces_the_users_is_loud_and_recorded(tiny_processed, project, caplog):
    """`dvc exp run -S vae.beta=0.5` with beta in the tuning space: the tuned value wins, and says so in the log,
    the training run's tags and metrics/train/vae.json (a `dvc exp show` column beside params.yaml's value)."""
    raw = tiny_params_dict(vae={"beta": 0.5}, tune={"families": ["vae"]})
    params = params_from_dict(raw)
    _tuned_file(project, "vae", {"beta": 0.75, "lr": params.vae.lr})
    with caplog.at_level("WARNING", logger="brainlatent.tuning"):
        tuned = resolve_tuned(params, "vae", project)
    assert tuned.params.vae.beta == 0.75 and tuned.used["beta"] == 0.75
    assert tuned.overridden == {"beta": (0.5, 0.75)}  # lr was not changed: no override of it
    assert "vae.beta: params.yaml says 0.5, training uses the tuned 0.75" in caplog.text
    assert "tune.pinned.vae=[beta]" in caplog.text

    out = train_family("vae", tuned.params, root=project, tuned=tuned)
    tags = MlflowClient().get_run(out.run_id).data.tags
    assert tags["tuned.override.beta"] == "params.yaml 0.5 -> tuned 0.75"
    assert tags["tuned.source"] == "tuned/vae.json (study s1)"
    assert MlflowClient().get_run(out.run_id).data.params["vae.beta"] == "0.75"
    written = json.loads((project / "metrics" / "train" / "vae.json").read_text())
    assert written["trained_with"] == {"beta": 0.75, "lr": params.vae.lr}


def test_a_pinned_key_trains_with_the_users_value_and_is_not_searched(tiny_processed, project):
    raw = tiny_params_dict(vae={"beta": 0.5}, tune={"families": ["vae"], "pinned": {"vae": ["beta"]}})
    params = params_from_dict(raw)
    _tuned_file(project, "vae", {"beta": 0.75, "lr": 1e-3})  # e.g. written before the pin
    tuned = resolve_tuned(params, "vae", project)
    assert tuned.params.vae.beta == 0.5 and tuned.params.vae.lr == 1e-3
    assert tuned.overridden == {"lr": (params.vae.lr, 1e-3)} and tuned.pinned == ("beta",)
    assert tuned.mlflow_tags()["tuned.pinned"] == "beta"
    # The study does not search it either.
    specs = parse_space(params.tune, {f: params.family(f) for f in ("ae", "vae", "gan", "stylegan")})
    assert "beta" not in specs["vae"] and "lr" in specs["vae"]


@pytest.mark.parametrize(("pinned", "message"), [
    ({"vae": ["gamma"]}, r"pinned\.vae: vae has no parameter 'gamma'"),
    ({"net": ["beta"]}, "pinned: unknown model family 'net'"),
    # The list form of earlier releases is refused with the per-family form it should be.
    (["vae.beta"], r"pinned: expected one list per family, e\.g\. \{vae: \[beta\]\}"),
])
def test_pinned_entries_are_validated(pinned, message):
    with pytest.raises(ValueError, match=rf"tune.*{message}"):
        params_from_dict(tiny_params_dict(tune={"pinned": pinned}))


def test_every_family_has_its_own_pin_list():
    """dvc.yaml's tune@/train@<family> depend on tune.pinned.<family>: the key must exist for every family."""
    pinned = params_from_dict(tiny_params_dict(tune={"pinned": {"vae": ["beta"]}})).tune.pinned
    assert pinned == {"ae": (), "vae": ("beta",), "gan": (), "stylegan": ()}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"family": "ae", "params": {"learning_rate": 0.1}}', r"unknown ae parameter\(s\) \['learning_rate'\]"),
        ('{"family": "ae", "params": {"lr": -1.0}}', "invalid ae value"),
        ('{"family": "vae", "params": {"lr": 0.1}}', "'family' is 'vae'"),
        ('{"family": "ae", "params": [1]}', "'params' mapping"),
    ],
)
def test_apply_tuned_rejects_malformed_file(content, message, project, tiny_params):
    (project / "tuned").mkdir()
    (project / "tuned" / "ae.json").write_text(content)
    with pytest.raises(ValueError, match=rf"ae\.json.*{message}"):
        apply_tuned(tiny_params, "ae", project)


_WORKER = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from brainlatent.config import load_params
    from brainlatent.tuning import tune_family
    tune_family("ae", load_params("params.yaml"))
""")


def test_two_worker_processes_share_one_study(project):
    write_processed(project, n=12)
    n_trials = 4
    params = _params(project, n_trials=n_trials, epochs=1, space={"ae": {"lr": {"low": 1e-3, "high": 4e-3}}})
    env = {**os.environ, "BRAINLATENT_ROOT": str(project), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("MLFLOW_TRACKING_URI", None)
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER], cwd=project, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]

    tracking.configure(project)  # this process has not used the project's MLflow store yet
    study = _study(project, json.loads((project / "tuned" / "ae.json").read_text())["study"])
    trials = study.get_trials()
    numbers = sorted(t.number for t in trials)
    # At least n_trials finished, at most one extra (the other worker's trial in flight), none lost or repeated.
    assert n_trials <= len(trials) <= n_trials + 1 and numbers == list(range(len(trials)))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    runs = _trial_runs(study.user_attrs["brainlatent.mlflow_parent_run_id"])
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == numbers
    assert sorted(r.info.run_id for r in runs) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    assert json.loads((project / "tuned" / "ae.json").read_text())["n_complete"] == len(trials)
