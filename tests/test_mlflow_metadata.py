"""What the MLflow UI shows of our runs and models, on a real temporary SQLite store: experiments open as
model-development experiments, runs carry the processed cohort as their dataset (Dataset column, lineage),
registered versions carry a description and a compact tag set."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from brainlatent import registry, tracking
from brainlatent.models.base import build_model


@pytest.fixture
def store(project, tiny_processed):
    tracking.configure(project)
    return project


def test_experiments_are_marked_as_model_development(store):
    client = MlflowClient()
    created = tracking.experiment_id("brainlatent-train", store)
    assert client.get_experiment(created).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # An experiment made before the mark (or by hand) gets it the next time a stage uses it.
    old = mlflow.create_experiment("made-by-hand")
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert tracking.experiment_id("made-by-hand", store) == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_a_registered_version_has_its_dataset_description_and_few_tags(store):
    lineage = tracking.lineage_tags("data/processed", store)
    model = build_model("ae", {"latent_dim": 4, "volume_shape": [16, 16, 16], "hidden": [8]})
    final = {"val/mse": 0.0123, "train/loss": 0.02, "val/psnr": 19.5, "lr": 1e-3}
    with mlflow.start_run(experiment_id=tracking.experiment_id("brainlatent-train", store)) as run:
        mlflow.log_metrics({"val/mse": 0.0123, "train/loss": 0.02}, step=2)  # what training logs per epoch
        version, _ = registry.log_and_register(
            model, "ae", model.config_dict(), final,
            tags={**lineage, "run_id": run.info.run_id, "volume_affine": json.dumps(np.eye(4).tolist())})
    client = MlflowClient()
    held = client.get_run(run.info.run_id)

    (dataset_input,) = held.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == "data/processed" and dataset.digest == lineage["data.content_sha256"][:32]
    assert json.loads(dataset.source)["uri"] == str((store / "data" / "processed").resolve())
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    subjects = pd.read_csv(store / "data" / "processed" / "subjects.csv")
    assert json.loads(dataset.profile)["num_rows"] == len(subjects)
    assert {"subject_id", "sex", "age", "split"} <= {c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]}

    mv = client.get_model_version("brainlatent-ae", version)
    assert set(mv.tags) <= {*registry.VERSION_TAGS, "metric.val/mse"} and mv.tags["metric.val/mse"] == "0.0123"
    assert mv.tags["data.content_sha256"] == lineage["data.content_sha256"]
    for words in ("**ae**", run.info.run_id, "data/processed", lineage["data.content_sha256"][:16],
                  "val/mse 0.0123", "val/psnr 19.5"):
        assert words in mv.description, (words, mv.description)
    assert mv.description.index("val/mse") < mv.description.index("train/loss")  # the rule metric first
    # Moved, not lost: the run holds what the version no longer repeats.
    assert held.data.tags["volume_affine"] == json.dumps(np.eye(4).tolist())
    assert held.data.tags["mlflow.note.content"] == mv.description  # the run page's Description
    assert held.data.metrics["val/psnr"] == 19.5 and held.data.metrics["val/mse"] == 0.0123


def test_a_run_without_processed_data_says_what_is_missing(store, tmp_path):
    with pytest.raises(ValueError, match=r"elsewhere/subjects.csv: not found"):
        tracking.processed_dataset("elsewhere", store, lineage={"data.content_sha256": "0" * 64})


def test_the_dvc_md5_is_the_digest_when_dvc_locked_the_data():
    assert tracking.dataset_digest({"data.dvc_md5": "a" * 32 + ".dir", "data.content_sha256": "b" * 64}) == "a" * 32
    assert tracking.dataset_digest({"data.content_sha256": "b" * 64}) == "b" * 32
