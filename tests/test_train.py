"""The shared training framework, MLflow logging and the model registry on a real temporary SQLite store."""

from __future__ import annotations

import dataclasses
import json

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from brainlatent import registry
from brainlatent.model_ref import ModelRef, read_ref
from brainlatent.models.base import build_model
from brainlatent.train.checkpoint import load_checkpoint
from brainlatent.train.runner import train_family


def _weights(path):
    return load_checkpoint(path)["model"]


def test_ae_run_is_logged_registered_and_loadable(tiny_processed, tiny_params, project):
    out = train_family("ae", tiny_params)
    assert out.finished and out.model_version == "1"
    # The pipeline's record of the version (what evaluate@ae and directions@ae read), never an alias.
    assert read_ref(project, "ae") == ModelRef("ae", "brainlatent-ae", "1", out.run_id)
    assert json.loads((project / "metrics" / "train" / "ae.json").read_text())["model_version"] == 1

    client = MlflowClient()
    run = client.get_run(out.run_id)
    assert run.data.params["ae.latent_dim"] == "8"
    assert run.data.params["data.shape"] == "[16, 16, 16]"
    assert run.data.tags["model"] == "ae"
    assert len(run.data.tags["git_commit"]) > 0 and len(run.data.tags["data.content_sha256"]) == 64
    history = client.get_metric_history(out.run_id, "val/mse")
    assert [m.step for m in history] == [1, 2]
    for key in ("train/loss", "val/psnr", "val/ssim"):
        assert key in run.data.metrics

    arts = [a.path for a in client.list_artifacts(out.run_id, "volumes/epoch_002/reconstructions")]
    assert any(a.endswith(".nii.gz") for a in arts) and any(a.endswith("montage.png") for a in arts)
    # The fixed inputs are logged once per run, not again at every artifact epoch.
    assert any(a.path.endswith("inputs_00.nii.gz") for a in client.list_artifacts(out.run_id, "volumes/inputs"))
    assert not client.list_artifacts(out.run_id, "volumes/epoch_002/inputs")
    local = mlflow.artifacts.download_artifacts(run_id=out.run_id, artifact_path="volumes/epoch_002/reconstructions")
    import nibabel as nib

    img = nib.load(f"{local}/reconstructions_00.nii.gz")
    assert img.shape == (16, 16, 16)
    assert abs(img.affine[0, 0] - 10.0) < 1e-6  # 160 mm over 16 voxels

    # Training gives the new version alias `candidate`; `champion` is evaluate's decision (test_champion.py).
    assert set(MlflowClient().get_registered_model("brainlatent-ae").aliases) == {"candidate"}
    loaded = registry.load_model("models:/brainlatent-ae@candidate")
    x = torch.rand(2, 1, 16, 16, 16)
    z = loaded.model.encode(x)
    assert z.shape == (2, 8) and loaded.model.decode(z).shape == x.shape
    assert loaded.tags["git_commit"] == run.data.tags["git_commit"]
    # The default dense model decodes around the mean training volume, saved with its weights.
    from brainlatent.data.dataset import ProcessedData

    data = ProcessedData.open(tiny_processed)
    train_mean = data.load_split("train").mean(0, keepdim=True)
    assert loaded.model.arch == "dense"
    torch.testing.assert_close(loaded.model.template.cpu().contiguous(), train_mean.float(), rtol=0, atol=1e-6)

    assert (project / "metrics" / "train" / "ae.json").is_file()
    assert (project / "plots" / "train" / "ae.csv").read_text().startswith("epoch,")


def test_vae_resume_gives_identical_weights(tiny_processed, tiny_params, project):
    straight = dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, checkpoint_dir="ck_a"))
    a = train_family("vae", straight, register=False)

    sliced = dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, checkpoint_dir="ck_b"))
    first = train_family("vae", sliced, stop_after_epoch=1, register=False)
    assert not first.finished
    assert mlflow.get_run(first.run_id).info.status == "KILLED"
    second = train_family("vae", sliced, resume=True, register=False)
    assert second.finished and second.resumed_from == 1
    assert second.run_id == first.run_id  # same MLflow run continues
    assert [m.step for m in MlflowClient().get_metric_history(second.run_id, "val/mse")] == [1, 2]

    wa, wb = _weights(project / "ck_a/vae/last.pt"), _weights(project / "ck_b/vae/last.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert a.metrics["val/mse"] == pytest.approx(second.metrics["val/mse"], rel=0, abs=0)


def test_resume_ignores_checkpoint_of_other_config(tiny_processed, tiny_params, project):
    train_family("ae", tiny_params, stop_after_epoch=1, register=False)
    other = dataclasses.replace(tiny_params, ae=dataclasses.replace(tiny_params.ae, lr=1e-4))
    out = train_family("ae", other, resume=True, register=False)
    assert out.resumed_from is None and out.finished


def test_registering_moves_candidate_and_only_an_explicit_rule_moves_champion(project):
    from brainlatent import tracking

    tracking.configure(project)
    model = build_model("ae", {"latent_dim": 4, "volume_shape": [16, 16, 16], "base_channels": 2, "max_channels": 4})
    client = MlflowClient()
    exp = tracking.experiment_id("registry-test", project)
    with mlflow.start_run(experiment_id=exp):  # a model family: no champion from training metrics
        version, promoted = registry.log_and_register(model, "ae", model.config_dict(), {"val/mse": 0.01})
    assert (version, promoted) == ("1", False)
    assert set(client.get_registered_model("brainlatent-ae").aliases) == {"candidate"}
    # The feature net's training-time rule (champion_metric), on a registered name of its own.
    results = []
    for auc in (0.7, 0.6, 0.8, 0.8):
        with mlflow.start_run(experiment_id=exp):
            results.append(registry.log_and_register(model, "ae", model.config_dict(), {"val_sex_auc": auc},
                                                     name="rule-test", champion_metric=("val_sex_auc", True)))
    assert [r[1] for r in results] == [True, False, True, False]  # equal is not better
    assert str(client.get_model_version_by_alias("rule-test", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("rule-test", "candidate").version) == "4"
    assert "v3" in registry.describe_registry()


def test_registry_errors_name_the_thing(project):
    from brainlatent import tracking

    tracking.configure(project)
    with pytest.raises(ValueError, match="no registered model named 'brainlatent-nope'"):
        registry.load_model("models:/brainlatent-nope@champion")
    with pytest.raises(ValueError, match="expected models:/"):
        registry.load_model("runs:/abc/model")
