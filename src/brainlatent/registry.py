"""The MLflow Model Registry: register checkpoints, move aliases, load models back by URI.

Every family registers as ``brainlatent-<family>``. Each new version gets alias ``candidate``. Alias ``champion``
is a separate decision made on evaluation metrics (:mod:`brainlatent.champion`, run by ``evaluate``); training
never moves it. The feature network, an evaluation tool rather than a model family, keeps a training-time rule
(:data:`FEATURENET_CHAMPION_METRIC`).

What a version holds: ``weights.pt`` (a plain ``state_dict``) and ``config.json`` (family + constructor
arguments), wrapped as an MLflow pyfunc ("models from code", so nothing is pickled). Our own loader reads
the two files directly: ``torch.load(weights_only=True)`` and a rebuild from the config. No code from an
artifact is ever executed or unpickled by :func:`load_model`.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from brainlatent import tracking

CANDIDATE = "candidate"
CHAMPION = "champion"
FORMAT_VERSION = 1

# The validation metric each family reports every epoch (what Optuna optimises) and whether higher is better.
VALIDATION_METRICS: dict[str, tuple[str, bool]] = {
    "ae": ("val/mse", False),
    "vae": ("val/mse", False),
    "gan": ("val/proxy", False),
    "stylegan": ("val/proxy", False),
}
# The feature net's champion: the version whose sex head (its kept epoch's weights) separates the validation
# split best.
FEATURENET_CHAMPION_METRIC = ("kept/sex_auc", True)


def registered_name(family: str) -> str:
    return f"brainlatent-{family}"


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    name: str
    version: str
    run_id: str
    config: dict[str, Any]
    tags: dict[str, str]


def _pyfunc_code_path() -> str:
    return str(Path(__file__).with_name("mlflow_pyfunc.py"))


def _is_better(new: float, old: float | None, higher_is_better: bool) -> bool:
    if old is None or not math.isfinite(old):
        return math.isfinite(new)
    return new > old if higher_is_better else new < old


# The tags a registered version keeps (what `brainlatent show`, evaluation and a reader of the registry page need);
# every other tag the caller passes goes to the training run, which holds the full record.
VERSION_TAGS = ("run_id", "git_commit", "git_dirty", "data.processed_dir", "data.content_sha256", "data.dvc_md5",
                "dvc.exp_name", "backbone")


def log_and_register(
    model: torch.nn.Module,
    family: str,
    config: dict[str, Any],
    metrics: dict[str, float],
    tags: dict[str, str] | None = None,
    name: str | None = None,
    champion_metric: tuple[str, bool] | None = None,
) -> tuple[str, bool]:
    """Log ``model`` to the active run, register a new version and give it alias ``candidate``.

    The version gets a description (what was trained, on which data, its final validation numbers) and a
    compact tag set: :data:`VERSION_TAGS` of ``tags`` and ``metric.<m>`` for the rule metric only (the family's
    validation metric, or ``champion_metric``); the other tags and final metrics go to the run. When ``tags``
    name the processed data (``data.processed_dir``), the run and the logged model get it as their
    ``training`` dataset (the runs table's Dataset column).

    ``champion_metric`` ``(metric, higher_is_better)``: also move ``champion`` to the new version when its
    ``metrics[metric]`` beats the current champion's (the feature net's rule). The model families pass None:
    their champion is decided on evaluation metrics (:mod:`brainlatent.champion`). Returns
    (version, became_champion).
    """
    name = name or registered_name(family)
    tags = dict(tags or {})
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.pt"
        cfg_path = Path(tmp) / "config.json"
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, weights)
        cfg_path.write_text(json.dumps({"format_version": FORMAT_VERSION, "family": family, "config": config}))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=_pyfunc_code_path(),
            artifacts={"weights": str(weights), "config": str(cfg_path)},
            # Explicit requirements: inferring them imports the world and pins a CPU-only environment.
            pip_requirements=["brainlatent", "torch", "mlflow"],
            registered_model_name=name,
        )
    if "data.processed_dir" in tags:
        tracking.log_dataset(tags["data.processed_dir"], "training", lineage=tags, model_id=info.model_id)
    version = str(info.registered_model_version)
    client = MlflowClient()
    rule = champion_metric[0] if champion_metric else VALIDATION_METRICS.get(family, ("", False))[0]
    description = version_description(family, tags, metrics, rule)
    _move_to_run(tags, metrics, description)
    kept = {k: v for k, v in tags.items() if k in VERSION_TAGS}
    if rule in metrics:
        kept[f"metric.{rule}"] = f"{metrics[rule]:.6g}"
    for key, value in kept.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=description)
    client.set_registered_model_alias(name, CANDIDATE, version)
    promoted = False
    if champion_metric is not None and champion_metric[0] in metrics:
        metric, higher = champion_metric
        promoted = promote_if_better(name, version, metric, metrics[metric], higher)
    return version, promoted


# MLflow's run description (the run page's "Description").
RUN_NOTE_TAG = "mlflow.note.content"


def _move_to_run(tags: dict[str, str], metrics: dict[str, float], description: str) -> None:
    """The tags a version does not keep, and final metrics the run has not logged, onto the active run; the
    version's description becomes the run's too unless it has one."""
    run = mlflow.active_run()
    if run is None:
        return
    held = MlflowClient().get_run(run.info.run_id).data
    extra_tags = {k: v for k, v in tags.items() if k not in VERSION_TAGS and held.tags.get(k) != v}
    if RUN_NOTE_TAG not in held.tags:
        extra_tags[RUN_NOTE_TAG] = description
    if extra_tags:
        mlflow.set_tags(extra_tags)
    missing = {k: float(v) for k, v in metrics.items() if k not in held.metrics and math.isfinite(float(v))}
    if missing:
        mlflow.log_metrics(missing)


def version_description(family: str, tags: dict[str, str], metrics: dict[str, float], rule: str = "") -> str:
    """What a registry reader needs first (Markdown, shown on the version page): what was trained, on which
    data and code, and its final validation numbers (``rule`` first)."""
    data = tags.get("data.processed_dir", "?")
    digest = tags.get("data.dvc_md5") or tags.get("data.content_sha256", "?")[:16]
    which = "DVC md5" if tags.get("data.dvc_md5") else "sha256"
    commit = tags.get("git_commit", "?")[:10] + (" (dirty)" if tags.get("git_dirty") == "true" else "")
    ordered = [rule] * (rule in metrics) + sorted(k for k in metrics if k != rule)
    numbers = ", ".join(f"{k} {metrics[k]:.4g}" for k in ordered[:8])
    return (f"brainlatent **{family}** trained in run `{tags.get('run_id', '?')}` on `{data}` ({which} `{digest}`), "
            f"git `{commit}`.\n\nFinal epoch: {numbers or 'no metrics'}.\n\nEvaluation numbers and the champion "
            "decision are added by `brainlatent evaluate` (tags `eval.*`, `champion.*`).")


def promote_if_better(name: str, version: str, metric: str, value: float, higher_is_better: bool) -> bool:
    """Move ``champion`` to ``version`` when its ``metric`` beats the current champion's (strictly).

    A champion that has no value recorded for ``metric`` (the rule changed) is replaced.
    """
    client = MlflowClient()
    client.set_model_version_tag(name, version, "champion_rule", f"{metric} {'max' if higher_is_better else 'min'}")
    client.set_model_version_tag(name, version, f"metric.{metric}", f"{value:.6g}")
    current = _alias_version(client, name, CHAMPION)
    old = None
    if current is not None and str(current.version) != str(version):
        raw = current.tags.get(f"metric.{metric}")
        old = float(raw) if raw is not None else None
    elif current is not None:  # already champion
        return True
    if _is_better(value, old, higher_is_better):
        client.set_registered_model_alias(name, CHAMPION, version)
        return True
    return False


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def resolve(uri: str):
    """``models:/name@alias`` or ``models:/name/<version>`` -> ModelVersion, with errors that name the thing.

    Uses the tracking store already chosen, else the project's (:func:`tracking.use_project_store`: found from
    any subfolder, never created as a side effect).
    """
    m = _URI.match(uri.strip())
    if not m:
        raise ValueError(f"model URI {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    store = tracking.redact_url(tracking.use_project_store())
    client = MlflowClient()
    name = m["name"]
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        known = sorted(r.name for r in client.search_registered_models())
        raise ValueError(
            f"model URI {uri!r}: no registered model named {name!r} in the store {store}; registered: {known}"
        ) from None
    if m["alias"]:
        mv = _alias_version(client, name, m["alias"])
        if mv is None:
            raise ValueError(
                f"model URI {uri!r}: alias {m['alias']!r} is not set on {name!r} "
                f"(aliases set: {sorted(rm.aliases) if rm.aliases else 'none'})"
            )
        return mv
    try:
        return client.get_model_version(name, m["version"])
    except MlflowException:
        raise ValueError(f"model URI {uri!r}: {name!r} has no version {m['version']}") from None


def load_model(uri: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a registered model as a :class:`~brainlatent.models.base.LatentModel` (eval mode).

    Only tensors are deserialised (``weights_only=True``); the architecture is rebuilt from config.json.
    """
    from brainlatent.models.base import build_model

    mv = resolve(uri)
    root = Path(mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}"))
    weights, cfg_path = root / "artifacts" / "weights.pt", root / "artifacts" / "config.json"
    for f in (weights, cfg_path):
        if not f.is_file():
            raise ValueError(f"model {uri!r} (version {mv.version}): artifact {f.name} is missing")
    what = f"model {uri!r} (version {mv.version})"
    meta = _read_model_config(cfg_path, what)
    try:
        state = load_weights(weights, device)
        model = build_model(meta["family"], meta["config"])
    except ValueError as err:  # say which registered model the bad file or config belongs to
        raise ValueError(f"{what}: {err}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{what}: weights do not match its config.json ({err})") from None
    # channels_last_3d weights make every conv run channels-last (also for NCDHW inputs): on CPU the NCDHW
    # backward of narrow conv3d layers, which inversion uses, is up to ~15x slower (BENCHMARKS.md).
    model.to(device).to(memory_format=torch.channels_last_3d).eval()
    return LoadedModel(model, mv.name, mv.version, mv.run_id, meta["config"], dict(mv.tags))


def _read_model_config(path: Path, what: str) -> dict[str, Any]:
    """A version's config.json: ``{"format_version", "family", "config"}``, checked before anything is built."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what}: {path.name} is not valid JSON ({err})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("family"), str) and isinstance(meta.get("config"), dict)):
        raise ValueError(f"{what}: {path.name} must hold an object with 'family' (a string) and 'config' (an "
                         f"object), got {str(meta)[:200]}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{what}: {path.name} has format_version {meta.get('format_version')!r}; this brainlatent "
                         f"reads format {FORMAT_VERSION}")
    return meta


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state_dict with ``weights_only=True``: a pickle that would run code is refused, not executed."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ValueError(f"{path}: not a valid weights file, or it contains objects other than tensors ({err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (names -> tensors), got a {type(state).__name__}")
    return state


def describe_registry() -> str:
    """A plain-text table of every registered model: versions, aliases, rule metric and lineage."""
    client = MlflowClient()
    lines = []
    for rm in sorted(client.search_registered_models(), key=lambda r: r.name):
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in (rm.aliases or {}).items():
            aliases_by_version.setdefault(str(version), []).append(alias)
        lines.append(f"{rm.name}")
        versions = client.search_model_versions(f"name='{rm.name}'")
        for mv in sorted(versions, key=lambda v: int(v.version)):
            tags = mv.tags or {}
            metrics = "  ".join(f"{k[7:]}={v}" for k, v in sorted(tags.items()) if k.startswith("metric."))
            alias_txt = ",".join(sorted(aliases_by_version.get(str(mv.version), []))) or "-"
            commit = tags.get("git_commit", "?")[:8]
            lines.append(f"  v{mv.version:<3} [{alias_txt}]  run={mv.run_id[:8]} git={commit}  {metrics}")
    return "\n".join(lines) if lines else "no registered models"


def describe_version(uri: str) -> str:
    """What ``brainlatent show`` prints for one model version: aliases, metrics, lineage, source run."""
    mv = resolve(uri)
    client = MlflowClient()
    rm = client.get_registered_model(mv.name)
    aliases = sorted(a for a, v in (rm.aliases or {}).items() if str(v) == str(mv.version))
    tags = dict(mv.tags or {})
    lines = [
        f"{mv.name} version {mv.version}  aliases: {', '.join(aliases) or '-'}",
        f"  source run:  {mv.run_id}",
        f"  git commit:  {tags.get('git_commit', '?')}{' (dirty)' if tags.get('git_dirty') == 'true' else ''}",
        f"  data:        {tags.get('data.processed_dir', '?')}  dvc md5={tags.get('data.dvc_md5', '-')}  "
        f"sha256={tags.get('data.content_sha256', '?')[:16]}",
    ]
    if "champion_rule" in tags:
        lines.append(f"  champion rule: {tags['champion_rule']}")
    if "champion.decision" in tags:
        lines.append(f"  champion decision: {tags['champion.decision']}")
    metric_tags = {k: v for k, v in sorted(tags.items()) if k.startswith(("metric.", "eval.", "directions."))}
    if metric_tags:
        lines.append("  metrics:")
        lines += [f"    {k:<40} {v}" for k, v in metric_tags.items()]
    return "\n".join(lines)
