"""Which registered model version a pipeline run trained: ``trained/<family>.json``.

``train@<family>`` writes it right after registering (name, version, training run, ``models:/<name>/<version>``).
``evaluate@<family>`` and ``directions@<family>`` list it as a DVC dependency and read it, so they re-run whenever
training produced a new version, and their metrics always belong to the model that this pipeline run (or DVC
experiment) trained. Aliases such as ``champion`` are for people and for look-ups outside the pipeline; no stage
reads one (``--model-uri`` on the command line evaluates any other version by hand).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

TRAINED_DIR = "trained"


@dataclass(frozen=True)
class ModelRef:
    """One registered version of a family's model."""

    family: str
    name: str  # registered model name, brainlatent-<family>
    version: str
    run_id: str  # the MLflow training run that produced it

    @property
    def uri(self) -> str:
        """The version's own URI (never an alias: it names this exact model forever)."""
        return f"models:/{self.name}/{self.version}"


def ref_path(root: Path, family: str) -> Path:
    return Path(root) / TRAINED_DIR / f"{family}.json"


def write_ref(root: Path, ref: ModelRef) -> Path:
    """Write ``trained/<family>.json`` (the DVC output of ``train@<family>``)."""
    path = ref_path(root, ref.family)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**asdict(ref), "uri": ref.uri}, indent=2, sort_keys=True) + "\n")
    return path


def read_ref(root: Path, family: str) -> ModelRef:
    """The version ``train@<family>`` registered last in this workspace; ValueError naming the file otherwise."""
    path = ref_path(root, family)
    if not path.is_file():
        raise ValueError(
            f"{path} not found: no model of family {family!r} has been trained in this workspace; run "
            f"`dvc repro train@{family}` (or `brainlatent train --model {family}`), or name a registered version "
            "with --model-uri"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); re-run `brainlatent train --model {family}`") from None
    fields = ("family", "name", "version", "run_id")
    if not isinstance(raw, dict) or any(not isinstance(raw.get(k), str) or not raw[k] for k in fields):
        raise ValueError(f"{path}: expected an object with non-empty strings {list(fields)}, got {str(raw)[:200]}")
    if raw["family"] != family:
        raise ValueError(f"{path}: 'family' is {raw['family']!r}, expected {family!r}")
    return ModelRef(**{k: raw[k] for k in fields})


def model_uri(root: Path, family: str, override: str | None = None) -> str:
    """``override`` when given (``--model-uri``), else the URI of the version in ``trained/<family>.json``."""
    return override if override else read_ref(root, family).uri
