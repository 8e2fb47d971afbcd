"""Optuna hyperparameter search per model family, tracked as nested MLflow runs (`brainlatent tune`).

One Optuna study per family and configuration (``<tune.study_prefix>-<family>-<config hash>``) in a shared storage, so any number of workers on
any number of machines cooperate on it. Each trial trains the family from scratch for ``tune.epochs`` epochs with
the sampled values (checkpoints in a temporary folder, nothing registered), reports the family's validation
metric (:data:`brainlatent.registry.VALIDATION_METRICS`) after every epoch so the pruner can stop bad trials, and
returns the last reported value. The best values go to ``tuned/<family>.json`` (DVC-tracked), which
:func:`apply_tuned` folds into the family's params for the `train` stage.

MLflow (experiment ``brainlatent-tune``): one parent run per study (tag ``model=<family>``; its id is stored in
the study, so every worker nests under the same parent) and one nested run per trial, holding the trial's params,
per-epoch curves and its state (tag ``state`` = complete | pruned | failed; run status FINISHED | KILLED | FAILED)
with the failure reason. Each worker, when it finishes, logs the study summary (best value and params, the
optimisation history, intermediate values and parameter importances) to the parent run.

See docs/tuning.md for the space syntax, storage, parallel workers and the dashboard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
import traceback
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
import torch
from filelock import FileLock
from optuna.trial import TrialState

from brainlatent import tracking
from brainlatent.config import FAMILY_CONFIGS, Params, StyleGANConfig, TuneConfig
from brainlatent.registry import VALIDATION_METRICS

log = logging.getLogger(__name__)

STORAGE_ENV = "BRAINLATENT_OPTUNA_STORAGE"
TUNED_DIR = "tuned"
# Trials that count towards tune.n_trials: every finished one, whatever its outcome.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# Adversarial validation proxies jump from epoch to epoch: the objective is their mean over the last k epochs
# so that neither the pruner nor the final ranking rewards one lucky epoch. Reconstruction metrics are smooth.
SMOOTHING_EPOCHS: dict[str, int] = {"gan": 3, "stylegan": 3}

# Study user attributes written by the worker that creates the study; later workers read them.
_IDENTITY_ATTR = "brainlatent.identity"
_PARENT_ATTR = "brainlatent.mlflow_parent_run_id"
_ATTR_WAIT_S = 60.0  # how long a joining worker waits for the creator to write them
_SPEC_KEYS = {"low", "high", "log", "step", "choices"}


# ------------------------------------------------------------------------------------------ the space
@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: ``float`` / ``int`` range (optionally log or stepped) or ``categorical``."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_spec(where: str, name: str, spec: Any) -> ParamSpec:
    """One ``tune.space.<family>.<param>`` mapping -> ParamSpec; ValueError naming ``where`` otherwise."""
    expected = "expected {low, high[, log: bool]} | {low, high, step} | {choices: [...]}"
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{where}: {expected}, got {spec!r}")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; {expected}")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise ValueError(f"{where}: 'choices' cannot be combined with {sorted(set(spec) - {'choices'})}")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"{where}.choices: expected a non-empty list, got {choices!r}")
        bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]
        if bad:  # Optuna's categorical distribution stores only scalars
            raise ValueError(f"{where}.choices: only scalars (number, string, bool, null) allowed, got {bad}")
        if len(set(map(repr, choices))) != len(choices):
            raise ValueError(f"{where}.choices: duplicate values in {list(choices)}")
        return ParamSpec(name, "categorical", choices=tuple(choices))
    missing = sorted({"low", "high"} - set(spec))
    if missing:
        raise ValueError(f"{where}: missing {missing}; {expected}")
    low, high, use_log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if not (_is_number(low) and _is_number(high)) or not low < high:
        hint = " (YAML reads 1e-3 as a string: write 1.0e-3)" if str in (type(low), type(high)) else ""
        raise ValueError(
            f"{where}: low and high must be finite numbers with low < high, got {low!r}, {high!r}{hint}"
        )
    if not isinstance(use_log, bool):
        raise ValueError(f"{where}.log: expected true or false, got {use_log!r}")
    if use_log and low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0, got {low!r}")
    if step is not None:
        if use_log:
            raise ValueError(f"{where}: 'step' and 'log: true' cannot be combined (Optuna does not support it)")
        if not _is_number(step) or step <= 0:
            raise ValueError(f"{where}.step: expected a positive number, got {step!r}")
    is_int = all(isinstance(v, int) for v in (low, high)) and (step is None or isinstance(step, int))
    return ParamSpec(name, "int" if is_int else "float", low, high, use_log, step)


def parse_space(tune: TuneConfig, families: dict[str, Any]) -> dict[str, dict[str, ParamSpec]]:
    """Validate ``tune.space`` for every family in it, before any work.

    ``families`` maps family -> its config instance (``params.family(name)``). Each parameter must be a field of
    that section (not ``epochs``: a trial trains ``tune.epochs``), and ``low``/``high``/every choice must be a
    valid value for the field. Raises ValueError naming ``tune.space.<family>.<param>``.
    """
    out: dict[str, dict[str, ParamSpec]] = {}
    for family, space in tune.space.items():
        if family not in families:
            raise ValueError(f"tune.space.{family}: unknown model family; expected one of {sorted(families)}")
        if not isinstance(space, dict):
            raise ValueError(f"tune.space.{family}: expected a mapping of parameter -> spec, got {space!r}")
        cfg = families[family]
        fields = {f.name for f in dataclasses.fields(cfg)}
        specs = {}
        for name, raw in space.items():
            where = f"tune.space.{family}.{name}"
            if name in tune.pinned_keys(family):  # the user's params.yaml value wins: not searched at all
                continue
            if name == "epochs":
                raise ValueError(f"{where}: epochs cannot be searched; every trial trains tune.epochs epochs")
            if name not in fields:
                raise ValueError(f"{where}: {family} has no parameter {name!r}; expected one of {sorted(fields)}")
            spec = _parse_spec(where, name, raw)
            probes = spec.choices if spec.kind == "categorical" else (spec.low, spec.high)
            for value in probes:  # the family's own (pydantic) validation: type and range of the field
                try:
                    dataclasses.replace(cfg, **{name: value})
                except ValueError as err:
                    raise ValueError(f"{where}: {value!r} is not a valid {family}.{name}: {err}") from None
            specs[name] = spec
        out[family] = specs
    return out


def trial_family_config(cfg: Any, tune_epochs: int, values: dict[str, Any] | None = None) -> Any:
    """The family section a tuning trial trains: ``values`` (the sampled parameters) applied, ``tune_epochs``
    epochs. StyleGAN's progressive-growing schedule is compressed with the run, ``epochs_per_level`` scaled by
    ``tune_epochs / epochs``: a trial spends the same share of its epochs at each resolution as the training
    it stands for, so it reaches and trains the full resolution (a valid training schedule gives a valid
    trial schedule) instead of comparing values on the coarsest level only. ValueError (pydantic's) for
    sampled values that make the training configuration invalid."""
    base = dataclasses.replace(cfg, **values) if values else cfg
    changes: dict[str, Any] = {"epochs": tune_epochs}
    if isinstance(base, StyleGANConfig):
        changes["epochs_per_level"] = base.epochs_per_level * tune_epochs / base.epochs
    return dataclasses.replace(base, **changes)


def check_schedules(params: Params, family: str) -> None:
    """StyleGAN only: ValueError naming the keys when ``stylegan.epochs`` or a trial's ``tune.epochs`` cannot
    train the last resolution level for ``data.shape`` (``StyleGANConfig.check_schedule``)."""
    cfg = params.family(family)
    if isinstance(cfg, StyleGANConfig):
        shape = tuple(params.data.shape)
        cfg.check_schedule(shape)
        trial = trial_family_config(cfg, params.tune.epochs)
        trial.check_schedule(shape, key=f"tune.epochs (epochs_per_level {trial.epochs_per_level:g} in a trial)")


def objective_metric(family: str) -> tuple[str, str]:
    """(validation metric, "minimize" | "maximize") of ``family``: what its training reports every epoch."""
    if family not in VALIDATION_METRICS:
        raise ValueError(f"family {family!r} has no validation metric in registry.VALIDATION_METRICS")
    metric, higher = VALIDATION_METRICS[family]
    return metric, "maximize" if higher else "minimize"


# ------------------------------------------------------------------------------------------- storage
def storage_url(tune: TuneConfig, root: Path) -> str:
    """``$BRAINLATENT_OPTUNA_STORAGE`` > ``tune.storage`` > ``sqlite:///<store root>/optuna.db`` (beside the MLflow
    store: one per project, shared by DVC's temporary experiment workspaces, see ``tracking.store_root``)."""
    return os.environ.get(STORAGE_ENV) or tune.storage or f"sqlite:///{tracking.store_root(root) / 'optuna.db'}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats, so trials of a worker that died (kill -9, lost machine) become FAIL.

    SQLite is fine for several processes on one machine (measured in tests/test_tuning.py): Optuna's writes are
    short transactions, and a 60 s busy timeout replaces SQLite's default 5 s so that workers queue on the lock
    instead of failing. Across machines use a server database (PostgreSQL, MySQL); see docs/tuning.md.
    """
    from sqlalchemy.exc import IntegrityError

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None

    def connect() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9, and stable in practice
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=60, grace_period=180)

    try:
        try:
            return connect()
        except IntegrityError:
            # Workers on several machines creating the schema of a fresh PostgreSQL database at the same moment
            # collide on a unique index (measured: 3 of 4 workers, 3 times out of 3); once the winner commits
            # the schema exists, so one retry opens it.
            time.sleep(1.0)
            return connect()
    except Exception as err:  # sqlalchemy raises many types (bad driver, bad URL, refused connection)
        raise ValueError(
            f"Optuna storage {tracking.redact_url(url)} (tune.storage or ${STORAGE_ENV}) cannot be opened: "
            f"{type(err).__name__}: {err}"
        ) from None


def make_pruner(tune: TuneConfig) -> optuna.pruners.BasePruner:
    """``tune.pruner``. Pruning steps are 1-based epochs; ``pruner_warmup_epochs`` epochs are never pruned."""
    if tune.pruner == "none":
        return optuna.pruners.NopPruner()
    if tune.pruner == "median":
        # Optuna's default waits for 5 completed trials: with the pipeline's 6 trials nothing would ever be pruned.
        startup = max(2, min(5, tune.n_trials // 4))
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=tune.pruner_warmup_epochs + 1)
    min_resource = min(tune.pruner_warmup_epochs + 1, tune.epochs)
    return optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=tune.epochs, reduction_factor=3)


def make_sampler(tune: TuneConfig, seed: int) -> optuna.samplers.TPESampler:
    # A third of the budget as random start-up trials (Optuna's fixed 10 would make short studies random search).
    startup = max(2, min(10, tune.n_trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


# ------------------------------------------------------------------------------------ tuned/<family>.json
def tuned_path(root: Path, family: str) -> Path:
    return root / TUNED_DIR / f"{family}.json"


def write_json_atomic(obj: dict[str, Any], path: Path) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary file and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class TunedValues:
    """The hyperparameters one training run uses, and where each tuned one came from.

    ``params``: the project's params with the family's section updated by ``tuned/<family>.json``.
    ``used``: every searched or pinned key -> the value training uses. ``overridden``: key -> (params.yaml
    value, tuned value) where tuning replaced a different value the user had set. ``pinned``: keys listed in
    ``tune.pinned``, trained with the params.yaml value whatever the tuned file says.
    """

    params: Params
    source: str  # the tuned file, or why none was applied
    used: dict[str, Any]
    overridden: dict[str, tuple[Any, Any]]
    pinned: tuple[str, ...]

    def mlflow_tags(self) -> dict[str, str]:
        """Tags of the training run: where the tuned values came from and every value they replaced."""
        tags = {"tuned.source": self.source}
        if self.pinned:
            tags["tuned.pinned"] = ",".join(self.pinned)
        tags.update({f"tuned.override.{k}": f"params.yaml {a!r} -> tuned {b!r}" for k, (a, b) in self.overridden.items()})
        return tags


def resolve_tuned(params: Params, family: str, root: Path | None = None) -> TunedValues:
    """``params`` with ``family``'s section updated by ``tuned/<family>.json`` (the `train` stage's input).

    The result is what training will use: a StyleGAN schedule that cannot train the last resolution level
    for ``data.shape`` is refused here, naming the keys (``StyleGANConfig.check_schedule``).
    """
    tuned = _fold_tuned(params, family, root)
    cfg = tuned.params.family(family)
    if isinstance(cfg, StyleGANConfig):
        cfg.check_schedule(tuple(params.data.shape), key=f"stylegan.epochs (training, from {tuned.source})")
    return tuned


def _fold_tuned(params: Params, family: str, root: Path | None = None) -> TunedValues:
    """``params`` with ``family``'s section updated by ``tuned/<family>.json`` (see :func:`resolve_tuned`).

    Applies only when ``family`` is in ``tune.families`` and the file exists and is not ``skipped``. Keys in
    ``tune.pinned`` keep their params.yaml value. A tuned value that replaces a different params.yaml value is
    logged as a warning and recorded (:class:`TunedValues`): a value the user sets is never replaced silently.
    ValueError naming the file for malformed content or an unknown/invalid field.
    """
    cfg = params.family(family)
    pinned = params.tune.pinned_keys(family)
    searched = set(params.tune.space.get(family, {})) | set(pinned)
    current = {k: v for k, v in dataclasses.asdict(cfg).items() if k in searched}

    def unchanged(source: str) -> TunedValues:
        return TunedValues(params, source, current, {}, pinned)

    if family not in params.tune.families:
        return unchanged(f"not tuned ({family} is not in tune.families)")
    root = (root or tracking.project_root()).resolve()
    path = tuned_path(root, family)
    if not path.is_file():
        log.info("%s not found: training %s with params.yaml values", path, family)
        return unchanged(f"{path.relative_to(root) if path.is_relative_to(root) else path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); re-run `brainlatent tune --model {family}`") from None
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise ValueError(f"{path}: expected an object with a 'params' mapping (written by `brainlatent tune`)")
    if data.get("family") != family:
        raise ValueError(f"{path}: 'family' is {data.get('family')!r}, expected {family!r}")
    if data.get("skipped") or not data["params"]:
        return unchanged(f"{TUNED_DIR}/{family}.json holds no tuned values")
    fields = {f.name for f in dataclasses.fields(cfg)} - {"epochs"}
    unknown = sorted(set(data["params"]) - fields)
    if unknown:
        raise ValueError(f"{path}: unknown {family} parameter(s) {unknown}; expected some of {sorted(fields)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data["params"].items() if k not in pinned}
    try:
        tuned = dataclasses.replace(cfg, **values)
    except ValueError as err:
        raise ValueError(f"{path}: invalid {family} value(s) {data['params']}: {err}") from None
    source = f"{TUNED_DIR}/{family}.json (study {data.get('study')})"
    overridden = {k: (getattr(cfg, k), v) for k, v in values.items() if getattr(cfg, k) != v}
    for key, (mine, theirs) in overridden.items():
        log.warning("%s.%s: params.yaml says %r, training uses the tuned %r from %s. To train with your value, pin "
                    "it: dvc exp run -S '%s.%s=%r' -S 'tune.pinned.%s=[%s]'", family, key, mine, theirs, source,
                    family, key, mine, family, key)
    if pinned:
        log.info("%s: pinned to params.yaml (tune.pinned.%s): %s", family, family, {k: getattr(cfg, k) for k in pinned})
    used = {k: v for k, v in dataclasses.asdict(tuned).items() if k in searched}
    return TunedValues(dataclasses.replace(params, **{family: tuned}), source, used, overridden, pinned)


def apply_tuned(params: Params, family: str, root: Path | None = None) -> Params:
    """``params`` with ``family``'s section updated by ``tuned/<family>.json`` (see :func:`resolve_tuned`)."""
    return resolve_tuned(params, family, root).params


# ------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TuneResult:
    family: str
    skipped: bool
    study: str | None
    metric: str
    direction: str
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    n_complete: int
    n_pruned: int
    n_failed: int
    parent_run_id: str | None
    path: Path  # tuned/<family>.json


def _summary(family: str, study: optuna.Study | None, metric: str, direction: str) -> dict[str, Any]:
    """The content of tuned/<family>.json."""
    out: dict[str, Any] = {
        "family": family, "metric": metric, "direction": direction, "study": study.study_name if study else None,
        "params": {}, "value": None, "best_trial": None, "n_complete": 0, "n_pruned": 0, "n_failed": 0,
        "skipped": study is None,
    }
    if study is None:
        return out
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    out["n_complete"] = sum(t.state == TrialState.COMPLETE for t in trials)
    out["n_pruned"] = sum(t.state == TrialState.PRUNED for t in trials)
    out["n_failed"] = sum(t.state == TrialState.FAIL for t in trials)
    if out["n_complete"]:
        best = study.best_trial
        out.update(params=dict(best.params), value=float(best.value), best_trial=best.number)
    return out


# ------------------------------------------------------------------------------------------ objective
class _Smoother:
    """Mean of the last ``k`` values (k=1: the value itself)."""

    def __init__(self, k: int):
        self.values: deque[float] = deque(maxlen=k)

    def __call__(self, value: float) -> float:
        self.values.append(value)
        return sum(self.values) / len(self.values)


class _Objective:
    """Train one trial's configuration and return its (smoothed) validation metric; logs a nested MLflow run."""

    def __init__(self, family: str, params: Params, specs: dict[str, ParamSpec], data, lineage: dict[str, str],
                 experiment_id: str, parent_run_id: str, study_name: str):
        from brainlatent.train.device import resolve_device

        self.family, self.params, self.specs = family, params, specs
        from brainlatent.data.dataset import open_split

        # Streamed when too large for memory, as in train_family (issue 17); validation stays in memory.
        self.train_x, self.val_x, self.grid = open_split(data, "train"), data.load_split("val"), data.grid
        if len(self.val_x) == 0:
            raise ValueError(f"{data.root}: the validation split is empty; increase data.split_fractions[1]")
        self.lineage, self.experiment_id, self.parent_run_id = lineage, experiment_id, parent_run_id
        self.study_name = study_name
        self.metric, _ = objective_metric(family)
        self.device = resolve_device(params.device)

    def trial_params(self, values: dict[str, Any]) -> Params:
        cfg = trial_family_config(self.params.family(self.family), self.params.tune.epochs, values)
        if isinstance(cfg, StyleGANConfig):
            cfg.check_schedule(tuple(self.grid.shape), key="tune.epochs")
        return dataclasses.replace(self.params, **{self.family: cfg})

    def __call__(self, trial: optuna.Trial) -> float:
        values = {name: spec.suggest(trial) for name, spec in self.specs.items()}
        run = mlflow.start_run(
            experiment_id=self.experiment_id, run_name=f"{self.study_name}-trial-{trial.number:04d}",
            nested=True, parent_run_id=self.parent_run_id, log_system_metrics=False,
            tags={"model": self.family, "stage": "tune", "optuna.study": self.study_name,
                  "optuna.trial": str(trial.number), "state": "running", **self.lineage},
        )
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        try:
            value = self._train(trial, values)
        except optuna.TrialPruned as err:
            mlflow.set_tags({"state": "pruned", "pruned_reason": str(err)})
            mlflow.end_run(status="KILLED")
            raise
        except Exception as err:  # any crash fails this trial only; Optuna records it and the study goes on
            reason = f"{type(err).__name__}: {err}"[:4000]
            trial.set_user_attr("fail_reason", reason)
            mlflow.set_tags({"state": "failed", "fail_reason": reason})
            mlflow.log_text(traceback.format_exc(), "failure.txt")
            mlflow.end_run(status="FAILED")
            raise
        except BaseException:  # KeyboardInterrupt: the whole worker stops
            mlflow.set_tag("state", "interrupted")
            mlflow.end_run(status="KILLED")
            raise
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # an OOM trial must not starve the next one
        mlflow.log_metric("objective_final", value)
        mlflow.set_tag("state", "complete")
        mlflow.end_run(status="FINISHED")
        return value

    def _train(self, trial: optuna.Trial, values: dict[str, Any]) -> float:
        from brainlatent.train.device import seed_everything
        from brainlatent.train.loop import LoopConfig, NonFiniteLossError, run_loop
        from brainlatent.train.runner import make_task, run_params

        params = self.trial_params(values)  # validated by the family config (pydantic) on construction
        cfg = params.family(self.family)
        mlflow.log_params(run_params(self.family, params))
        seed_everything(params.seed)  # every trial starts from the same weights: differences are the params'
        task = make_task(self.family, params, self.grid.shape, self.device)
        smooth = _Smoother(SMOOTHING_EPOCHS.get(self.family, 1))
        last: list[float] = []

        def on_epoch_end(epoch: int, metrics: dict[str, float], _log_artifacts: bool) -> None:
            mlflow.log_metrics(metrics, step=epoch + 1)
            if self.metric not in metrics:
                raise RuntimeError(f"{self.family} validation returned {sorted(metrics)}, not {self.metric!r}")
            raw = float(metrics[self.metric])
            if not math.isfinite(raw):
                raise NonFiniteLossError(f"{self.metric} became {raw} at epoch {epoch + 1}")
            value = smooth(raw)
            last[:] = [value]
            mlflow.log_metric("objective", value, step=epoch + 1)
            trial.report(value, epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: objective {value:.6g}")

        with tempfile.TemporaryDirectory(prefix=f"brainlatent-tune-{self.family}-") as tmp:
            loop = LoopConfig(
                epochs=cfg.epochs, batch_size=cfg.batch_size, seed=params.seed, checkpoint=Path(tmp) / "last.pt",
                artifact_every=cfg.epochs + 1,  # no artifacts: trials are compared by numbers only
            )
            run_loop(task, self.train_x, self.val_x, loop, on_epoch_end=on_epoch_end)
        return last[0]


# -------------------------------------------------------------------------------------------- study
def _identity(family: str, params: Params, raw_space: dict[str, Any], data_sha: str) -> dict[str, Any]:
    """What makes trials of one study comparable. A worker with another identity must not join the study."""
    metric, direction = objective_metric(family)
    # The trial's own section: for StyleGAN its compressed schedule depends on the training epochs too.
    trial = trial_family_config(params.family(family), params.tune.epochs)
    fixed = {k: v for k, v in dataclasses.asdict(trial).items() if k not in raw_space and k != "epochs"}
    return {
        "family": family, "metric": metric, "direction": direction, "space": raw_space,
        "epochs": params.tune.epochs, "fixed": json.loads(json.dumps(fixed)), "seed": params.seed,
        "bf16": params.train.bf16, "data_sha256": data_sha,
    }


def _wait_for_attrs(study: optuna.Study, storage_txt: str) -> dict[str, Any]:
    """A joining worker waits (briefly) for the creating worker to write the study's attributes."""
    deadline = time.monotonic() + _ATTR_WAIT_S
    while True:
        attrs = study.user_attrs
        if _IDENTITY_ATTR in attrs and _PARENT_ATTR in attrs:
            return attrs
        if time.monotonic() > deadline:
            raise ValueError(
                f"study {study.study_name!r} in {storage_txt} has no {_IDENTITY_ATTR!r} attribute after "
                f"{_ATTR_WAIT_S:.0f} s: another tool created it, or its first worker crashed while starting. "
                "Delete it (optuna delete-study) or change tune.study_prefix."
            )
        time.sleep(0.5)


def _open_study(name: str, storage, direction: str, tune: TuneConfig, identity: dict[str, Any],
                storage_txt: str) -> tuple[optuna.Study, bool]:
    """Create the study (returns created=True: this worker owns the parent run) or join an existing one."""
    pruner = make_pruner(tune)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction=direction,
                                    sampler=make_sampler(tune, tune.seed), pruner=pruner)
        study.set_user_attr(_IDENTITY_ATTR, identity)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    # A joining worker draws its own sampler seed: with the creator's seed its first random trials would repeat
    # the creator's. Only a single worker on a fresh study is reproducible (interleaving of workers is not).
    seed = random.SystemRandom().randrange(2**31)
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(tune, seed), pruner=pruner)
    if study.direction.name.lower() != direction:
        raise ValueError(f"study {name!r} in {storage_txt} is to {study.direction.name.lower()}, expected {direction}")
    theirs = _wait_for_attrs(study, storage_txt)[_IDENTITY_ATTR]
    if theirs != identity:
        differ = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
        raise ValueError(
            f"study {name!r} in {storage_txt} was run with another configuration (differs in {differ}): its trials "
            f"are not comparable with this one's. Change tune.study_prefix, or delete the old study: "
            f"optuna delete-study --study-name {name} --storage <storage>"
        )
    log.info("joining study %s (%d trials so far) with sampler seed %d", name, len(study.trials), seed)
    return study, False


def _start_parent_run(study: optuna.Study, created: bool, family: str, params: Params, specs_raw: dict,
                      lineage: dict[str, str], experiment_id: str, storage_txt: str):
    """Open the study's parent run: create it (first worker) or re-open the one recorded in the study."""
    if not created:
        run_id = _wait_for_attrs(study, storage_txt)[_PARENT_ATTR]
        try:
            return mlflow.start_run(run_id=run_id, log_system_metrics=False)
        except mlflow.exceptions.MlflowException as err:
            log.warning("parent run %s of study %s is not in this MLflow store (%s); starting a new one",
                        run_id, study.study_name, err)
    metric, direction = objective_metric(family)
    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=study.study_name, log_system_metrics=False,
        tags={"model": family, "stage": "tune", "optuna.study": study.study_name, "optuna.storage": storage_txt,
              "optuna.metric": metric, "optuna.direction": direction, **lineage},
    )
    tune = params.tune
    mlflow.log_params({
        "model": family, "tune.n_trials": tune.n_trials, "tune.epochs": tune.epochs, "tune.pruner": tune.pruner,
        "tune.pruner_warmup_epochs": tune.pruner_warmup_epochs, "tune.seed": tune.seed,
        "tune.smoothing_epochs": SMOOTHING_EPOCHS.get(family, 1),
        **{f"space.{k}": json.dumps(v, sort_keys=True) for k, v in specs_raw.items()},
    })
    study.set_user_attr(_PARENT_ATTR, run.info.run_id)
    return run


def _log_study_summary(study: optuna.Study, summary: dict[str, Any], seed: int) -> None:
    """Best value/params, counts, the trials table and Optuna's figures to the active (parent) run."""
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    step = summary["n_complete"] + summary["n_pruned"] + summary["n_failed"]
    mlflow.log_metrics({k: summary[k] for k in ("n_complete", "n_pruned", "n_failed")}, step=step)
    if summary["value"] is not None:
        mlflow.log_metric("best_value", summary["value"], step=step)
        # Tags, not params: params are immutable and the best values change as workers add trials.
        mlflow.set_tags({"best_trial": str(summary["best_trial"]),
                         **{f"best.{k}": str(v) for k, v in summary["params"].items()}})
    tracking.log_json(summary, "tuned.json")
    mlflow.log_text(study.trials_dataframe().to_csv(index=False), "trials.csv")

    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    figures = {
        "optimization_history": lambda: ovm.plot_optimization_history(study),
        "intermediate_values": lambda: ovm.plot_intermediate_values(study),
    }
    if summary["n_complete"] >= 2:
        figures["param_importances"] = lambda: ovm.plot_param_importances(study, evaluator=evaluator)
        try:
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
            tracking.log_json(importances, "param_importances.json")
        except Exception as err:  # e.g. every completed trial has identical params
            log.warning("parameter importances unavailable: %s", err)
    else:
        mlflow.set_tag("param_importances", f"needs >= 2 completed trials, have {summary['n_complete']}")
    for name, plot in figures.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = plot()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            mlflow.log_figure(fig, f"figures/{name}.png")
            plt.close(fig)
        except Exception as err:  # a figure must never fail a finished study
            log.warning("figure %s not drawn: %s", name, err)


def _setup_lock(root: Path) -> FileLock:
    """An inter-process lock per project (in the temp dir: nothing to ignore in git or DVC)."""
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"brainlatent-tune-{digest}.lock", timeout=600)


def _check_tunable(family: str, params: Params, specs: dict[str, ParamSpec]) -> None:
    """ValueError, before any store is opened, unless a family in ``tune.families`` can be tuned: its schedule
    and ``tune.epochs`` make a valid trial, and ``tune.space`` has parameters to search."""
    tune = params.tune
    check_schedules(params, family)  # StyleGAN: a schedule that cannot reach the last level fails now, by name
    try:
        trial_family_config(params.family(family), tune.epochs)
    except ValueError as err:
        raise ValueError(f"tune.epochs: {tune.epochs} epochs per trial is not valid for {family}: {err}") from None
    if not specs:
        raise ValueError(
            f"tune.space.{family}: no parameters to search, but {family} is in tune.families. Add a search space "
            f"(docs/tuning.md) or remove {family} from tune.families."
        )


def tune_family(family: str, params: Params, *, root: Path | None = None) -> TuneResult:
    """Run (or join) the Optuna study of ``family`` until it holds ``tune.n_trials`` finished trials.

    Writes ``tuned/<family>.json`` and returns the study summary. A family not in ``tune.families`` is not tuned:
    the file is written with ``"params": {}`` and ``"skipped": true``. Raises ValueError for an invalid space or
    storage, and RuntimeError when the study has no completed trial at all (every trial pruned or failed).
    """
    root = (root or tracking.project_root()).resolve()
    tune = params.tune
    params.family(family)  # ConfigError (a ValueError) for an unknown family
    metric, direction = objective_metric(family)
    families = {f: params.family(f) for f in FAMILY_CONFIGS}
    specs = parse_space(tune, families).get(family, {})
    path = tuned_path(root, family)
    if family not in tune.families:
        write_json_atomic(_summary(family, None, metric, direction), path)
        log.info("%s is not in tune.families: not tuned (%s marks it skipped)", family, path)
        return TuneResult(family, True, None, metric, direction, None, {}, None, 0, 0, 0, None, path)
    _check_tunable(family, params, specs)

    from brainlatent.data.dataset import ProcessedData

    tracking.configure(root)  # fail fast on an unreachable MLflow server
    url = storage_url(tune, root)
    storage_txt = tracking.redact_url(url)
    data = ProcessedData.open(root / params.data.processed_dir)
    lineage = tracking.lineage_tags(params.data.processed_dir, root)
    raw_space = {k: tune.space[family][k] for k in specs}
    identity = _identity(family, params, raw_space, lineage["data.content_sha256"])
    # The name carries a hash of what makes trials comparable: after a config or data change `dvc repro` starts
    # a fresh study instead of refusing, while workers with the same config still meet in one study.
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = f"{tune.study_prefix}-{family}-{digest}"
    # Workers started together on one machine would race to create the SQLite schemas (MLflow's migrations
    # fail with "duplicate column"), the study and its parent run: one at a time through this short section.
    with _setup_lock(root):
        experiment_id = tracking.experiment_id(tracking.TUNE_EXPERIMENT, root)
        study, created = _open_study(name, open_storage(url), direction, tune, identity, storage_txt)
        parent = _start_parent_run(study, created, family, params, raw_space, lineage, experiment_id, storage_txt)
        if created:  # the first worker records the cohort: the runs table's Dataset column
            tracking.log_dataset(params.data.processed_dir, "tuning", root, lineage)
    status = "FAILED"
    try:
        objective = _Objective(family, params, specs, data, lineage, experiment_id, parent.info.run_id, name)
        done = len(study.get_trials(deepcopy=False, states=FINISHED))
        remaining = tune.n_trials - done
        if remaining > 0:
            log.info("study %s (%s): %d finished trial(s), running up to %d more", name, storage_txt, done, remaining)
            study.optimize(
                objective, n_trials=remaining, catch=(Exception,), gc_after_trial=True,
                # Counts every worker's trials: together they stop at n_trials (+ at most workers-1 in flight).
                callbacks=[optuna.study.MaxTrialsCallback(tune.n_trials, states=FINISHED)],
            )
        summary = _summary(family, study, metric, direction)
        _log_study_summary(study, summary, tune.seed)
        if summary["value"] is None:
            raise RuntimeError(
                f"study {name!r}: no trial completed ({summary['n_pruned']} pruned, {summary['n_failed']} failed; "
                f"reasons in the MLflow runs of experiment {tracking.TUNE_EXPERIMENT}, tag fail_reason)"
            )
        write_json_atomic(summary, path)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)
    log.info("study %s: best %s = %.6g with %s -> %s", name, metric, summary["value"], summary["params"], path)
    return TuneResult(
        family, False, name, metric, direction, summary["value"], summary["params"], summary["best_trial"],
        summary["n_complete"], summary["n_pruned"], summary["n_failed"], parent.info.run_id, path,
    )
