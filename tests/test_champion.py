"""The champion decision (champion.py) on a real temporary MLflow registry: tiny registered models whose
evaluation tags are set the way `evaluate` sets them."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from brainlatent import champion, registry, tracking
from brainlatent.models.base import build_model

NAME = "brainlatent-ae"


@pytest.fixture
def register(project):
    """register(mse, protocol="p1", gate=None) -> version: a new brainlatent-ae version carrying an evaluation."""
    tracking.configure(project)
    model = build_model("ae", {"latent_dim": 4, "volume_shape": [16, 16, 16], "hidden": [8]})
    exp = tracking.experiment_id("champion-test", project)
    client = MlflowClient()

    def make(mse: float | None, protocol: str = "p1", gate: str | None = None) -> str:
        with mlflow.start_run(experiment_id=exp):
            version, _ = registry.log_and_register(model, "ae", model.config_dict(), {})
        if mse is not None:
            client.set_model_version_tag(NAME, version, "eval.mse", repr(mse))
            client.set_model_version_tag(NAME, version, "eval.protocol", protocol)
        if gate is not None:
            client.set_model_version_tag(NAME, version, champion.GATE_TAG, gate)
        return version

    return make


def _champion() -> str | None:
    version = MlflowClient().get_registered_model(NAME).aliases.get("champion")
    return None if version is None else str(version)


def _decision(version: str) -> str:
    return MlflowClient().get_model_version(NAME, version).tags["champion.decision"]


def test_a_worse_version_does_not_take_champion_and_a_better_one_does(register):
    v1 = register(0.05)
    first = champion.decide("ae", "mse", "p1", v1)
    assert first.moved and first.champion == v1 and _champion() == v1
    assert _decision(v1) == "champion: mse 0.05 beats no champion before (min)"

    v2 = register(0.08)  # worse
    second = champion.decide("ae", "mse", "p1", v2)
    assert not second.moved and _champion() == v1
    assert _decision(v2) == "not champion: mse 0.08 does not beat champion v1's 0.05 (min)"

    v3 = register(0.03)  # better
    third = champion.decide("ae", "mse", "p1", v3)
    assert third.moved and third.previous == v1 and _champion() == v3
    assert _decision(v3) == "champion: mse 0.03 beats v1's 0.05 (min)"
    assert MlflowClient().get_model_version(NAME, v3).tags["champion_rule"] == "mse min (evaluate, protocol p1)"

    v4 = register(0.03)  # a tie keeps the champion
    assert not champion.decide("ae", "mse", "p1", v4).moved and _champion() == v3
    assert champion.decide("ae", "mse", "p1", v3).reason == "stays champion: mse 0.03 (min)"


def test_versions_that_fail_the_quality_gate_never_hold_champion(register):
    v1 = register(0.05)
    champion.decide("ae", "mse", "p1", v1)
    v2 = register(0.01, gate="fail")  # the best number, but its samples are not brains
    decision = champion.decide("ae", "mse", "p1", v2)
    assert not decision.moved and _champion() == v1
    assert _decision(v2).startswith("not champion: its samples failed the quality gate")
    # The champion itself re-evaluated and failing the gate loses the alias; nobody else is eligible.
    MlflowClient().set_model_version_tag(NAME, v1, champion.GATE_TAG, "fail")
    lost = champion.decide("ae", "mse", "p1", v1)
    assert lost.champion is None and _champion() is None
    v3 = register(0.2, gate="pass")
    assert champion.decide("ae", "mse", "p1", v3).champion == v3 and _champion() == v3


def test_only_versions_of_the_same_protocol_are_compared(register):
    v1 = register(0.01, protocol="old")
    champion.decide("ae", "mse", "old", v1)
    v2 = register(0.05, protocol="new")  # worse number, but v1 was never scored under "new"
    decision = champion.decide("ae", "mse", "new", v2)
    assert decision.moved and _champion() == v2
    assert _decision(v2) == "champion: mse 0.05 beats v1, not evaluated under this protocol (min)"
    unscored = register(None)
    assert champion.decide("ae", "mse", "new", unscored).reason == "not champion: no finite mse under this protocol"
    assert _champion() == v2
