"""Every command README.md sends a user to, run as written, succeeds or fails with one clear `error:` line.

The commands are read from README's fenced ```bash and ```python blocks, and from its inline code spans that start
with one of the tools a user types, so a command added to the README fails `test_every_readme_command_is_checked`
until someone says how it is checked. The cheap ones run here, in a tiny project (a tiny VAE registered as
`champion`, no pipeline). Those that need a whole `make repro` are listed in NEEDS_PIPELINE with the test that runs
them; the end-to-end test (tests/test_pipeline_dvc.py) runs them after its real `dvc repro`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from brainlatent.cli import app
from conftest import tiny_params_dict
from e2e_utils import assert_one_error_line

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# Inline code spans that are commands (`brainlatent --help`), not names (`brainlatent-train`, `dvc.yaml`).
INLINE_COMMAND = re.compile(r"^(brainlatent|dvc|make|mlflow|pip|jupyter|cp|git|python) ")

# ----------------------------------------------------------------------------------- the README's commands
# Run by the tests below, in this file.
VAE = "models:/brainlatent-vae@champion"
ACTIVATE = "source .venv/bin/activate"
HELP = "brainlatent --help"
REGISTRY = "brainlatent registry"
SHOW = f"brainlatent show {VAE}"
TRAVERSE = (f"brainlatent traverse --model-uri {VAE} --input my_T1w_brain.nii.gz --direction age_old "
            "--steps=-2,-1,0,1,2 --out traversal/")
LOOKUP = ('from brainlatent.registry import load_model\n'
          'vae = load_model("models:/brainlatent-vae@champion").model   # encode / decode / sample\n')
RUN_HERE = {ACTIVATE, HELP, REGISTRY, SHOW, TRAVERSE, LOOKUP}

# Run by other tests of the suite (cheap, no pipeline).
ELSEWHERE = {
    "dvc plots show": "tests/test_plots_offline.py::test_dvc_plots_show_draws_without_network",
    "dvc remote add -d storage /mnt/shared/brainlatent-dvc": "tests/test_dvc_remote.py (a folder remote)",
    "dvc push": "tests/test_dvc_remote.py",
    "BRAINLATENT_NPROC_PER_NODE=4 dvc repro": "tests/test_distributed.py (2 processes through `brainlatent train`)",
}

# Need a whole `make repro` (trained, evaluated models with fitted directions): tests/test_pipeline_dvc.py.
NEEDS_PIPELINE = {
    "make repro": "the end-to-end test runs its `dvc repro` (make repro = install + dvc repro); CI runs make test",
    "make test": "what CI runs",
    "dvc repro": "test_pipeline_dvc (pipeline fixture, test_second_repro_runs_nothing)",
    "dvc metrics show": "test_pipeline_dvc::test_dvc_metrics_show_every_family",
    "make ui": "test_pipeline_dvc::ui_server (`brainlatent ui`; make ui = install + brainlatent ui)",
    'git add -A && git commit -m "baseline: make repro"': "test_pipeline_dvc::experiments",
    "dvc exp run -n beta-low -S vae.beta=0.25 -S 'tune.pinned.vae=[beta]'": "test_pipeline_dvc::experiments",
    "dvc exp run -n beta-high -S vae.beta=2.0 -S 'tune.pinned.vae=[beta]'": "test_pipeline_dvc::experiments",
    "dvc exp show --only-changed": "test_pipeline_dvc::test_each_experiment_evaluates_the_model_it_trained",
    "dvc exp diff beta-low beta-high": "test_pipeline_dvc::test_exp_diff_compares_two_experiments",
    "dvc queue start": "test_pipeline_dvc::experiments (queued)",
    "export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db": "test_pipeline_dvc::test_mlflow_run_train_entry_point",
    "mlflow run . -e train -P model=vae --env-manager local --experiment-name brainlatent-train":
        "test_pipeline_dvc::test_mlflow_run_train_entry_point",
    "brainlatent evaluate --model vae --model-uri models:/brainlatent-vae/1": "test_pipeline_dvc (end-to-end)",
}
# RUN_HERE's registry, show, traverse (here without the user's scan, so it must fail in one line) and the Python
# look-up run again in the end-to-end test on the pipeline's own models, traverse with a real scan.

# Inline mentions that are not commands to run as written: a tool's name, a sketch with "...", or a step that
# installs from the network or replaces the project's params.yaml.
NOT_RUN = {
    "mlflow run": "names the `mlflow run` block below it",
    "dvc exp show": "names the command; the block runs `dvc exp show --only-changed`",
    "dvc exp run --queue ...": "a sketch (\"...\"); queued experiments: test_pipeline_dvc::experiments",
    "dvc exp run --set-param ...": "a sketch (\"...\")",
    "pip install jupyterlab ipywidgets": "installs from the network; the notebooks run in test_pipeline_dvc",
    "jupyter lab": "an interactive server; the notebooks run in test_pipeline_dvc::test_notebook_executes",
    "cp params.research.yaml params.yaml": "replaces params.yaml with the GPU-scale config (docs/research_scale.md)",
}


def _one_line(command: str) -> str:
    return " ".join(command.split())


def readme_commands(text: str) -> set[str]:
    """Shell commands (continuations joined, comments dropped, spaces collapsed), whole Python blocks, and
    inline code spans that are commands."""
    found: set[str] = set()
    for lang, body in FENCE.findall(text):
        if lang == "python":
            found.add(body)
        elif lang in SHELL_LANGS:
            for line in body.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#\s.*$", "", line).strip()  # README's comments: "  # what it does"
                if line:
                    found.add(_one_line(line))
        else:
            raise AssertionError(f"README.md: a ```{lang} block; say here how its commands are checked")
    prose = FENCE.sub("", text)
    found |= {_one_line(span) for span in re.findall(r"`([^`\n]+)`", prose) if INLINE_COMMAND.match(span)}
    return found


def test_every_readme_command_is_checked():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    known = RUN_HERE | set(ELSEWHERE) | set(NEEDS_PIPELINE) | set(NOT_RUN)
    unchecked = sorted(commands - known)
    assert not unchecked, f"README.md commands that no test runs (add them to this file): {unchecked}"
    stale = sorted(known - commands)
    assert not stale, f"listed here but no longer in README.md: {stale}"


# ------------------------------------------------------------------------------------------- running them
def _user_env() -> dict[str, str]:
    """A user's shell after `source .venv/bin/activate`: the venv's bin first, no project overrides."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BRAINLATENT_ROOT", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_STAGE", "DVC_ROOT")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}


def _sh(command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=_user_env(), capture_output=True, text=True,
                          timeout=600)


def _ok(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"`{what}` exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _new_project(root: Path) -> Path:
    """A checkout's root as `brainlatent` finds it (dvc.yaml + params.yaml), with tiny params, no store yet."""
    root.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    return root


REGISTER_TINY_VAE = """
import mlflow
from mlflow import MlflowClient
from brainlatent import registry, tracking
from brainlatent.models.base import build_model

tracking.configure()
model = build_model("vae", {"latent_dim": 4, "volume_shape": [16, 16, 16], "hidden": [8]})
with mlflow.start_run(experiment_id=tracking.experiment_id(tracking.TRAIN_EXPERIMENT)):
    version, _ = registry.log_and_register(model, "vae", model.config_dict(), {"val/mse": 0.5})
MlflowClient().set_registered_model_alias("brainlatent-vae", "champion", version)
"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> Path:
    """A project whose store holds a tiny VAE as brainlatent-vae@champion (what `make repro` leaves, minus data)."""
    root = _new_project(tmp_path_factory.mktemp("readme") / "project")
    _ok(subprocess.run([sys.executable, "-c", REGISTER_TINY_VAE], cwd=root, env=_user_env(), capture_output=True,
                       text=True, timeout=600), "register a tiny VAE")
    return root


def test_activate_puts_the_tools_on_path():
    if not (REPO / ".venv" / "bin" / "activate").is_file():
        pytest.skip("no .venv in the checkout (make test creates it); the suite runs from another environment")
    out = _ok(_sh(f"{ACTIVATE} && command -v brainlatent dvc mlflow", REPO), ACTIVATE)
    assert [Path(p).parent for p in out.split()] == [REPO / ".venv" / "bin"] * 3, out


def test_help_lists_every_command_and_each_command_has_help(tmp_path):
    out = _ok(_sh(HELP, tmp_path), HELP)
    commands = sorted(typer.main.get_command(app).commands)
    assert all(name in out for name in commands), out
    for name in commands:
        _ok(_sh(f"brainlatent {name} --help", tmp_path), f"brainlatent {name} --help")


def test_registry_on_a_new_project_says_it_is_empty(tmp_path):
    root = _new_project(tmp_path / "project")
    out = _ok(_sh(REGISTRY, root), REGISTRY)
    assert "no registered models" in out


def test_registry_and_show_name_the_champion(registered):
    listed = _ok(_sh(REGISTRY, registered), REGISTRY)
    assert re.search(r"brainlatent-vae\n\s+v1\s+\[candidate,champion\]", listed), listed
    shown = _ok(_sh(SHOW, registered), SHOW)
    assert shown.startswith("brainlatent-vae version 1  aliases: candidate, champion"), shown


def test_traverse_as_written_names_the_missing_scan(registered):
    """README's my_T1w_brain.nii.gz is the user's own scan: without it, one line says so."""
    assert_one_error_line(_sh(TRAVERSE, registered), "brainlatent traverse",
                          "input scan not found: my_T1w_brain.nii.gz")
    assert not (registered / "traversal").exists()


def test_python_lookup_loads_the_champion(registered):
    code = LOOKUP + "print(type(vae).__name__, all(hasattr(vae, m) for m in ('encode', 'decode', 'sample')))\n"
    out = _ok(subprocess.run([sys.executable, "-c", code], cwd=registered, env=_user_env(), capture_output=True,
                             text=True, timeout=600), "README's Python look-up")
    assert out.split()[-1] == "True", out
