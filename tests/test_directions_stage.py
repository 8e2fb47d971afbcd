"""The `directions@model` stage and `traverse_scan` end to end: tiny trained models, a real MLflow store."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_params_dict, write_processed
from mlflow.tracking import MlflowClient

from brainlatent import registry
from brainlatent.anatomy import atlas_on_grid, load_template
from brainlatent.config import params_from_dict
from brainlatent.data.cohort import AGE_GROUPS
from brainlatent.directions import Direction, map_correlation, partial_map_correlation
from brainlatent.directions.groundtruth import size_free_map_correlation
from brainlatent.directions.codec import LatentCodec
from brainlatent.data.dataset import ProcessedData
from brainlatent.directions.experiment import (FIT_SPLITS, GROUND_TRUTH_MAPS, feasible_targets, ground_truth_checks,
                                               run_directions, size_axis_rows, traversal_rows)
from brainlatent.directions.sizeaxis import global_size_map, scaling_axis
from brainlatent.directions.scan import traverse_scan
from brainlatent.grid import Grid
from brainlatent.models.stylegan import StyleGAN
from brainlatent.train.runner import train_family

# Tiny protocol: 2-fold CV, few bootstrap resamples and permutations, 4 traversed subjects x 3 steps.
# The hand-made cohort (conftest.write_processed) has an eTIV column but no skull-based head size
# (params.yaml's FS_IntraCranial_Vol): size control reads etiv_mm3 here.
FAST = dict(n_splits=2, n_repeats=1, n_bootstrap=50, n_permutations=3, pca_components=4, inversion_steps=4,
            n_traversal_subjects=4, n_strip_subjects=1, n_steps=3, max_step_sd=2.0, size_covariate="etiv_mm3")
DIRECTION_NAMES = {"sex", "age_old", "age_group", "sex_size_controlled"}
GROUP_AGE = {"22-25": 24.0, "26-30": 28.0, "31-35": 33.0, "36+": 36.5}


def _cohort(project) -> None:
    """The shared tiny cohort, with age groups dealt out evenly within each split so every probe can be
    fitted with 2 folds (random ages leave the small 36+ group empty in a 12-subject train split)."""
    out = write_processed(project)
    subjects = pd.read_csv(out / "subjects.csv", dtype={"subject_id": str})
    for split in ("train", "val", "test"):
        rows = np.flatnonzero(subjects["split"] == split)
        subjects.loc[rows, "age_group"] = [AGE_GROUPS[k % 4] for k in range(len(rows))]
    subjects["age"] = subjects["age_group"].map(GROUP_AGE)
    subjects.to_csv(out / "subjects.csv", index=False)


@pytest.fixture
def params(project):
    _cohort(project)
    return params_from_dict(tiny_params_dict(directions=FAST))


@pytest.fixture
def ae(project, params):
    train_family("ae", params, root=project)
    return params


def _direction_files(project, family: str) -> set[str]:
    return {p.stem for p in (project / "directions" / family / "directions").glob("*.json")}


def test_ae_stage_logs_run_metrics_artifacts_tags_and_dvc_outputs(project, ae):
    outcome = run_directions("ae", ae, root=project)
    out = project / "directions" / "ae"
    assert outcome.out_dir == out and outcome.model_version == "1"

    # DVC outputs: flat headline metrics, plot data, tables, directions, maps, figures.
    headline = json.loads((project / "metrics" / "directions" / "ae.json").read_text())
    # The version train@ae registered (trained/ae.json), named in the metrics file.
    assert headline.pop("model_version") == 1 and headline.pop("model_uri") == "models:/brainlatent-ae/1"
    assert {k: v for k, v in headline.items() if not isinstance(v, str)} == pytest.approx(outcome.metrics)
    for key in ("sex_auc", "sex_auc_low", "sex_auc_high", "sex_cv_auc", "sex_cv_auc_low", "sex_cv_auc_high",
                "sex_p_value", "age_old_auc", "age_group_spearman", "sex_size_controlled_auc",
                "sex_size_controlled_cv_auc_high", "sex_pca_voxels_auc", "sex_brain_mask_volume_auc",
                "sex_probe_monotonicity", "encode_psnr_db", "time_total_s",
                # counterfactual checks: per model, then per direction
                "cf_composition_mae", "cf_composition_cycle_mae", "cf_sex_zero_step_max",
                "cf_sex_reversibility_mae", "cf_sex_reversibility_ratio", "cf_age_group_effectiveness",
                "cf_sex_effectiveness"):
        assert key in headline, key
    # What the numbers are: the untouched test split, probes fitted on train + val, the covariate named.
    labels = {"heldout_split": "test", "fit_splits": "train+val", "size_covariate": "etiv_mm3",
              "size_control": "linear", "size_control_fit": "within", "size_axis": "scaling",
              "cf_sex_effectiveness_predictor": "brain_volume_mm3",
              "cf_age_group_effectiveness_predictor": "ventricle_volume_mm3"}
    assert {k: headline.pop(k) for k in labels} == labels
    assert headline.pop("cv_interval").startswith("corrected resampled t")
    predictors = {k: headline.pop(k) for k in list(headline) if k.endswith("_effectiveness_predictor")}
    assert predictors == {"cf_age_old_effectiveness_predictor": "ventricle_volume_mm3"}  # no other predictor here
    assert all(not isinstance(v, (dict, list, str)) for v in headline.values())  # flat numbers
    assert headline["sex_auc_low"] <= headline["sex_auc"] <= headline["sex_auc_high"]
    assert headline["sex_cv_auc_low"] <= headline["sex_cv_auc"] <= headline["sex_cv_auc_high"]
    assert headline["n_fit"] == 18 and headline["n_heldout"] == 6  # train + val | test
    assert headline["cf_sex_zero_step_max"] == 0.0  # the AE decodes deterministically
    assert 0 <= headline["cf_sex_reversibility_ratio"] and -1 <= headline["cf_sex_effectiveness"] <= 1
    assert headline["sex_size_controlled_cv_auc_high"] >= 0.5
    assert not any(k.endswith("_map_r") for k in headline)  # no ground truth in this cohort
    assert _direction_files(project, "ae") == DIRECTION_NAMES
    sex = Direction.load(out / "directions" / "sex.json")
    assert sex.metadata["model_version"] == "1" and sex.metadata["latent_dim"] == sex.dim == 8

    roc = pd.read_csv(out / "roc.csv")
    assert list(roc.columns) == ["fpr", "tpr", "target"] and set(roc["target"]) == {"sex", "age_old"}
    assert roc.groupby("target")["tpr"].max().eq(1.0).all()
    effects = pd.read_csv(out / "effects.csv")
    assert list(effects.columns) == ["step", "quantity", "direction", "value"]
    assert set(effects["direction"]) == DIRECTION_NAMES
    assert {"ventricle_volume_mm3", "brain_volume_mm3", "probe_output"} <= set(effects["quantity"])
    summary = pd.read_csv(out / "effects_summary.csv")
    assert len(summary) == 5 * len(DIRECTION_NAMES) and {"mean_spearman", "change_per_sd"} <= set(summary.columns)
    assert sorted(effects["step"].unique()) == [-2.0, 0.0, 2.0]
    probes = pd.read_csv(out / "probes.csv")
    assert {"pca_voxels", "pca_reconstructions", "brain_mask_volume", "latent", "latent_size_controlled"} == set(
        probes["features"])
    assert (probes["n_heldout"] == 6).all()  # every probe, baselines included, scored on the 6 test subjects
    assert 0.0 <= headline["age_old_pca_reconstructions_auc"] <= 1.0
    mean_diff = nib.load(out / "maps" / "age_group_mean_difference.nii.gz")
    np.testing.assert_allclose(mean_diff.affine, Grid.load(project / "data/processed/grid.json").affine)
    traversal = nib.load(next((out / "traversals").glob("sex_*.nii.gz")))
    assert traversal.shape == (16, 16, 16, 3)
    assert len(list((out / "figures").glob("*_strip.png"))) == 4 and len(list((out / "figures").glob("*.gif"))) == 4

    # MLflow: one run tagged with the model version, metrics and artifacts; headline tags on the version.
    run = mlflow.get_run(outcome.run_id)
    assert run.data.tags["model"] == "ae" and run.data.tags["model_version"] == "1"
    assert run.data.tags["model_name"] == "brainlatent-ae" and run.data.tags["model_uri"] == "models:/brainlatent-ae/1"
    assert run.data.tags["heldout_split"] == "test" and run.data.tags["heldout_untouched"] == "true"
    assert run.data.tags["size_covariate"] == "etiv_mm3" and run.data.params["directions.size_covariate"] == "etiv_mm3"
    assert run.data.tags["effectiveness_featurenet"].startswith("none")  # no feature net registered here
    assert "cf.age_group.reversibility_ratio" in run.data.metrics
    assert run.data.metrics["sex_auc"] == pytest.approx(headline["sex_auc"])
    assert "sex.latent.heldout_auc_low" in run.data.metrics and "sex.pca_voxels.heldout_auc" in run.data.metrics
    artifacts = {f.path for f in MlflowClient().list_artifacts(outcome.run_id)}
    assert {"directions", "maps", "figures", "traversals", "probes.csv", "roc.csv", "effects.csv"} <= artifacts
    version = MlflowClient().get_model_version("brainlatent-ae", "1")
    assert float(version.tags["directions.sex_auc"]) == pytest.approx(headline["sex_auc"], rel=1e-3)
    assert version.tags["directions.run_id"] == outcome.run_id


def _write_ground_truth(project, planted: dict[str, np.ndarray]) -> None:
    """A fake data/processed/ground_truth: known maps already on the grid effect maps are compared on."""
    gt = project / "data" / "processed" / "ground_truth"
    gt.mkdir(exist_ok=True)
    grid = Grid.load(project / "data" / "processed" / "grid.json")
    target = grid.centered_at(load_template().center_mm)  # load_effect_map returns such a map unchanged
    for key, data in planted.items():
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), target.affine), gt / GROUND_TRUTH_MAPS[key])


def test_ground_truth_checks_recover_a_planted_map(project, ae):
    """Plant each direction's own difference map: the stage must find r = 1 (a deterministic rerun) and
    compare the size-controlled and raw sex directions on the planted local sex map. A positive-control label
    (`planted`) is probed like sex, and its map checked against planted_effect.nii.gz."""
    processed = project / "data" / "processed"
    subjects = pd.read_csv(processed / "subjects.csv", dtype={"subject_id": str})
    subjects["planted"] = (subjects["index"] % 3 == 1).astype(int)  # both labels in train+val and in test
    subjects.to_csv(processed / "subjects.csv", index=False)
    first = run_directions("ae", ae, root=project)
    assert _direction_files(project, "ae") == DIRECTION_NAMES | {"planted", "planted_size_controlled"}
    maps = project / "directions" / "ae" / "maps"
    age_map = nib.load(maps / "age_group_mean_difference.nii.gz").get_fdata()
    local_map = nib.load(maps / "sex_size_controlled_mean_difference.nii.gz").get_fdata()
    planted_map = nib.load(maps / "planted_size_controlled_mean_difference.nii.gz").get_fdata()
    grid = Grid.load(processed / "grid.json")
    mask = atlas_on_grid(grid).brain > 0.5
    rng = np.random.default_rng(0)
    sex_map = rng.normal(size=age_map.shape)
    _write_ground_truth(project, {"age": age_map, "sex": sex_map, "sex_local": local_map, "planted": planted_map})

    # With three refits of the raw vs size-controlled comparison (directions.map_bootstrap; off by default).
    second = run_directions("ae", replace(ae, directions=replace(ae.directions, map_bootstrap=3)), root=project)
    m = second.metrics
    assert "planted_auc" in m and "planted_p_value" in m and "planted_size_controlled_auc" in m
    assert m["planted_map_r_size_controlled"] == pytest.approx(1.0, abs=1e-4)
    raw_planted = nib.load(maps / "planted_mean_difference.nii.gz").get_fdata()
    assert m["planted_map_r"] == pytest.approx(map_correlation(raw_planted, planted_map, mask), abs=1e-4)
    assert m["planted_size_controlled_better"] == float(m["planted_map_r"] < m["planted_map_r_size_controlled"])
    # Counterfactual checks against the planted maps: effectiveness from the map projection, minimality.
    headline = json.loads((project / "metrics" / "directions" / "ae.json").read_text())
    assert headline["cf_planted_effectiveness_predictor"] == "planted_map_projection"
    assert headline["cf_sex_size_controlled_effectiveness_predictor"] == "sex_local_map_projection"
    assert -1 <= m["cf_planted_size_controlled_effectiveness"] <= 1
    assert 0 <= m["cf_planted_size_controlled_minimality_outside_share"] <= 1
    assert 0 < m["cf_planted_size_controlled_minimality_chance"] < 1
    assert m["age_map_r"] == pytest.approx(1.0, abs=1e-4)
    assert m["sex_local_map_r_size_controlled"] == pytest.approx(1.0, abs=1e-4)
    raw_sex = nib.load(maps / "sex_mean_difference.nii.gz").get_fdata()
    assert m["sex_local_map_r_raw"] == pytest.approx(map_correlation(raw_sex, local_map, mask), abs=1e-4)
    assert m["sex_map_r"] == pytest.approx(map_correlation(raw_sex, sex_map, mask), abs=1e-4)
    better = m["sex_local_map_r_size_controlled"] > m["sex_local_map_r_raw"]
    assert m["sex_local_size_controlled_better"] == float(better)
    assert m["age_ventricle_sign_correct"] in (0.0, 1.0)
    # Beyond size: the same maps after taking out of both what a global rescaling of the traversed subjects, as the
    # model renders it, explains (recomputed here from the registered model and the same subjects).
    loaded = registry.load_model("models:/brainlatent-ae/1", torch.device("cpu"))
    codec = LatentCodec.for_model(loaded.model)
    data = ProcessedData.open(processed)
    trav = traversal_rows(data.split_indices("test"), len(data.subjects), FAST["n_traversal_subjects"], ae.seed)
    size_map = global_size_map(codec.encode_volumes, codec.decode_latents, data.volumes[trav])
    assert m["planted_map_r_beyond_size_size_controlled"] == pytest.approx(1.0, abs=1e-4)
    assert m["sex_local_map_r_beyond_size_size_controlled"] == pytest.approx(1.0, abs=1e-4)
    assert m["planted_map_r_beyond_size"] == pytest.approx(
        partial_map_correlation(raw_planted, planted_map, size_map, mask), abs=1e-4)
    assert m["sex_local_map_r_beyond_size_raw"] == pytest.approx(
        partial_map_correlation(raw_sex, local_map, size_map, mask), abs=1e-4)
    assert m["sex_local_map_r_global_size"] == pytest.approx(map_correlation(size_map, local_map, mask), abs=1e-4)
    assert m["planted_map_r_global_size"] == pytest.approx(map_correlation(size_map, planted_map, mask), abs=1e-4)
    assert m["sex_local_size_controlled_better_beyond_size"] == float(
        m["sex_local_map_r_beyond_size_size_controlled"] > m["sex_local_map_r_beyond_size_raw"])
    assert m["planted_size_controlled_better_beyond_size"] == float(
        m["planted_map_r_beyond_size_size_controlled"] > m["planted_map_r_beyond_size"])
    # The global size each direction moves beyond the local map (the size-controlled maps *are* the local maps
    # here: only float32 rounding is left of them beyond it, so their value is not checked, only the flag's rule).
    assert m["sex_global_size_r_beyond_local_raw"] == pytest.approx(
        partial_map_correlation(raw_sex, size_map, local_map, mask), abs=1e-4)
    assert m["planted_global_size_r_beyond_local"] == pytest.approx(
        partial_map_correlation(raw_planted, size_map, planted_map, mask), abs=1e-4)
    controlled = m.get("sex_global_size_r_beyond_local_size_controlled", np.nan)
    raw_size = m["sex_global_size_r_beyond_local_raw"]
    assert m["sex_local_size_controlled_less_size"] == float(abs(controlled) < abs(raw_size))
    assert "time_size_map_s" in m
    # Size-free r: the whole map against the part of the local map the rescaling map does not explain.
    assert m["sex_local_map_r_size_free_size_controlled"] == pytest.approx(
        size_free_map_correlation(local_map, local_map, size_map, mask), abs=1e-4)
    assert m["sex_local_map_r_size_free_raw"] == pytest.approx(
        size_free_map_correlation(raw_sex, local_map, size_map, mask), abs=1e-4)
    assert m["planted_size_controlled_minus_raw_r_size_free"] == pytest.approx(
        m["planted_map_r_size_free_size_controlled"] - m["planted_map_r_size_free"], abs=1e-9)
    for stem in ("sex_local", "planted"):
        for suffix in ("", "_beyond_size", "_size_free"):
            low, high = (m[f"{stem}_size_controlled_minus_raw_r{suffix}_{end}"] for end in ("low", "high"))
            assert -2 <= low <= high <= 2
            assert m[f"{stem}_size_controlled_better{suffix}_share"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert "time_map_bootstrap_s" in m
    assert second.metrics["sex_auc"] == pytest.approx(first.metrics["sex_auc"])  # deterministic
    run = mlflow.get_run(second.run_id)
    assert "gt.age_old.ventricle_volume_mm3.change_per_sd" in run.data.metrics
    assert {"gt.age_group.age_map_r_beyond_size", "gt.global_size.age_map_r",
            "gt.planted.size_controlled_minus_raw_r_beyond_size"} <= set(run.data.metrics)
    assert run.data.metrics["gt.sex_local.bootstrap_refits"] == 3
    version = MlflowClient().get_model_version("brainlatent-ae", "1")
    assert float(version.tags["directions.age_map_r"]) == pytest.approx(1.0, abs=1e-3)


def test_size_control_checks_tell_the_local_effect_from_the_global_size_a_direction_carries():
    """Known answer: a raw direction that renders the local effect plus a global rescaling, and a size-controlled
    one that renders the local effect alone. Beyond size both recover the local map equally (the partial r is
    blind to the size component by construction); the global size moved beyond the local map tells them apart."""
    grid = Grid.box((12, 16, 12), (176.0, 224.0, 176.0), load_template().center_mm)
    mask = atlas_on_grid(grid).brain > 0.5
    rng = np.random.default_rng(0)
    local, size = rng.normal(size=(2, *grid.shape))
    noise = lambda: 0.3 * rng.normal(size=grid.shape)  # noqa: E731 - the decoders' own idiosyncrasy
    study = lambda m: SimpleNamespace(difference=SimpleNamespace(mean_difference=m))  # noqa: E731
    studies = {"sex": study(local + 2.0 * size + noise()), "sex_size_controlled": study(local + noise())}
    out = ground_truth_checks({"sex_local": local}, grid, studies, size_map=size)
    beyond = (out["gt.sex.sex_local_map_r_beyond_size"], out["gt.sex_size_controlled.sex_local_map_r_beyond_size"])
    assert beyond[0] == pytest.approx(beyond[1], abs=0.05) and min(beyond) > 0.9
    assert out["gt.sex.global_size_map_r_beyond_sex_local"] > 0.95
    assert abs(out["gt.sex_size_controlled.global_size_map_r_beyond_sex_local"]) < 0.1
    assert out["gt.sex_local.size_controlled_less_size"] == 1.0
    assert out["gt.sex_local.size_controlled_better"] == 1.0  # plain r: raw is diluted by its size component
    # Size-free r: the whole map against the local map's size-free part; raw's size component counts against it.
    free = (out["gt.sex.sex_local_map_r_size_free"], out["gt.sex_size_controlled.sex_local_map_r_size_free"])
    assert free[1] > 0.9 > 0.6 > free[0]
    assert out["gt.sex_local.size_controlled_better_size_free"] == 1.0
    assert out["gt.sex_local.size_controlled_minus_raw_r_size_free"] == pytest.approx(free[1] - free[0])


def test_scaling_size_axis_makes_the_size_controlled_directions_orthogonal_to_the_models_own_size_axis(project, ae):
    """directions.size_axis=scaling: the stage rescales a seeded subset of the fitting subjects, encodes them and
    makes the size-controlled direction orthogonal to the mean latent tangent; the raw directions are unchanged."""
    by_covariate = replace(ae, directions=replace(ae.directions, size_axis="covariate"))
    baseline = run_directions("ae", by_covariate, root=project)
    assert "size_axis_agreement" not in baseline.metrics
    assert Direction.load(project / "directions" / "ae" / "directions" / "sex_size_controlled.json").metadata[
        "orthogonal_to"] == "latent covariate predictor"
    raw_before = Direction.load(project / "directions" / "ae" / "directions" / "sex.json")
    params = replace(ae, directions=replace(ae.directions, size_axis="scaling", size_axis_subjects=8))
    outcome = run_directions("ae", params, root=project)
    m = outcome.metrics
    assert m["size_axis_subjects"] == 8 and 0 < m["size_axis_agreement"] <= 1 and "time_size_axis_s" in m
    assert 0 <= m["sex_size_controlled_size_axis_cos_covariate_axis"] <= 1
    headline = json.loads((project / "metrics" / "directions" / "ae.json").read_text())
    assert headline["size_axis"] == "scaling"
    d = Direction.load(project / "directions" / "ae" / "directions" / "sex_size_controlled.json")
    assert d.metadata["orthogonal_to"] == "latent scaling axis" and d.metadata["size_axis"] == "scaling"
    # The axis, recomputed from the same subjects with the registered model: the direction has no part along it.
    loaded = registry.load_model("models:/brainlatent-ae/1", torch.device("cpu"))
    codec = LatentCodec.for_model(loaded.model)
    data = ProcessedData.open(project / "data" / "processed")
    fit = np.sort(np.concatenate([data.split_indices(s) for s in FIT_SPLITS]))
    axis = scaling_axis(codec.encode_volumes, data.volumes[size_axis_rows(fit, 8, params.seed)])
    assert abs(d.vector @ axis.vector) < 1e-6
    assert axis.agreement == pytest.approx(m["size_axis_agreement"], abs=1e-6)
    # Same probes, same raw directions; the size-controlled probe's AUC does not depend on the axis.
    np.testing.assert_allclose(Direction.load(project / "directions" / "ae" / "directions" / "sex.json").vector,
                               raw_before.vector, atol=1e-12)
    assert m["sex_size_controlled_auc"] == pytest.approx(baseline.metrics["sex_size_controlled_auc"])


def test_gan_stage_inverts_the_cohort_and_reencodes_a_subset(project, params):
    train_family("gan", params, root=project)
    outcome = run_directions("gan", params, root=project)
    run = mlflow.get_run(outcome.run_id)
    assert run.data.tags["latent_space"] == "z" and run.data.tags["reencode_subjects"] == "2"
    assert _direction_files(project, "gan") == DIRECTION_NAMES
    per_subject = pd.read_csv(project / "directions" / "gan" / "effects_per_subject.csv")
    reencoded = per_subject.dropna(subset=["probe_output"])
    assert reencoded["subject"].nunique() == 2 and per_subject["subject"].nunique() == 4
    assert (project / "metrics" / "directions" / "gan.json").is_file()
    assert "time_encode_s" in outcome.metrics
    # The default scaling size axis inverts 2 x min(size_axis_subjects, fitting subjects) volumes.
    assert outcome.metrics["size_axis_subjects"] == 18 and "time_size_axis_s" in outcome.metrics


def test_targets_that_cannot_fill_the_folds_are_skipped_with_the_reason():
    groups = ["22-25"] * 4 + ["26-30"] * 4 + ["31-35"] * 3 + ["36+"]  # one 36+ subject
    subjects = pd.DataFrame({"sex": ["F", "M"] * 6, "age_group": groups})
    ok, skipped = feasible_targets(subjects, n_splits=2)
    assert ok == ["sex", "age_old"] and set(skipped) == {"age_group"}
    assert "class 3 has 1 subjects, fewer than the 2 CV folds" in skipped["age_group"]
    rows = traversal_rows(np.arange(10, 20), 20, 4, seed=0)
    assert len(rows) == 4 and set(rows) <= set(range(10, 20)) and np.array_equal(rows, np.sort(rows))
    assert np.array_equal(rows, traversal_rows(np.arange(10, 20), 20, 4, seed=0))
    assert len(traversal_rows(np.array([3]), 20, 4, seed=0)) == 4  # < 2 held out: any subject


def test_stylegan_w_plus_codec_flattens_and_restores_layers():
    model = StyleGAN(volume_shape=(8, 8, 8), z_dim=4, w_dim=4, n_mapping=1, n_levels=2, base_channels=4,
                     max_channels=4).eval()
    codec = LatentCodec.for_model(model, "w+", inversion_steps=2)
    assert codec.dim == model.n_layers * 4 and codec.latent_space == "w+"
    x = torch.rand(3, 1, 8, 8, 8)
    with torch.inference_mode():  # as effects.apply_batched calls it: inversion must still work
        z = codec.encode(x)
    assert z.shape == (3, codec.dim)
    w_plus = z.reshape(3, model.n_layers, 4)
    torch.testing.assert_close(codec.decode(z), model.decode(w_plus))
    assert LatentCodec.for_model(model, "w", 2).dim == 4
    with pytest.raises(ValueError, match=f"expected latents \\(B, {codec.dim}\\)"):
        codec.decode(torch.zeros(2, 4))
    # The scaling size axis in W+ (inversion of the rescaled volumes): one flat unit axis of the codec's size.
    axis = scaling_axis(lambda v: codec.encode_volumes(v, batch_size=4), np.random.default_rng(0).random((3, 8, 8, 8)))
    assert axis.vector.shape == (codec.dim,) and abs(np.linalg.norm(axis.vector) - 1) < 1e-9


# ------------------------------------------------------------------------------------------ traverse_scan
def _scan(project, tmp_path, index: int = 3):
    """A user's scan: a tiny-cohort volume with a 0 background, saved with the grid affine."""
    volume = np.load(project / "data" / "processed" / "volumes.npy")[index].astype(np.float32)
    volume *= volume > 0.05
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, Grid.load(project / "data" / "processed" / "grid.json").affine), path)
    return path


def test_traverse_scan_writes_a_nifti_per_step_and_a_strip(project, ae, tmp_path):
    run_directions("ae", ae, root=project)
    out = tmp_path / "out"
    written = traverse_scan("models:/brainlatent-ae@candidate", _scan(project, tmp_path), "age", [-2, 0, 1, 2],
                            out, ae, root=project)
    steps = sorted(out.glob("age_group_step*.nii.gz"))
    assert len(steps) == 4 and set(steps) <= set(written)
    img = nib.load(steps[0])
    assert img.shape == (16, 16, 16) and (out / "age_group_strip.png").is_file()
    info = json.loads((out / "traversal.json").read_text())
    assert info["direction"] == "age_group" and info["model_version"] == "1" and np.isfinite(info["scan_position_sd"])
    # Step 0 is the plain reconstruction of the preprocessed scan.
    recon = nib.load(out / "age_group_step01_+0.00sd.nii.gz").get_fdata()
    model = registry.load_model("models:/brainlatent-ae/1").model
    x = torch.from_numpy(nib.load(out / "input.nii.gz").get_fdata().astype(np.float32))[None, None]
    with torch.no_grad():
        np.testing.assert_allclose(recon, model.decode(model.encode(x))[0, 0].numpy(), atol=1e-5)
    assert not np.allclose(nib.load(steps[-1]).get_fdata(), recon)  # moving changes the brain

    # Without the local files the directions come from the version's MLflow run.
    for f in (project / "directions" / "ae" / "directions").glob("*.json"):
        f.unlink()
    again = traverse_scan("models:/brainlatent-ae/1", _scan(project, tmp_path), "sex", [1.0], tmp_path / "o2",
                          ae, root=project)
    assert any(p.name.startswith("sex_step00") for p in again)


def test_traverse_scan_errors_name_the_thing(project, ae, tmp_path):
    scan = _scan(project, tmp_path)
    uri = "models:/brainlatent-ae@candidate"
    with pytest.raises(ValueError, match="no directions fitted"):
        traverse_scan(uri, scan, "sex", [1.0], tmp_path / "o", ae, root=project)
    run_directions("ae", ae, root=project)
    with pytest.raises(ValueError, match=r"unknown direction 'height'.*available: \['age_group', 'age_old', 'sex'"):
        traverse_scan(uri, scan, "height", [1.0], tmp_path / "o", ae, root=project)
    wrong = Direction("sex", np.eye(5)[0], step_sd=1.0, center=0.0, positive="male", logit_per_sd=1.0,
                      metadata={"model_name": "brainlatent-ae", "model_version": "7"}).save(tmp_path / "w.json")
    with pytest.raises(ValueError, match="has 5 dimensions.*8 dimensions.*another model version"):
        traverse_scan(uri, scan, str(wrong), [1.0], tmp_path / "o", ae, root=project)
    four_d = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16, 2), np.float32), np.eye(4)), four_d)
    with pytest.raises(ValueError, match="4d.nii.gz: cannot preprocess.*4D image"):
        traverse_scan(uri, four_d, "sex", [1.0], tmp_path / "o", ae, root=project)
    with pytest.raises(ValueError, match="no registered model named 'brainlatent-nope'"):
        traverse_scan("models:/brainlatent-nope@champion", scan, "sex", [1.0], tmp_path / "o", ae, root=project)
    with pytest.raises(ValueError, match="alias 'gold' is not set"):
        traverse_scan("models:/brainlatent-ae@gold", scan, "sex", [1.0], tmp_path / "o", ae, root=project)
    with pytest.raises(ValueError, match="steps: expected one or more finite numbers"):
        traverse_scan(uri, scan, "sex", [], tmp_path / "o", ae, root=project)

    # A second version has no directions of its own: the local files (version 1) are not silently reused.
    train_family("ae", ae, root=project)
    with pytest.raises(ValueError, match="fitted for brainlatent-ae version 1, not brainlatent-ae version 2"):
        traverse_scan("models:/brainlatent-ae/2", scan, "sex", [1.0], tmp_path / "o", ae, root=project)
