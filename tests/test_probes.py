"""Probes: metrics, cross-validated AUC with CIs, permutation p-values, held-out scores, baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from brainlatent.directions import ProbeSettings, evaluate_probe, make_probe, run_probe_suite, target_labels
from brainlatent.directions import metrics as M

FAST = ProbeSettings(n_splits=4, n_repeats=2, C=1.0, n_bootstrap=300, n_permutations=29, seed=0)


def _logistic_cohort(n: int, dim: int, strength: float, seed: int):
    """Latents (n, dim); labels Bernoulli(sigmoid(strength * z0)); returns (z, y, true score)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, dim))
    score = strength * z[:, 0]
    y = (rng.random(n) < 1 / (1 + np.exp(-score))).astype(np.int64)
    return z, y, score


def test_vectorised_metrics_match_sklearn_and_scipy():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=(5, 40))
    s = np.round(rng.normal(size=(5, 40)), 1)  # rounding makes ties
    g = rng.integers(0, 4, size=40)
    for i in range(5):
        assert M.auc(y[i], s[i]) == pytest.approx(roc_auc_score(y[i], s[i]))
        assert M.balanced_accuracy(y[i], s[i] > 0, 2) == pytest.approx(balanced_accuracy_score(y[i], s[i] > 0))
        assert M.spearman(g, s[i]) == pytest.approx(spearmanr(g, s[i]).statistic)
    np.testing.assert_allclose(M.auc(y, s), [roc_auc_score(a, b) for a, b in zip(y, s)])
    assert np.isnan(M.auc(np.ones(10), np.arange(10.0)))  # a single class: undefined, not 0 or 1
    assert M.ordinal_auc(g, g + 0.0, 4) == pytest.approx(1.0)


def test_stratified_bootstrap_keeps_class_counts():
    y = np.array([0] * 7 + [1] * 3)
    idx = M.stratified_bootstrap_indices(y, 50, np.random.default_rng(0))
    assert idx.shape == (50, 10)
    np.testing.assert_array_equal(y[idx].sum(1), 3)


def test_random_labels_give_chance_auc_and_no_significance():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(120, 12))
    y = rng.permutation(np.repeat([0, 1], 60))
    res = evaluate_probe(make_probe("binary", "latent", FAST), z, y, "binary", FAST, target="sex", features="latent")
    auc = res.cv["auc"]
    assert auc.contains(0.5)
    assert abs(auc.value - 0.5) < 0.12
    assert res.p_value > 0.05
    assert res.oof_scores.shape == (FAST.n_repeats, 120)


def test_real_signal_is_significant_and_ci_covers_the_true_auc():
    z, y, score = _logistic_cohort(240, 8, strength=2.5, seed=4)
    # The Bayes-optimal AUC of this generative model, from a large independent sample.
    zb, yb, sb = _logistic_cohort(200_000, 1, strength=2.5, seed=5)
    true_auc = roc_auc_score(yb, sb)
    res = evaluate_probe(make_probe("binary", "latent", FAST), z, y, "binary", FAST, target="sex", features="latent")
    auc = res.cv["auc"]
    assert res.p_value <= 1 / (FAST.n_permutations + 1) + 1e-12  # beats every permutation
    # Estimation error can only lower a fitted probe's AUC below the Bayes AUC, by a little at n=240.
    assert auc.low <= true_auc <= auc.high + 0.02
    assert auc.low < auc.value < auc.high
    assert 0.6 < res.cv["balanced_accuracy"].value <= auc.value + 0.05
    flat = res.flat_metrics()
    assert flat["sex.latent.cv_auc"] == auc.value and "sex.latent.p_value" in flat


def test_nested_cv_picks_c_from_the_grid_and_heldout_matches_cv():
    z, y, score = _logistic_cohort(300, 6, strength=2.0, seed=6)
    settings = ProbeSettings(n_splits=3, n_repeats=1, n_bootstrap=200, n_permutations=0, Cs=(0.01, 0.1, 1.0, 10.0))
    res = evaluate_probe(make_probe("binary", "latent", settings), z[:200], y[:200], "binary", settings,
                         X_test=z[200:], y_test=y[200:])
    assert res.regularisation["C"] in settings.Cs
    assert np.isnan(res.p_value)
    held = res.heldout["auc"]
    assert held.low < held.value < held.high
    # A well-fitted probe ranks the test subjects almost as well as the true score does.
    assert held.value == pytest.approx(roc_auc_score(y[200:], score[200:]), abs=0.05)


def test_ordinal_age_probe_tracks_group_order():
    rng = np.random.default_rng(7)
    n = 200
    age = rng.uniform(22, 37, n)
    group = np.digitize(age, [26, 31, 36])  # 0..3 like AGE_GROUPS
    z = rng.normal(size=(n, 10))
    z[:, 3] += (age - 29.5) / 4.0
    res = evaluate_probe(make_probe("ordinal", "latent", FAST), z, group, "ordinal", FAST)
    assert set(res.cv) == {"spearman", "auc", "balanced_accuracy"}
    assert res.cv["spearman"].low > 0.3
    assert res.cv["auc"].value > 0.7
    assert res.p_value < 0.05
    assert "alpha" in res.regularisation


def test_label_validation_names_the_problem():
    z = np.zeros((10, 2))
    with pytest.raises(ValueError, match="labels 0 and 1"):
        evaluate_probe(make_probe("binary", "latent", FAST), z, np.zeros(10, np.int64), "binary", FAST)
    with pytest.raises(ValueError, match="fewer than the 4 CV folds"):
        evaluate_probe(make_probe("binary", "latent", FAST), z, np.array([0] * 8 + [1] * 2), "binary", FAST)
    with pytest.raises(ValueError, match="n_splits"):
        ProbeSettings(n_splits=1)


def _subjects(n: int, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    sex = rng.permutation(np.repeat(["F", "M"], n // 2))
    groups = rng.choice(["22-25", "26-30", "31-35", "36+"], size=n)
    male = (sex == "M").astype(float)
    size = 0.9 * male + rng.normal(0, 0.5, n)  # standardised head size, larger in males
    table = pd.DataFrame({"sex": sex, "age_group": groups, "brain_volume_mm3": 1.2e6 * (1 + 0.08 * size)})
    return table, size


def test_targets_follow_the_sign_convention():
    table = pd.DataFrame({"sex": ["F", "M", "M"], "age_group": ["22-25", "31-35", "36+"]})
    np.testing.assert_array_equal(target_labels(table, "sex"), [0, 1, 1])
    np.testing.assert_array_equal(target_labels(table, "age_old"), [0, 1, 1])
    np.testing.assert_array_equal(target_labels(table, "age_group"), [0, 2, 3])
    with pytest.raises(ValueError, match="column 'sex' has values"):
        target_labels(table.assign(sex=["F", "X", "M"]), "sex")


def test_suite_runs_every_probe_and_baseline():
    rng = np.random.default_rng(8)
    n = 96
    table, size = _subjects(n, rng)
    male = (table["sex"] == "M").to_numpy(float)
    z = rng.normal(size=(n, 8))
    z[:, 0] += size  # size is in the latents
    z[:, 1] += 1.5 * male  # and a sex effect beyond size
    # Tiny 6^3 "volumes": intensity in one corner scales with head size.
    vols = rng.normal(0.5, 0.05, size=(n, 6, 6, 6)).astype(np.float32)
    vols[:, :3, :3, :3] += 0.1 * size[:, None, None, None]
    settings = ProbeSettings(n_splits=3, n_repeats=1, C=1.0, n_bootstrap=100, n_permutations=0, pca_components=5)
    test_table, _ = _subjects(40, rng)
    suite = run_probe_suite(z, table, settings, volumes=vols, test_latents=rng.normal(size=(40, 8)),
                            test_subjects=test_table)
    rows = suite.table().set_index(["target", "features"])
    expected = {(t, f) for t in ("sex", "age_old", "age_group") for f in ("latent", "pca_voxels", "brain_volume")}
    assert expected | {("sex", "latent_size_controlled")} == set(rows.index)
    assert rows.loc[("sex", "brain_volume"), "cv_auc"] > 0.7  # size alone predicts sex here
    assert rows.loc[("sex", "latent_size_controlled"), "cv_auc"] > 0.65  # the local effect survives control
    assert rows.loc[("sex", "latent"), "cv_auc"] > rows.loc[("sex", "pca_voxels"), "cv_auc"]
    assert rows["heldout_auc"].notna().loc[[("sex", "latent"), ("sex", "brain_volume")]].all()
    assert np.isnan(rows.loc[("sex", "pca_voxels"), "heldout_auc"])  # no test volumes were given
    assert set(suite.directions) == {"sex", "age_old", "age_group", "sex_size_controlled"}
    assert suite.directions["sex"].positive == "male" and suite.directions["age_group"].positive == "older"
    assert all(np.isfinite(v) or np.isnan(v) for v in suite.flat_metrics().values())
