"""Find the direction fitted for one model version: in the ``directions`` stage's DVC output, else in the newest
finished ``brainlatent-directions`` MLflow run of that version."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from brainlatent import registry, tracking

from .direction import Direction

log = logging.getLogger(__name__)

# Short names a user may type; the ordinal probe uses every age group, so it is "the" age direction.
DIRECTION_ALIASES: dict[str, str] = {"age": "age_group"}
DIRECTIONS_ARTIFACT_DIR = "directions"  # inside a directions run's artifacts and under directions/<family>/


def directions_dir(root: Path, family: str) -> Path:
    """Where the ``directions`` stage writes a family's direction JSONs (DVC output)."""
    return Path(root) / "directions" / family / DIRECTIONS_ARTIFACT_DIR


def _fitted_for(direction: Direction, loaded: registry.LoadedModel) -> bool:
    meta = direction.metadata
    return meta.get("model_name") == loaded.name and str(meta.get("model_version")) == str(loaded.version)


def _latest_directions_run(loaded: registry.LoadedModel) -> str | None:
    """The newest finished ``brainlatent-directions`` run of exactly this model version, if any."""
    exp = mlflow.get_experiment_by_name(tracking.DIRECTIONS_EXPERIMENT)
    if exp is None:
        return None
    runs = MlflowClient().search_runs(
        [exp.experiment_id],
        filter_string=(f"tags.model_name = '{loaded.name}' and tags.model_version = '{loaded.version}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _run_direction_names(run_id: str) -> list[str]:
    files = MlflowClient().list_artifacts(run_id, DIRECTIONS_ARTIFACT_DIR)
    return sorted(Path(f.path).name.removesuffix(".json") for f in files if f.path.endswith(".json"))


def load_direction(name: str, loaded: registry.LoadedModel, root: Path) -> Direction:
    """The direction ``name`` fitted for ``loaded``'s exact model version.

    ``name``: a direction name (``sex``, ``age_old``, ``age_group``, ``sex_size_controlled``; alias ``age``)
    or the path of a direction JSON. Looks in ``directions/<family>/directions/`` first (the DVC output,
    used only when it was fitted on this version), then in the newest finished directions run of this version.
    """
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"direction file not found: {path}")
        direction = Direction.load(path)
        if not _fitted_for(direction, loaded):  # the user chose this file: allowed, but say so
            log.warning("%s was fitted for %s version %s, not %s version %s", path,
                        direction.metadata.get("model_name", "?"), direction.metadata.get("model_version", "?"),
                        loaded.name, loaded.version)
        return direction
    name = DIRECTION_ALIASES.get(name, name)
    family = loaded.model.family
    local_dir = directions_dir(root, family)
    local = {p.stem: Direction.load(p) for p in sorted(local_dir.glob("*.json"))} if local_dir.is_dir() else {}
    current = {n: d for n, d in local.items() if _fitted_for(d, loaded)}
    if name in current:
        return current[name]

    run_id = _latest_directions_run(loaded)
    in_run = _run_direction_names(run_id) if run_id else []
    if name in in_run:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{DIRECTIONS_ARTIFACT_DIR}/{name}.json", dst_path=tmp)
            return Direction.load(path)

    what = f"{loaded.name} version {loaded.version}"
    available = sorted(set(current) | set(in_run))
    if available:
        raise ValueError(f"unknown direction {name!r} for {what}; available: {available} "
                         f"(aliases: {DIRECTION_ALIASES})")
    if local:
        other = next(iter(local.values())).metadata
        raise ValueError(
            f"the directions in {local_dir} were fitted for {other.get('model_name', '?')} version "
            f"{other.get('model_version', '?')}, not {what}, and no directions run of {what} exists: run "
            f"`brainlatent directions --model {family} --model-uri models:/{loaded.name}/{loaded.version}`"
        )
    raise ValueError(f"no directions fitted for {what}: run `brainlatent directions --model {family}` first")
