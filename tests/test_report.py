"""The `report` stage: its numbers are exactly the evaluation runs' MLflow metrics (real temporary store)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_params_dict
from mlflow.tracking import MlflowClient

from brainlatent.anatomy import load_template
from brainlatent.config import params_from_dict
from brainlatent.grid import Grid
from brainlatent.evaluation import evaluate_family, train_featurenet
from brainlatent.report import (
    DIRECTION_CHECKS,
    below_baseline_reason,
    build_report,
    comparability_warnings,
    directions_summary,
    family_section,
    format_value,
    headline_table,
)
from brainlatent.train.runner import train_family
from brainlatent.viz.montage import save_nifti
from brainlatent.viz.viewer import external_references


@pytest.fixture
def params(tiny_processed):
    return params_from_dict(tiny_params_dict(
        featurenet={"channels": [4, 8, 16], "feature_dim": 16, "epochs": 2, "batch_size": 4},
        evaluate={"n_samples": 8, "ms_ssim_pairs": 10, "kid_subset_size": 8, "inversion_steps": 5},
    ))


def _markdown_metrics(text: str) -> dict[str, dict[str, str]]:
    """{family: {metric: cell}} from the report's Metrics table (arrows and bold stripped)."""
    lines = [line for line in text.split("## Metrics")[1].split("## Models")[0].splitlines() if line.startswith("|")]
    header = [h.strip().split(" ")[0] for h in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def test_report_numbers_are_what_mlflow_holds(project, params):
    train_featurenet(params, project)
    train_family("ae", params, root=project)
    train_family("gan", params, root=project)
    evaluate_family("ae", params, project)
    latest_ae = evaluate_family("ae", params, project)  # the report must use the latest evaluation
    gan = evaluate_family("gan", params, project)
    (project / "metrics" / "directions").mkdir(parents=True)
    (project / "metrics" / "directions" / "gan.json").write_text(json.dumps({"sex": {"auc": 0.75}, "note": "x"}))
    grid = Grid.load(project / "data" / "processed" / "grid.json")  # the directions stage's map of one direction
    diff = np.zeros(grid.shape, np.float32)
    diff[4:7, 8:11, 8:11] = 0.2
    save_nifti(diff, grid.affine, project / "directions" / "gan" / "maps" / "sex_mean_difference.nii.gz")
    placed = grid.centered_at(load_template().center_mm)  # a planted map, as `prepare` leaves it for a synthetic cohort
    save_nifti(-diff, placed.affine, project / "data" / "processed" / "ground_truth" / "age_effect.nii.gz")

    out = build_report(params, project)
    assert list(out.table.index) == ["ae", "gan"] and out.warnings == []
    assert out.models.loc["ae", "evaluation_run"] == latest_ae.run_id
    assert out.models.loc["gan", "evaluation_run"] == gan.run_id

    client = MlflowClient()
    md = _markdown_metrics((out.out_dir / "metrics.md").read_text())
    # Read as text and parsed with float(): pandas before 3.0 does not read every float back bit for bit.
    csv = pd.read_csv(out.out_dir / "metrics.csv", index_col="family", dtype=str)
    report_run = client.get_run(out.run_id)
    for family in ("ae", "gan"):
        held = client.get_run(out.models.loc[family, "evaluation_run"]).data.metrics
        row = out.table.loc[family]
        shown = {k: v for k, v in row.items() if pd.notna(v) and not k.startswith("directions.")}
        assert shown == held  # every metric of the run, exactly, and nothing else
        assert {k: float(csv.loc[family, k]) for k in held} == held
        assert {k: md[family][k] for k in held} == {k: format_value(v) for k, v in held.items()}
        assert {k: report_run.data.metrics[f"{family}.{k}"] for k in held} == held
    assert "fid" in md["gan"] and md["ae"]["fid"] == "(not a sampler)"  # a blank says why
    assert [d.dataset.name for d in report_run.inputs.dataset_inputs] == ["data/processed"]
    trained = client.get_run(out.models.loc["gan", "trained_run"])
    assert [d.dataset.name for d in trained.inputs.dataset_inputs] == ["data/processed"]  # the Dataset column
    assert out.table.loc["gan", "directions.sex.auc"] == 0.75 and pd.isna(out.table.loc["ae", "directions.sex.auc"])

    for name in ("index.html", "metrics.md", "metrics.csv", "samples.png", "metrics.png", "maps/gan/sex_glass.png",
                 "maps/planted/age_glass.png"):
        assert (out.out_dir / name).is_file(), name
    page = (out.out_dir / "index.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 4  # self-contained: samples, metrics, 2 glass brains
    assert page.count("<iframe") == 2 and "brainsprite" in page  # the gan sex map's and the planted map's viewers
    assert external_references(page) == []
    # Reading order: headline, one section per family (its maps in it), then the full tables.
    text = (out.out_dir / "metrics.md").read_text()
    order = [text.index(h) for h in ("## Headline", "## ae: brainlatent-ae v", "## gan: brainlatent-gan v",
                                     "![gan sex](maps/gan/sex_glass.png)", "## Planted effects",
                                     "![planted age](maps/planted/age_glass.png)", "## Metrics (full table)", "## Models")]
    assert order == sorted(order), order
    assert f"<td>{latest_ae.run_id}</td>" in page
    logged = {a.path for a in client.list_artifacts(out.run_id, "report")}
    assert {"report/index.html", "report/samples.png", "report/metrics.md"} <= logged
    assert "vae: " in (text := (out.out_dir / "metrics.md").read_text()) and "trained/vae.json not found" in text


def test_report_without_evaluations_says_what_to_run(project, params):
    with pytest.raises(ValueError, match="no family has an evaluated trained version"):
        build_report(params, project)
    assert mlflow.get_experiment_by_name("brainlatent-report") is None


def test_rows_from_different_feature_extractors_are_flagged():
    models = pd.DataFrame(
        {"featurenet": ["models:/brainlatent-featurenet/1", "models:/brainlatent-featurenet/1",
                        "models:/brainlatent-featurenet/2"],
         "protocol": ["a", "a", "b"], "has_samples": [False, True, True]},
        index=["ae", "vae", "gan"],
    )
    warnings = comparability_warnings(models)
    assert len(warnings) == 2 and "NOT comparable" in warnings[0] and "gan: b" in warnings[1]
    same = models.assign(featurenet="models:/brainlatent-featurenet/1", protocol="a")
    assert comparability_warnings(same) == []


def test_directions_summary_marks_each_target_for_the_families_it_applies_to():
    table = pd.DataFrame(
        {"directions.sex_auc": [0.92, 0.899, 0.88], "directions.age_ventricle_sign_correct": [1.0, 1.0, 0.0],
         "directions.sex_brain_mask_volume_auc": [0.93, 0.93, 0.93], "fid": [float("nan"), 57.0, 6.4]},
        index=["ae", "vae", "gan"],
    )
    summary = directions_summary(table)
    sex = summary.loc["sex: probe AUC on held-out latents"]
    assert sex["target"] == ">= 0.9 (ae, vae)"
    assert (sex["ae"], sex["vae"], sex["gan"]) == ("0.92 pass", "0.899 FAIL", "0.88")  # no target for the GAN
    sign = summary.loc["age direction: ventricle change has the planted sign (1 = yes)"]
    assert (sign["ae"], sign["gan"]) == ("1 pass", "0 FAIL")
    assert summary.loc["sex: baseline AUC, native brain-mask volume alone", "target"] == ""
    assert "age direction: difference map vs planted age effect (r)" not in summary.index  # not measured here
    assert directions_summary(table[["fid"]]) is None


def test_every_direction_check_asks_its_own_question_of_a_headline_number():
    """The summary's rows are keyed by the question: two checks asking the same one would show one's value under
    the other's key (it happened: "the same (partial r)" twice)."""
    questions = [check.question for check in DIRECTION_CHECKS]
    assert len(set(questions)) == len(questions), sorted(q for q in questions if questions.count(q) > 1)
    keys = [check.key for check in DIRECTION_CHECKS]
    assert len(set(keys)) == len(keys)


def test_headline_puts_every_quality_number_beside_its_floors_and_says_why_cells_are_blank():
    table = pd.DataFrame(
        {"c2st_auc": [float("nan"), 0.97, 1.0], "floor_real.c2st_auc": [float("nan"), 0.35, 0.35],
         "intensity_w1": [float("nan"), 0.0074, 0.098], "floor_real.intensity_w1": [float("nan"), 0.0049, 0.0049],
         "coverage": [float("nan"), 1.0, 0.0], "floor_real.coverage": [float("nan"), 1.0, 1.0],
         "floor_recon.c2st_auc": [0.72, float("nan"), float("nan")],
         "floor_recon.intensity_w1": [0.0056, float("nan"), float("nan")],
         "floor_recon.coverage": [1.0, float("nan"), float("nan")], "fid": [float("nan"), 5.1, 6.4],
         "directions.sex_auc": [0.92, 0.91, 0.88], "directions.sex_brain_mask_volume_auc": [0.93, 0.93, 0.93],
         "directions.age_old_auc": [0.96, 0.97, 0.63], "directions.age_old_pca_voxels_auc": [0.89, 0.89, 0.89],
         "directions.age_old_pca_reconstructions_auc": [0.90, 0.88, 0.61],
         "directions.encode_psnr_db": [30.0, 29.5, 23.7]},
        index=["ae", "vae", "gan"],
    )
    models = pd.DataFrame({"has_samples": [False, True, True], "quality_gate": ["", "pass", "fail"],
                           "quality_gate_reason": ["", "", "coverage 0.00 of the real scans (minimum 0.25)"]},
                          index=["ae", "vae", "gan"])
    top = headline_table(table, models)
    assert top.loc["ae", "makes brains?"].startswith("not a sampler")
    assert top.loc["vae", "makes brains?"] == "yes (quality gate passed)"
    assert top.loc["gan", "makes brains?"] == "NO: coverage 0.00 of the real scans (minimum 0.25)"
    assert top.loc["vae", "intensity W1 ↓"] == "0.0074 (real 0.0049; AE 0.0056)"
    assert top.loc["gan", "W1 / AE floor"] == "17.5x" and top.loc["vae", "W1 / AE floor"] == "1.3x"
    assert top.loc["ae", "intensity W1 ↓"] == "0.0056 (reconstructions)"
    assert top.loc["ae", "FID ↓"] == top.loc["ae", "W1 / AE floor"] == "(not a sampler)"
    assert top.loc["gan", "young/old AUC, test (PCA of voxels; of the reconstructions)"] == (
        "0.63 (voxels 0.89; reconstructions 0.61)")
    assert top.loc["vae", "age map vs planted (r)"] == "(not measured: the cohort or split lacks it)"

    section = family_section("ae", table, models, directions_summary(table))  # the family's own section
    c2st = next(k for k in section.index if k.startswith("c2st_auc"))
    fid = next(k for k in section.index if "fid" in k)  # with every other sample metric the AE lacks: one row
    assert section.loc[c2st].tolist() == ["(not a sampler)", "AE floor 0.72"]
    assert section.loc[fid, "value"] == "(not a sampler)"
    assert section.loc["directions: sex: probe AUC on held-out latents", "value"] == "0.92 pass"
    vae = family_section("vae", table, models, None)
    assert vae.loc[c2st].tolist() == ["0.97", "real floor 0.35"]
    assert not any(k.startswith("directions: why") for k in vae.index)  # at its baseline: nothing to explain
    gan = family_section("gan", table, models, directions_summary(table))
    assert gan.loc["directions: why age_old is below the PCA-of-voxels baseline", "value"] == (
        "latents 0.63 < PCA of the voxels 0.89: the encoding loses it, PCA of the reconstructions reaches 0.61 "
        "(encode PSNR 23.7 dB)")


def test_a_latent_probe_below_its_baseline_is_explained_by_what_the_reconstructions_keep():
    kept = {"age_old_auc": 0.60, "age_old_pca_voxels_auc": 0.90, "age_old_pca_reconstructions_auc": 0.88}
    assert below_baseline_reason("age_old", kept) == ("latents 0.60 < PCA of the voxels 0.90: the reconstructions "
                                                      "keep it (PCA of them 0.88), the latents do not hold it linearly")
    assert below_baseline_reason("age_old", {**kept, "age_old_auc": 0.87}) is None  # within the margin
    assert below_baseline_reason("sex", kept) is None  # no numbers for sex
    unmeasured = {"age_old_auc": 0.60, "age_old_pca_voxels_auc": 0.90}
    assert below_baseline_reason("age_old", unmeasured) == "latents 0.60 < PCA of the voxels 0.90"
