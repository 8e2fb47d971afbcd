"""End to end, the way a user runs the project: the real dvc.yaml in a fresh git + DVC repository, `dvc repro`
once on a tiny configuration, then everything a user looks at afterwards: `dvc status` / `dvc metrics show`,
the registry, the report, the notebooks, the MLflow UI in a real (headless) browser, and `mlflow run`.

One module-scoped pipeline run feeds every test (it is the expensive part: a few minutes on 2 cores). Tests
run in file order; `test_mlflow_run_train_entry_point` comes last because it trains a new vae version, which
rewrites train@vae's outputs (as `brainlatent train` does) and so leaves the DVC pipeline out of date.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import REPO, tiny_params_dict
from e2e_utils import (
    dvc,
    render_offline,
    find_or_install_chromium,
    free_port,
    make_project,
    render_dom,
    run,
    screenshot,
    stop_process_group,
    wait_healthy,
)
from mlflow.tracking import MlflowClient

from brainlatent import registry, tracking
from brainlatent.config import FAMILIES

pytestmark = pytest.mark.slow

NOTEBOOKS = ("01_data.ipynb", "02_compare_runs.ipynb", "03_latent_directions.ipynb")
ARTIFACTS = REPO / "test-artifacts"  # kept after the run (screenshots); gitignored

# tests/conftest.tiny_params_dict() made cheaper still: every stage runs, each on the least work that still
# exercises it (20 subjects split 14/3/3; 14 training subjects fill 3 stratified folds per probe).
E2E_OVERRIDES = {
    "synth": {"n_subjects": 20},
    "tune": {"n_trials": 2, "epochs": 1,
             "space": {**tiny_params_dict()["tune"]["space"],
                       "ae": {"lr": {"low": 5.0e-4, "high": 5.0e-3, "log": True},
                              "latent_dim": {"choices": [8, 16]}}}},
    "featurenet": {"epochs": 2, "channels": [4, 8, 16], "feature_dim": 16, "batch_size": 4},
    "evaluate": {"n_samples": 16, "inversion_steps": 10, "kid_subset_size": 8, "ms_ssim_pairs": 10},
    "directions": {"inversion_steps": 10, "n_permutations": 10, "n_bootstrap": 100, "n_splits": 3, "n_repeats": 1,
                   "pca_components": 5, "n_steps": 3, "n_traversal_subjects": 2, "n_strip_subjects": 1},
}
STAGES = {"synthesize", "prepare", "featurenet", "report"} | {
    f"{stage}@{fam}" for stage in ("tune", "train", "evaluate", "directions") for fam in FAMILIES
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, dict[str, str], str]:
    """(repo, env, stdout of the first `dvc repro`) after one full pipeline run on the e2e configuration."""
    repo, env = make_project(tmp_path_factory.mktemp("e2e") / "repo", tiny_params_dict(**E2E_OVERRIDES))
    out = dvc(["repro"], repo, env, timeout=1500)
    return repo, env, out


@pytest.fixture
def store(pipeline):
    """The pipeline's MLflow store, for in-process queries; the previous tracking URI is restored afterwards."""
    repo = pipeline[0]
    previous = mlflow.get_tracking_uri()
    tracking.configure(repo)
    yield repo
    mlflow.set_tracking_uri(previous)
    mlflow.set_registry_uri(previous)


# ------------------------------------------------------------------------------------------ DVC
def test_every_stage_ran_and_is_locked(pipeline):
    repo, _, out = pipeline
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == STAGES
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out, stage


def test_dvc_status_clean_after_repro(pipeline):
    repo, env, _ = pipeline
    status = json.loads(dvc(["status", "--json"], repo, env))
    assert status == {}, f"dvc status after repro: {status}"


def test_dvc_metrics_show_every_family(pipeline):
    repo, env, _ = pipeline
    shown = json.loads(dvc(["metrics", "show", "--json"], repo, env))
    files = {path: entry.get("data", {}) for ws in shown.values() for path, entry in ws["data"].items()}
    for kind in ("train", "evaluate", "directions"):
        for fam in FAMILIES:
            path = f"metrics/{kind}/{fam}.json"
            assert path in files and files[path], f"{path} missing or empty in `dvc metrics show`"
    assert "val/mse" in files["metrics/train/vae.json"]
    assert "sex_auc" in files["metrics/directions/ae.json"]


def test_report_written(pipeline):
    repo = pipeline[0]
    md = (repo / "report" / "metrics.md").read_text()
    for fam in FAMILIES:
        assert f"| {fam} |" in md
    for name in ("metrics.csv", "samples.png", "index.html"):
        assert (repo / "report" / name).is_file(), name


def test_second_repro_runs_nothing(pipeline):
    repo, env, _ = pipeline
    out = dvc(["repro"], repo, env)
    assert "Running stage" not in out, out
    assert "up to date" in out.lower() or "didn't change" in out, out


# ----------------------------------------------------------------------------------- registry
def test_champions_registered_and_loadable(store):
    client = MlflowClient()
    for fam in FAMILIES:
        name = registry.registered_name(fam)
        assert "champion" in client.get_registered_model(name).aliases, name
        loaded = registry.load_model(f"models:/{name}@champion")
        assert loaded.model.family == fam and loaded.name == name
        assert not loaded.model.training  # load_model hands back eval mode


# ---------------------------------------------------------------------- README's commands, as written
def test_readme_commands_work_on_the_pipelines_models(pipeline, chromium, tmp_path):
    """What README's "Everyday use" sends a user to, typed as written after `make repro` (tests/test_readme_commands.py
    lists them; the cheap ones run there in a tiny project without a pipeline)."""
    repo, env, _ = pipeline
    cli = [str(Path(sys.executable).parent / "brainlatent")]

    registry_txt = run([*cli, "registry"], repo, env).stdout
    for fam in FAMILIES:
        assert registry.registered_name(fam) in registry_txt and "champion" in registry_txt
    shown = run([*cli, "show", "models:/brainlatent-vae@champion"], repo, env).stdout
    assert re.match(r"brainlatent-vae version \d+  aliases: .*champion", shown), shown

    # A user's own scan: a held-out subject's brain-extracted T1w, under the README's file name.
    subject = next(p for p in sorted((repo / "data/raw/synthetic").glob("*/T1w/T1w_acpc_dc_restore_brain.nii.gz")))
    shutil.copy(subject, repo / "my_T1w_brain.nii.gz")
    out = run([*cli, "traverse", "--model-uri", "models:/brainlatent-vae@champion", "--input", "my_T1w_brain.nii.gz",
               "--direction", "age_old", "--steps=-2,-1,0,1,2", "--out", "traversal/"], repo, env).stdout
    assert "files written to traversal" in out
    assert len(list((repo / "traversal").glob("age_old_step*sd.nii.gz"))) == 5
    assert (repo / "traversal" / "traversal.json").is_file() and (repo / "traversal" / "age_old_strip.png").is_file()

    lookup = ('from brainlatent.registry import load_model\n'
              'vae = load_model("models:/brainlatent-vae@champion").model   # encode / decode / sample\n'
              'print(type(vae).__name__, all(hasattr(vae, m) for m in ("encode", "decode", "sample")))\n')
    assert run([sys.executable, "-c", lookup], repo / "notebooks", env).stdout.strip() == "VAE True"

    # Evaluating a version by hand leaves the pipeline's own metrics (and DVC's view of them) alone.
    before = (repo / "metrics" / "evaluate" / "vae.json").read_bytes()
    out = run([*cli, "evaluate", "--model", "vae", "--model-uri", "models:/brainlatent-vae/1"], repo, env).stdout
    assert out.startswith("vae v1:")
    assert (repo / "metrics" / "evaluate" / "vae.json").read_bytes() == before
    assert json.loads(dvc(["status", "--json"], repo, env)) == {}

    # `dvc plots show` draws offline (the project's .dvc/config points DVC at the inlined template).
    dvc(["plots", "show"], repo, env)
    page = repo / "dvc_plots" / "index.html"
    ARTIFACTS.mkdir(exist_ok=True)
    dom = render_offline(chromium, page.as_uri(), tmp_path / "plots.png", tmp_path / "profile-plots")
    shutil.copy(tmp_path / "plots.png", ARTIFACTS / "dvc_plots_pipeline.png")
    assert dom.count('class="marks"') >= 8, "fewer charts drawn than the directions' ROC and effect plots"


# ---------------------------------------------------------------------------------- notebooks
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(pipeline, name, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    repo, env, _ = pipeline
    for key in ("BRAINLATENT_ROOT", "PATH", "MPLBACKEND"):  # the kernel inherits this process's environment
        monkeypatch.setenv(key, env[key])
    path = repo / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} is saved with outputs"
    # "python3" resolves to this interpreter: jupyter_client swaps the spec's bare `python` for sys.executable.
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(repo)}})
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{name} drew no figure"


# --------------------------------------------------------------------------------- MLflow UI
@pytest.fixture(scope="module")
def chromium() -> str:
    path, why = find_or_install_chromium()
    if path is None:
        pytest.skip(f"MLflow UI browser test needs Chromium: {why}")
    return path


@pytest.fixture
def ui_server(pipeline):
    """`brainlatent ui` on a free port of 127.0.0.1, serving the pipeline's store."""
    repo, env, _ = pipeline
    port = free_port()
    log = (repo / "ui-server.log").open("w")
    cli = Path(sys.executable).parent / "brainlatent"  # the console script a user types
    proc = subprocess.Popen([str(cli), "ui", "--port", str(port)], cwd=repo, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{base}/health", proc)
        yield base
    finally:
        stop_process_group(proc)
        log.close()


def test_mlflow_ui_shows_runs_and_models(pipeline, store, ui_server, chromium, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    exp = mlflow.get_experiment_by_name(tracking.TRAIN_EXPERIMENT)
    runs = mlflow.search_runs([exp.experiment_id], filter_string="tags.stage = 'train'", output_format="list")
    run_names = {r.info.run_name for r in runs}
    assert {n.split("-")[0] for n in run_names} == set(FAMILIES)

    # MLflow 3 opens an experiment on its GenAI overview; the "Training runs" tab is /runs.
    url = f"{ui_server}/#/experiments/{exp.experiment_id}/runs"
    dom = render_dom(chromium, url, tmp_path / "profile")
    missing = sorted(n for n in run_names if n not in dom)
    assert not missing, f"training runs not rendered on {url}: {missing}"
    png = screenshot(chromium, url, tmp_path / "ui_experiment.png", tmp_path / "profile")
    shutil.copy(png, ARTIFACTS / "ui_experiment.png")

    models_url = f"{ui_server}/#/models"
    dom = render_dom(chromium, models_url, tmp_path / "profile")
    for fam in FAMILIES:
        assert registry.registered_name(fam) in dom, f"{registry.registered_name(fam)} not rendered on {models_url}"
    png = screenshot(chromium, models_url, tmp_path / "ui_models.png", tmp_path / "profile")
    shutil.copy(png, ARTIFACTS / "ui_models.png")

    # Each model's page lists its versions with their aliases: the champion must be shown there.
    for fam in FAMILIES:
        model_url = f"{ui_server}/#/models/{registry.registered_name(fam)}"
        dom = render_dom(chromium, model_url, tmp_path / "profile")
        assert 'title="champion"' in dom, f"alias 'champion' not rendered on {model_url}"
    png = screenshot(chromium, model_url, tmp_path / "ui_model.png", tmp_path / "profile")
    shutil.copy(png, ARTIFACTS / f"ui_model_{fam}.png")


# --------------------------------------------------------------------------- DVC experiments
# README's "Everyday use": experiments that change a tuned key pin it, so the model really changes.
WORKSPACE_EXPS = {"beta-low": 0.25, "beta-high": 2.0}  # README's own commands
QUEUED_EXPS = {"queued": 1.2}  # one queued experiment (each costs ~100 s): compared with a workspace one
QUEUE_TIMEOUT_S = 1800  # a safety net against a hung worker, not a timing assertion


def _exp_run(repo, env, name: str, beta: float, *extra: str) -> str:
    return dvc(["exp", "run", *extra, "-n", name, "-S", f"vae.beta={beta}", "-S", "tune.pinned.vae=[beta]"],
               repo, env, timeout=1500)


def _wait_for_queue(repo, env, names) -> None:
    """`dvc queue start` returns at once; poll `dvc queue status` until our experiments are no longer waiting."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while time.monotonic() < deadline:
        rows = [line.split() for line in dvc(["queue", "status"], repo, env).splitlines()]
        states = {row[1]: row[-1] for row in rows if len(row) >= 3 and row[1] in names}
        if len(states) == len(names) and all(s in ("Success", "Failed") for s in states.values()):
            assert set(states.values()) == {"Success"}, (states, dvc(["queue", "logs", next(iter(names))], repo, env))
            return
        time.sleep(5)
    raise AssertionError(f"queued experiments {sorted(names)} did not finish within {QUEUE_TIMEOUT_S} s")


def _shown_metrics(repo, env) -> dict[str, dict[str, dict]]:
    """`dvc exp show --json` as {experiment name: {metrics file: its data}}."""
    shown = json.loads(dvc(["exp", "show", "--json"], repo, env))
    out = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                name = rev.get("name") or exp.get("name")
                out[name] = {path: entry.get("data", {}) for path, entry in rev["data"]["metrics"].items()}
    return out


@pytest.fixture(scope="module")
def experiments(pipeline) -> dict[str, dict[str, dict]]:
    """Two workspace experiments and a queued one on top of the committed pipeline run."""
    repo, env, _ = pipeline
    run(["git", "add", "-A"], repo, env)  # DVC experiments start from a commit (README, "Everyday use")
    run(["git", "commit", "-qm", "baseline: dvc repro"], repo, env)
    for name, beta in WORKSPACE_EXPS.items():
        _exp_run(repo, env, name, beta)
    for name, beta in QUEUED_EXPS.items():
        _exp_run(repo, env, name, beta, "--queue")
    dvc(["queue", "start"], repo, env)
    _wait_for_queue(repo, env, set(QUEUED_EXPS))
    return _shown_metrics(repo, env)


@pytest.mark.parametrize("names", [WORKSPACE_EXPS, {"beta-low": WORKSPACE_EXPS["beta-low"], **QUEUED_EXPS}],
                         ids=["workspace", "queued"])
def test_each_experiment_evaluates_the_model_it_trained(pipeline, store, experiments, names):
    client = MlflowClient()
    versions, evaluations = {}, {}
    for name, beta in names.items():
        metrics = experiments[name]
        version = metrics["metrics/train/vae.json"]["model_version"]
        # Evaluation and directions name the version this experiment's train@vae registered...
        assert metrics["metrics/evaluate/vae.json"]["model_version"] == version, name
        assert metrics["metrics/directions/vae.json"]["model_version"] == version, name
        mv = client.get_model_version("brainlatent-vae", str(version))
        trained = client.get_run(mv.run_id)
        # ...which is a model trained with the experiment's own (pinned) beta, in a run tagged with the experiment.
        assert float(trained.data.params["vae.beta"]) == beta and trained.data.tags["tuned.pinned"] == "beta"
        assert metrics["metrics/train/vae.json"]["trained_with"]["beta"] == beta
        assert trained.data.tags["dvc.exp_name"] == name and trained.data.tags["dvc.baseline_rev"]
        evaluation = client.get_run(client.search_runs(
            [client.get_experiment_by_name(tracking.EVAL_EXPERIMENT).experiment_id],
            filter_string=f"tags.model_version = '{version}' AND tags.model = 'vae'")[0].info.run_id)
        assert evaluation.data.tags["dvc.exp_name"] == name
        versions[name], evaluations[name] = version, metrics["metrics/evaluate/vae.json"]
    low, high = names
    assert versions[low] != versions[high]
    assert evaluations[low]["mse"] != evaluations[high]["mse"]  # two models, two evaluations
    assert experiments[low]["metrics/directions/vae.json"] != experiments[high]["metrics/directions/vae.json"]


def test_skipped_stages_still_show_their_own_models_numbers(experiments):
    """Whatever DVC skipped as unchanged, every family's evaluation and directions metrics name the version its
    training metrics name: a property of the pipeline (dependencies on trained/<family>.json), not of luck."""
    for name, metrics in experiments.items():
        for fam in FAMILIES:
            version = metrics[f"metrics/train/{fam}.json"]["model_version"]
            for stage in ("evaluate", "directions"):
                assert metrics[f"metrics/{stage}/{fam}.json"]["model_version"] == version, (name, fam, stage)


def test_an_experiment_on_the_vae_retrains_only_the_vae(experiments):
    """tune@ and train@<family> depend on tune.pinned.<family> alone: pinning a VAE key re-runs the VAE's stages
    and keeps the other families' models of the baseline run (version 1), whose stages DVC skips."""
    for name, metrics in experiments.items():
        assert str(metrics["metrics/train/vae.json"]["model_version"]) != "1", name
        for fam in ("ae", "gan", "stylegan"):
            assert str(metrics[f"metrics/train/{fam}.json"]["model_version"]) == "1", (name, fam)


def test_exp_diff_compares_two_experiments(pipeline, experiments):
    repo, env, _ = pipeline
    diff = json.loads(dvc(["exp", "diff", *WORKSPACE_EXPS, "--json"], repo, env))
    changed = diff["metrics"]
    assert "model_version" in changed["metrics/evaluate/vae.json"]
    assert "mse" in changed["metrics/evaluate/vae.json"]
    assert diff["params"]["params.yaml"]["vae.beta"]["old"] != diff["params"]["params.yaml"]["vae.beta"]["new"]


# -------------------------------------------------------------------------------- mlflow run
def test_mlflow_run_train_entry_point(pipeline, store):
    """MLproject's train entry point, offline (--env-manager local), into the pipeline's own store."""
    repo, env, _ = pipeline
    client = MlflowClient()
    exp = client.get_experiment_by_name(tracking.TRAIN_EXPERIMENT)
    before = {r.info.run_id for r in client.search_runs([exp.experiment_id])}
    versions_before = {v.version for v in client.search_model_versions("name='brainlatent-vae'")}

    env = {**env, "MLFLOW_TRACKING_URI": tracking.tracking_uri(repo)}
    run([sys.executable, "-m", "mlflow", "run", ".", "-e", "train", "-P", "model=vae", "--env-manager", "local",
         "--experiment-name", tracking.TRAIN_EXPERIMENT], repo, env, timeout=600)

    new = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id not in before]
    assert len(new) == 1, f"expected one new run in {tracking.TRAIN_EXPERIMENT}, got {len(new)}"
    launched = new[0]
    assert launched.info.status == "FINISHED"
    assert launched.data.tags["model"] == "vae"
    assert launched.data.tags.get("mlflow.project.entryPoint") == "train"
    assert "val/mse" in launched.data.metrics
    versions = client.search_model_versions("name='brainlatent-vae'")
    added = [v for v in versions if v.version not in versions_before]
    assert len(added) == 1 and added[0].run_id == launched.info.run_id
