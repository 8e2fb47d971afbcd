"""The champion decision: which registered version of a family carries the alias ``champion``.

An explicit step that ``evaluate@<family>`` takes after scoring a version, never part of training, and never an
input of a pipeline stage (stages evaluate the version their own ``train`` registered: ``model_ref.py``). The rule:

* the candidates are the versions evaluated under the same protocol (``eval.protocol`` tag: same feature
  extractor, real reference split and data, evaluation settings and seed), so their numbers are comparable;
* a version whose samples failed the quality gate (``eval.quality_gate = fail``: it does not generate brains)
  can never be champion;
* among the rest, the best by ``evaluate.champion_metric.<family>`` (direction from ``metrics.registry``) takes
  the alias; the current champion keeps it on ties, a champion that was not evaluated under this protocol
  gives way.

The decision is recorded on the evaluated version (tag ``champion.decision`` and its description) and the rule
on the champion (``champion_rule``, ``metric.<metric>``), so the registry shows why a version is or is not
the champion.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import mlflow
from mlflow.tracking import MlflowClient

from brainlatent import registry
from brainlatent.metrics.registry import is_better, metric_direction

log = logging.getLogger(__name__)

GATE_TAG = "eval.quality_gate"  # "pass" | "fail", written by evaluate for families that generate


@dataclass(frozen=True)
class ChampionDecision:
    family: str
    metric: str
    champion: str | None  # the champion version after the decision (None: no eligible version yet)
    previous: str | None  # the champion before
    evaluated: str  # the version whose evaluation triggered the decision
    reason: str  # one line, also the evaluated version's ``champion.decision`` tag

    @property
    def moved(self) -> bool:
        return self.champion != self.previous


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def decide(family: str, metric: str, protocol: str, evaluated: str) -> ChampionDecision:
    """Apply the champion rule of ``family`` after ``evaluated`` was scored under ``protocol`` (see module doc)."""
    direction = metric_direction(metric)
    client = MlflowClient()
    name = registry.registered_name(family)
    try:
        previous = str(client.get_model_version_by_alias(name, registry.CHAMPION).version)
    except mlflow.exceptions.MlflowException:
        previous = None
    scored: dict[str, float] = {}
    gated: set[str] = set()
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        tags = mv.tags or {}
        raw = tags.get(f"eval.{metric}")
        if tags.get("eval.protocol") != protocol or raw is None or not math.isfinite(float(raw)):
            continue
        if tags.get(GATE_TAG) == "fail":
            gated.add(str(mv.version))
            continue
        scored[str(mv.version)] = float(raw)
    best = previous if previous in scored else None
    for version, value in scored.items():  # ascending versions: ties keep the champion, then the oldest
        if best is None or is_better(metric, value, scored[best]):
            best = version
    champion = best if best is not None else (previous if previous not in gated else None)

    if evaluated in gated:
        reason = "not champion: its samples failed the quality gate (tag eval.quality_gate_reason)"
    elif evaluated not in scored:
        reason = f"not champion: no finite {metric} under this protocol"
    elif evaluated == best == previous:
        reason = f"stays champion: {metric} {_fmt(scored[evaluated])} ({direction})"
    elif evaluated == best:
        before = f"v{previous}'s {_fmt(scored[previous])}" if previous in scored else (
            f"v{previous}, not evaluated under this protocol" if previous else "no champion before")
        reason = f"champion: {metric} {_fmt(scored[evaluated])} beats {before} ({direction})"
    else:
        reason = (f"not champion: {metric} {_fmt(scored[evaluated])} does not beat champion v{best}'s "
                  f"{_fmt(scored[best])} ({direction})")

    client.set_model_version_tag(name, evaluated, "champion.decision", reason)
    if best is not None:
        client.set_model_version_tag(name, best, "champion_rule", f"{metric} {direction} (evaluate, protocol {protocol})")
        client.set_model_version_tag(name, best, f"metric.{metric}", _fmt(scored[best]))
        if best != previous:
            client.set_registered_model_alias(name, registry.CHAMPION, best)
            log.info("%s: champion v%s -> v%s (%s %s)", name, previous, best, metric, _fmt(scored[best]))
    elif previous in gated:  # the only champion there was does not make brains: nobody holds the alias
        client.delete_registered_model_alias(name, registry.CHAMPION)
        champion = None
        log.warning("%s: v%s lost the champion alias: its samples failed the quality gate", name, previous)
    return ChampionDecision(family, metric, champion, previous, evaluated, reason)
