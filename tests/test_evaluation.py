"""The `featurenet` and `evaluate@<family>` stages on a real temporary MLflow store (tiny models and data)."""

from __future__ import annotations

import dataclasses
import json
import math

import mlflow
import pytest
import torch
from conftest import tiny_params_dict, write_processed
from mlflow.tracking import MlflowClient

from brainlatent import registry, tracking
from brainlatent.config import params_from_dict
from brainlatent.data.dataset import ProcessedData
from brainlatent.evaluation import (
    FEATURENET_MODEL,
    PSNR_CAP_DB,
    evaluate_family,
    reconstruct,
    reconstruction_metrics,
    resolve_feature_extractor,
    train_featurenet,
)
from brainlatent.models.featurenet import (
    FeatureNet,
    MedicalNetFeatures,
    encode_age_group,
    encode_sex,
    evaluate_featurenet,
    load_medicalnet,
    medicalnet_resnet,
)
from brainlatent.train.runner import train_family

SMALL_NET = {"channels": [4, 8, 16], "feature_dim": 16, "epochs": 2, "batch_size": 4}
SMALL_EVAL = {"n_samples": 8, "ms_ssim_pairs": 10, "kid_subset_size": 8, "inversion_steps": 5}


def _params(**sections):
    return params_from_dict(tiny_params_dict(featurenet={**SMALL_NET, **sections.pop("featurenet", {})},
                                             evaluate={**SMALL_EVAL, **sections.pop("evaluate", {})}, **sections))


@pytest.fixture
def params(tiny_processed):
    return _params()


def _with_eval(params, **changes):
    return dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, **changes))


# ----------------------------------------------------------------------------------------- featurenet
def test_featurenet_stage_trains_registers_and_loads_back(project, params):
    out = train_featurenet(params, project)
    assert out.backbone == "featurenet" and out.model_version == "1" and out.champion

    client = MlflowClient()
    run = client.get_run(out.run_id)
    assert run.data.tags["model"] == "featurenet" and run.data.params["featurenet.feature_dim"] == "16"
    assert [m.step for m in client.get_metric_history(out.run_id, "val/loss")] == [1, 2]
    assert run.data.metrics["kept/sex_auc"] == out.metrics["kept/sex_auc"]
    on_disk = json.loads((project / "metrics" / "featurenet.json").read_text())
    assert on_disk == {"backbone": "featurenet", **out.metrics}
    mv = client.get_model_version_by_alias(FEATURENET_MODEL, "champion")
    assert str(mv.version) == "1" and mv.run_id == out.run_id

    net = resolve_feature_extractor(params, project).extractor
    assert isinstance(net, FeatureNet) and not net.training
    data = ProcessedData.open(project / "data" / "processed")
    x = data.load_split("val")
    assert net.features(x).shape == (len(x), 16)
    # The registered weights are the kept ones: they reproduce the logged held-out metrics (to float32 rounding:
    # the reloaded net may run its convolutions in another memory layout, another summation order; another
    # epoch's weights would differ by orders of magnitude more).
    rows = data.subjects.iloc[data.split_indices("val")]
    again = evaluate_featurenet(net, x, encode_sex(rows["sex"].tolist()), encode_age_group(rows["age_group"].tolist()))
    logged = {k: v for k, v in out.metrics.items() if k != "kept/epoch"}
    assert {f"kept/{k}": v for k, v in again.items()} == pytest.approx(logged, rel=1e-6)

    other_shape = dataclasses.replace(params, data=dataclasses.replace(params.data, shape=(16, 16, 8)))
    with pytest.raises(ValueError, match="re-run `brainlatent featurenet`"):
        resolve_feature_extractor(other_shape, project)


def test_medicalnet_backbone_records_the_file_and_loads_it(project, tiny_processed, tmp_path):
    weights = tmp_path / "resnet_10_23dataset.pth"
    state = medicalnet_resnet(10).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, weights)  # MedicalNet's layout
    params = _params(featurenet={"backbone": "medicalnet", "medicalnet_path": str(weights)})

    out = train_featurenet(params, project)
    assert out.backbone == "medicalnet" and out.model_version is None
    assert json.loads((project / "metrics" / "featurenet.json").read_text()) == {
        "backbone": "medicalnet", "medicalnet_depth": 10, "feature_dim": 512}
    run = MlflowClient().get_run(out.run_id)
    assert run.data.tags["backbone"] == "medicalnet" and len(run.data.tags["medicalnet.sha256"]) == 64
    assert not MlflowClient().search_registered_models(f"name = '{FEATURENET_MODEL}'")

    net = resolve_feature_extractor(params, project).extractor
    assert isinstance(net, MedicalNetFeatures)
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net.features(x), load_medicalnet(weights).features(x))
    assert net.features(x).shape == (2, 512)

    missing = _params(featurenet={"backbone": "medicalnet", "medicalnet_path": "nowhere.pth"})
    with pytest.raises(ValueError, match="featurenet.medicalnet_path"):
        train_featurenet(missing, project)


# ------------------------------------------------------------------------------------------- evaluate
def test_evaluate_ae_logs_metrics_writes_json_and_tags_the_version(project, params):
    train_featurenet(params, project)
    trained = train_family("ae", params, root=project)
    out = evaluate_family("ae", params, project)
    # The version train@ae registered (trained/ae.json); the first evaluated version becomes champion.
    assert out.model_version == "1" and out.champion.moved and out.champion.champion == "1"
    assert out.champion.reason.startswith("champion: mse")
    assert set(out.metrics) == {"mse", "psnr", "ssim"}  # the AE does not sample

    # Recomputed independently from the registered model: encode/decode of the whole validation split (the
    # split selection may see: evaluate.split's default; test stays untouched for the directions).
    model = registry.load_model("models:/brainlatent-ae/1").model
    reals = ProcessedData.open(project / "data" / "processed").load_split("val")
    with torch.no_grad():
        expected = reconstruction_metrics(model.decode(model.encode(reals)), reals)
    assert out.metrics == pytest.approx(expected, rel=1e-6)

    client = MlflowClient()
    run = client.get_run(out.run_id)
    assert run.data.metrics == out.metrics
    tags = run.data.tags
    assert tags["model"] == "ae" and tags["model_version"] == "1" and tags["model_uri"] == "models:/brainlatent-ae/1"
    assert tags["evaluated_run_id"] == trained.run_id and tags["featurenet.id"] == f"models:/{FEATURENET_MODEL}/1"
    assert json.loads((project / "metrics" / "evaluate" / "ae.json").read_text()) == {
        **out.metrics, "model_version": 1, "model_uri": "models:/brainlatent-ae/1"}
    mv = client.get_model_version("brainlatent-ae", "1")
    assert {k: float(mv.tags[f"eval.{k}"]) for k in out.metrics} == out.metrics
    assert mv.tags["eval.run_id"] == out.run_id
    arts = [a.path for a in client.list_artifacts(out.run_id, "volumes/reconstructions")]
    assert any(a.endswith("montage.png") for a in arts) and any(a.endswith(".nii.gz") for a in arts)


def test_reconstruct_inverts_stylegan_in_w_with_the_step_budget():
    """Families that invert reconstruct from ``encode``'s default space with ``inversion_steps``: StyleGAN's W
    (as ``project(x, "w")``), in batches; a one-pass family as ``decode(encode(x))``."""
    from brainlatent.models.autoencoder import Autoencoder
    from brainlatent.models.stylegan import StyleGAN

    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8, 8)
    model = StyleGAN((8, 8, 8), n_levels=2, z_dim=8, w_dim=8, n_mapping=2, base_channels=4, max_channels=8).eval()
    ws = [model.project(x[i : i + 2], "w", steps=2, compute_ssim=False).latent for i in (0, 2)]
    assert [tuple(w.shape) for w in ws] == [(2, model.latent_dim), (1, model.latent_dim)]
    with torch.no_grad():
        expected = torch.cat([model.decode(w) for w in ws])
    assert torch.equal(reconstruct(model, x, inversion_steps=2, batch_size=2), expected)

    ae = Autoencoder(latent_dim=4, volume_shape=(8, 8, 8), base_channels=4, max_channels=8).eval()
    with torch.no_grad():
        assert torch.equal(reconstruct(ae, x, inversion_steps=2), ae.decode(ae.encode(x)))


def test_psnr_of_an_exact_reconstruction_is_capped():
    x = torch.rand(2, 1, 16, 16, 16)
    assert reconstruction_metrics(x, x)["psnr"] == PSNR_CAP_DB


def test_gan_evaluation_and_the_champion_decision(project, params):
    train_featurenet(params, project)
    train_family("gan", params, root=project)
    train_family("gan", dataclasses.replace(params, seed=1), root=project)  # trained/gan.json -> v2
    client, name = MlflowClient(), "brainlatent-gan"
    champion = lambda: str(client.get_model_version_by_alias(name, "champion").version)  # noqa: E731
    pipeline_json = project / "metrics" / "evaluate" / "gan.json"

    # The pipeline's evaluation: the version train@gan registered last, v2; no champion yet, so it takes it.
    out2 = evaluate_family("gan", params, project)
    assert out2.model_version == "2" and out2.champion.moved and champion() == "2"
    for key in ("fid", "kid_mean", "mmd_rbf", "ms_ssim_diversity_gap", "anat_w1_norm_mean", "frac_male_abs_diff",
                "age_group_tv", "mse", "psnr", "ssim"):
        assert math.isfinite(out2.metrics[key]), key
    assert MlflowClient().get_run(out2.run_id).data.tags["reconstruction"] == "inversion (5 steps)"
    assert any(a.path.endswith("montage.png") for a in client.list_artifacts(out2.run_id, "volumes/samples"))
    assert json.loads(pipeline_json.read_text())["model_version"] == 2

    # v1 evaluated by hand under the same protocol: the lower FID wins (a tie keeps the champion). Either way
    # the pipeline's metrics still belong to v2, the model it trained.
    out1 = evaluate_family("gan", params, project, model_uri="models:/brainlatent-gan/1")
    winner = "1" if out1.metrics["fid"] < out2.metrics["fid"] else "2"
    assert champion() == winner and out1.champion.moved == (winner == "1")
    assert client.get_model_version(name, winner).tags["champion_rule"].startswith("fid min (evaluate")
    assert client.get_model_version(name, "1").tags["champion.decision"].startswith(
        "champion: fid" if winner == "1" else "not champion: fid")
    assert json.loads(pipeline_json.read_text())["model_version"] == 2

    # Re-evaluating the loser is deterministic and keeps the champion.
    loser = "2" if winner == "1" else "1"
    again = evaluate_family("gan", params, project, model_uri=f"models:/brainlatent-gan/{loser}")
    assert again.metrics == (out2 if winner == "1" else out1).metrics
    assert not again.champion.moved and champion() == winner

    # FIDs from another protocol (here: fewer samples) are never compared with the old ones.
    other = evaluate_family("gan", _with_eval(params, n_samples=6), project, model_uri=f"models:/brainlatent-gan/{loser}")
    assert other.champion.moved and champion() == other.model_version


def test_samples_that_are_not_brains_fail_the_quality_gate_and_never_become_champion(project, caplog):
    """A cohort with enough evaluation scans for the sample-quality metrics (12 val, 24 train): the AE's
    evaluation scores its reconstructions as the floor; a GAN whose generator saturates (every voxel white)
    fails the gate loudly, is tagged so and does not take the champion alias."""
    write_processed(project, n=48)
    params = _params(evaluate={"champion_metric": {"ae": "mse", "vae": "intensity_w1", "gan": "intensity_w1",
                                                   "stylegan": "intensity_w1"}})
    train_featurenet(params, project)
    train_family("ae", params, root=project)
    ae = evaluate_family("ae", params, project)
    assert {f"floor_recon.{k}" for k in ("c2st_auc", "intensity_w1", "coverage")} <= set(ae.metrics)

    train_family("gan", params, root=project)
    gan = registry.load_model("models:/brainlatent-gan/1")
    with torch.no_grad():
        gan.model.generator_ema.out.bias.fill_(30.0)  # sigmoid(30): a saturated white box, not a brain
    tracking.configure(project)
    with mlflow.start_run(experiment_id=tracking.experiment_id("saturated", project)):
        bad, _ = registry.log_and_register(gan.model, "gan", gan.model.config_dict(), {})
    with caplog.at_level("WARNING", logger="brainlatent.evaluation"):
        out = evaluate_family("gan", params, project, model_uri=f"models:/brainlatent-gan/{bad}")
    assert "THE SAMPLES ARE NOT BRAINS" in caplog.text
    m = out.metrics
    assert m["intensity_w1"] > params.evaluate.gate_intensity_ratio * m["floor_real.intensity_w1"]
    assert m["c2st_auc"] > m["floor_real.c2st_auc"] and m["coverage"] < m["floor_real.coverage"]
    tags = MlflowClient().get_model_version("brainlatent-gan", bad).tags
    assert tags["eval.quality_gate"] == "fail" and "real-vs-real floor" in tags["eval.quality_gate_reason"]
    assert out.champion.champion != bad and out.champion.reason.startswith("not champion: its samples failed")
    assert "champion" not in MlflowClient().get_registered_model("brainlatent-gan").aliases


def test_unrankable_champion_metric_is_refused_by_name():
    with pytest.raises(ValueError, match=r"evaluate: champion_metric\.gan: metric key 'kid_std' has no direction"):
        _params(evaluate={"champion_metric": {"ae": "mse", "vae": "fid", "gan": "kid_std", "stylegan": "fid"}})


def test_evaluate_without_a_trained_model_fails_before_any_work(project, params):
    with pytest.raises(ValueError, match=r"trained/gan\.json not found.*--model-uri"):
        evaluate_family("gan", params, project)
    assert not (project / "mlflow.db").exists()
