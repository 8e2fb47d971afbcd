"""MLflow: where runs go, what every run is tagged with, and artifact helpers.

Default store: a SQLite file at the project root (``mlflow.db``) and a local artifact folder (``mlartifacts/``),
both absolute paths. ``MLFLOW_TRACKING_URI`` (e.g. a tracking server ``http://host:5000`` or
``postgresql://...``) overrides them without code changes. A remote server is probed before any expensive
work starts so an unreachable one fails fast with a clear message instead of hanging.

Experiments: every training run of every family goes into one experiment, ``brainlatent-train``, tagged
``model=<family>``: the MLflow UI then compares the four families in one table and one chart (filter with
``tags.model = 'vae'``). Tuning, evaluation, directions and the report each have their own experiment.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Iterable

import mlflow
import numpy as np
import yaml

log = logging.getLogger(__name__)

TRAIN_EXPERIMENT = "brainlatent-train"
TUNE_EXPERIMENT = "brainlatent-tune"
EVAL_EXPERIMENT = "brainlatent-evaluate"
DIRECTIONS_EXPERIMENT = "brainlatent-directions"
REPORT_EXPERIMENT = "brainlatent-report"
FEATURENET_EXPERIMENT = "brainlatent-featurenet"


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI)."""


# A folder is the project root when it holds both of these (what `make repro` and `dvc repro` need).
PROJECT_MARKERS = ("dvc.yaml", "params.yaml")
# DVC runs queued and --temp experiments in a throw-away copy of the repository under this folder.
DVC_TEMP_WORKSPACES = Path(".dvc") / "tmp" / "exps"


def _find_project(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` that holds every :data:`PROJECT_MARKERS` file."""
    for folder in (start, *start.parents):
        if all((folder / marker).is_file() for marker in PROJECT_MARKERS):
            return folder
    return None


def project_root() -> Path:
    """Where the pipeline's inputs and outputs live (data/, metrics/, trained/, checkpoints/).

    Inside a DVC stage (``DVC_STAGE`` is set) it is the stage's working directory: for a queued or ``--temp``
    experiment that is DVC's temporary copy of the repository, whose outputs DVC collects. Elsewhere:
    ``BRAINLATENT_ROOT`` if set, else the nearest folder upward holding ``dvc.yaml`` and ``params.yaml`` (so a
    notebook kernel started in ``notebooks/`` finds the project), else the current directory.
    """
    cwd = Path.cwd().resolve()
    if os.environ.get("DVC_STAGE"):
        return cwd
    if os.environ.get("BRAINLATENT_ROOT"):
        return Path(os.environ["BRAINLATENT_ROOT"]).resolve()
    return _find_project(cwd) or cwd


def store_root(root: Path | None = None) -> Path:
    """Where the MLflow store (``mlflow.db``, ``mlartifacts/``) and the Optuna database live: one per project,
    shared by every DVC experiment. That is ``root`` (default :func:`project_root`) unless ``root`` is one of
    DVC's temporary experiment workspaces (``<repo>/.dvc/tmp/exps/...``, where queued and ``--temp``
    experiments run): then ``<repo>``, so those experiments register into the project's registry instead of a
    store that is deleted with the copy."""
    root = (root or project_root()).resolve()
    marker = DVC_TEMP_WORKSPACES.parts
    for i in range(1, len(root.parts) - len(marker)):
        if root.parts[i : i + len(marker)] == marker:
            return Path(*root.parts[:i])
    return root


def tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's SQLite store ``<store root>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{store_root(root) / 'mlflow.db'}"


def redact_url(url: str) -> str:
    """``url`` with any password masked (``postgresql+psycopg2://user:***@host/db``): safe for logs, tags, errors.

    Database URLs (tracking store, Optuna storage) may carry a password from the environment; it must never
    reach a param, a tag or a message. URLs without credentials (``sqlite:///...``, ``http://host``) are unchanged.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if "@" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a database URL (e.g. http://user:pw@host): mask by hand
        head, _, tail = url.rpartition("@")
        scheme, sep, creds = head.partition("://")
        return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{tail}" if sep else "<URL with credentials>"


def _is_local_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:")


# The database back ends MLflow's tracking store supports besides SQLite, with their default ports.
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}


def _check_database(uri: str, timeout_s: float) -> None:
    """A database store (``postgresql+psycopg2://``, ``mysql+pymysql://``...): its driver imports and its host
    accepts TCP connections. MLflow retries a refused connection for about two minutes before a traceback."""
    import socket

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(uri)
        url.get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise TrackingError(f"MLFLOW_TRACKING_URI {redact_url(uri)} is not a usable database URL: {err}") from None
    except ImportError as err:
        raise TrackingError(
            f"MLFLOW_TRACKING_URI {redact_url(uri)} needs a database driver that is not installed ({err}); for "
            "PostgreSQL `pip install -e \".[postgres]\"` and write postgresql+psycopg2:// (docs/scaling.md)"
        ) from None
    if not url.host:  # a Unix socket: the driver's own error is quick and clear
        return
    port = url.port or DATABASE_PORTS[url.get_backend_name()]
    try:
        socket.create_connection((url.host, port), timeout=timeout_s).close()
    except OSError as err:
        raise TrackingError(
            f"MLflow database {redact_url(uri)} (from MLFLOW_TRACKING_URI) is unreachable at {url.host}:{port}: "
            f"{err}. Start it, or unset MLFLOW_TRACKING_URI to use the project's local SQLite store."
        ) from None


def _check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an unreachable tracking server or database (MLflow's own client retries for minutes)."""
    if uri.partition("://")[0].split("+")[0] in DATABASE_PORTS:
        _check_database(uri, timeout_s)
        return
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status != 200:
                raise TrackingError(f"MLflow tracking server {redact_url(uri)} answered HTTP {resp.status} on /health")
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise TrackingError(
            f"MLflow tracking server {redact_url(uri)} (from MLFLOW_TRACKING_URI) is unreachable: {err}. "
            "Start it, or unset MLFLOW_TRACKING_URI to use the project's local SQLite store."
        ) from None


def configure(root: Path | None = None) -> str:
    """Point MLflow at the project's store (or MLFLOW_TRACKING_URI) and check it answers. Returns the URI."""
    uri = tracking_uri(root)
    _check_reachable(uri)
    # Keep client retries short so a server that dies mid-run does not hang a stage for many minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if _is_local_sqlite(uri):
        _init_sqlite_store(uri)
    return uri


def use_project_store() -> str:
    """Point MLflow at the project's store for read-only use (``registry.load_model`` in a notebook), unless the
    caller already chose one (``MLFLOW_TRACKING_URI``, ``mlflow.set_tracking_uri``, :func:`configure`).

    The project is found like :func:`project_root` (``BRAINLATENT_ROOT``, else upward from the current
    directory), so ``load_model`` works from ``notebooks/`` or any subfolder. A store is never created as a side
    effect: a missing ``mlflow.db`` is a ValueError naming where it looked. Returns the tracking URI in use.
    """
    if mlflow.tracking.is_tracking_uri_set():
        return mlflow.get_tracking_uri()
    uri = tracking_uri()
    if _is_local_sqlite(uri):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise ValueError(
                f"no MLflow store at {db} (project root {project_root()}, found from {Path.cwd()}): run "
                "`make repro` there first, or set BRAINLATENT_ROOT to the project folder or MLFLOW_TRACKING_URI "
                "to a tracking server"
            )
    return configure()


def _init_sqlite_store(uri: str) -> None:
    """Create the SQLite schema under an inter-process lock: two processes starting on a fresh mlflow.db
    would otherwise race through MLflow's migrations ("duplicate column name")."""
    import hashlib

    from filelock import FileLock

    lock = Path(tempfile.gettempdir()) / f"brainlatent-mlflow-{hashlib.sha1(uri.encode()).hexdigest()[:16]}.lock"
    with FileLock(lock, timeout=300):
        mlflow.MlflowClient().search_experiments(max_results=1)


# What MLflow 3's UI reads to open an experiment on its runs table (model development) rather than its GenAI
# overview; the values are the UI's ExperimentKind enum (mlflow/server/js: "custom_model_development").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def experiment_id(name: str, root: Path | None = None) -> str:
    """Get or create an experiment, marked as a model-development experiment (:data:`EXPERIMENT_KIND_TAG`; an
    older experiment without the mark gets it). With the local SQLite store its artifacts go to
    <root>/mlartifacts/<name>."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = None
        if _is_local_sqlite(mlflow.get_tracking_uri()):
            location = (store_root(root) / "mlartifacts" / name).as_uri()
        try:
            return mlflow.create_experiment(name, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:
            # Another process created it between our look-up and create (two trainings on one store).
            exp = mlflow.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


# ------------------------------------------------------------------------------------------ lineage
def git_commit(root: Path | None = None) -> tuple[str, bool]:
    """(commit sha or 'unknown', dirty?) of the project's git checkout."""
    root = root or project_root()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root, capture_output=True, text=True, check=True, timeout=10,
            ).stdout.strip()
        )
        return sha, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def dvc_out_hash(out_path: str, root: Path | None = None) -> str | None:
    """The md5 DVC recorded in dvc.lock for a stage output (e.g. ``data/processed``), or None if not locked yet."""
    lock = (root or project_root()) / "dvc.lock"
    if not lock.is_file():
        return None
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return None
    target = out_path.rstrip("/")
    for stage in stages.values():
        for out in stage.get("outs", []) or []:
            if str(out.get("path", "")).rstrip("/") == target:
                return out.get("md5")
    return None


def content_hash(path: Path) -> str:
    """A sha256 over the names and bytes of every file under ``path``: lineage even before dvc.lock exists."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for f in files:
        h.update(str(f.relative_to(path) if Path(path).is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def lineage_tags(processed_dir: str, root: Path | None = None) -> dict[str, str]:
    """Tags that lead from a run (and the model versions it registers) back to the exact code and data."""
    root = root or project_root()
    sha, dirty = git_commit(root)
    tags = {
        "git_commit": sha,
        "git_dirty": str(dirty).lower(),
        "data.processed_dir": processed_dir,
        "data.content_sha256": content_hash(root / processed_dir),
    }
    md5 = dvc_out_hash(processed_dir, root)
    if md5:
        tags["data.dvc_md5"] = md5
    return {**tags, **dvc_experiment_tags()}


def dataset_digest(lineage: dict[str, str]) -> str:
    """The processed data's identity as an MLflow dataset digest (at most 36 characters): DVC's md5 of
    ``data/processed`` when dvc.lock has one, else the first 32 hex digits of our own content sha256."""
    md5 = lineage.get("data.dvc_md5")
    return md5.removesuffix(".dir") if md5 else lineage["data.content_sha256"][:32]


def processed_dataset(processed_dir: str, root: Path | None = None, lineage: dict[str, str] | None = None):
    """The processed cohort as an MLflow dataset: its subjects table (``subjects.csv``: one row per subject,
    with sex, age and split) named ``processed_dir``, sourced at the folder, with :func:`dataset_digest`."""
    import mlflow.data
    import pandas as pd
    from mlflow.data.sources import LocalArtifactDatasetSource

    root = root or project_root()
    folder = (root / processed_dir).resolve()
    table = folder / "subjects.csv"
    if not table.is_file():
        raise ValueError(f"{table}: not found; the dataset of a run is the processed cohort (run `brainlatent "
                         "prepare` first)")
    lineage = lineage or lineage_tags(processed_dir, root)
    subjects = pd.read_csv(table, dtype={"subject_id": str})
    source = LocalArtifactDatasetSource(str(folder))  # explicit: a bare path matches two registered source types
    return mlflow.data.from_pandas(subjects, source=source, name=processed_dir, digest=dataset_digest(lineage))


def log_dataset(processed_dir: str, context: str, root: Path | None = None, lineage: dict[str, str] | None = None,
                model_id: str | None = None) -> None:
    """Log the processed cohort (:func:`processed_dataset`) as an input of the active run with ``context``
    (``training``, ``evaluation``, ``directions``...): the runs table's Dataset column and the run's lineage.
    ``model_id``: also link it to that logged model (MLflow 3's model page lists its training data)."""
    from mlflow.entities import LoggedModelInput

    dataset = processed_dataset(processed_dir, root, lineage)
    with warnings.catch_warnings():  # a record of the cohort, not a model's input schema: no int-vs-NaN advice
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
        mlflow.log_input(dataset, context=context, model=LoggedModelInput(model_id) if model_id else None)


# What DVC tells a stage about the experiment it runs in (`dvc exp run`, queued or not): tagged on every run,
# so the MLflow UI filters one experiment's runs with `tags."dvc.exp_name" = '<name>'`.
DVC_EXPERIMENT_ENV = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}


def dvc_experiment_tags() -> dict[str, str]:
    """``dvc.exp_name`` and ``dvc.baseline_rev`` when running inside a DVC experiment, else {}."""
    return {tag: os.environ[env] for env, tag in DVC_EXPERIMENT_ENV.items() if os.environ.get(env)}


# ---------------------------------------------------------------------------------------- artifacts
def log_volumes(
    volumes: np.ndarray,
    affine: np.ndarray,
    artifact_path: str,
    names: Iterable[str],
    title: str | None = None,
) -> None:
    """Log volumes ``(N, X, Y, Z)`` as NIfTI files plus one tri-planar PNG montage under ``artifact_path``."""
    from brainlatent.viz.montage import save_nifti, triplanar_montage

    names = list(names)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for vol, name in zip(volumes, names):
            save_nifti(np.asarray(vol, np.float32), affine, tmp / f"{name}.nii.gz")
        # Drawn in the NIfTIs' own world coordinates; a plain Figure (no pyplot), freed with this scope.
        triplanar_montage(np.asarray(volumes), titles=names, path=tmp / "montage.png", affine=affine)
        mlflow.log_artifacts(str(tmp), artifact_path=artifact_path)


def log_json(obj: Any, artifact_file: str) -> None:
    mlflow.log_dict(json.loads(json.dumps(obj, default=_json_default)), artifact_file)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


# MLflow 3.17's UI picks GenAI or model-training pages from this query parameter (else from the browser's last
# choice, GenAI by default) before it reads the experiment's kind tag: links we print name it.
UI_WORKFLOW = "workflowType=machine_learning"


def _ui_base() -> str:
    uri = mlflow.get_tracking_uri()
    return uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"


def run_url(run) -> str:
    """Where a run shows up in the UI (``make ui`` serves the local store on 127.0.0.1:5000)."""
    return f"{_ui_base()}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?{UI_WORKFLOW}"


def experiment_url(experiment_id: str, charts: bool = False) -> str:
    """An experiment's runs table in the UI (model-training pages), or with ``charts`` its chart view: one
    panel per metric, every run's curve in it (the families' validation curves side by side)."""
    mode = "&compareRunsMode=CHART" if charts else ""
    return f"{_ui_base()}/#/experiments/{experiment_id}/runs?{UI_WORKFLOW}{mode}"
