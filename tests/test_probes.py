"""Probes: metrics, cross-validated AUC with corrected-t CIs, permutation p-values from the same CV, held-out
scores, baselines, size control (covariate choice, spline), the positive-control label."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from brainlatent.directions import (
    ProbeSettings,
    available_targets,
    evaluate_probe,
    make_probe,
    run_probe_suite,
    target_labels,
)
from brainlatent.directions import metrics as M
from brainlatent.directions.evaluation import corrected_t_interval

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
    table = pd.DataFrame({"sex": sex, "age_group": groups, "brain_mask_volume_mm3": 1.2e6 * (1 + 0.08 * size),
                          "etiv_mm3": 1.5e6 * (1 + 0.08 * size + rng.normal(0, 0.002, n))})
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
    # Reconstructions that lost the head-size corner: PCA of them cannot read sex through size.
    recon = vols.copy()
    recon[:, :3, :3, :3] = 0.5
    test_table, _ = _subjects(40, rng)
    suite = run_probe_suite(z, table, settings, volumes=vols, reconstructions=recon,
                            test_latents=rng.normal(size=(40, 8)), test_subjects=test_table)
    rows = suite.table().set_index(["target", "features"])
    kinds = ("latent", "pca_voxels", "pca_reconstructions", "brain_mask_volume")
    expected = {(t, f) for t in ("sex", "age_old", "age_group") for f in kinds}
    assert expected | {("sex", "latent_size_controlled")} == set(rows.index)
    assert rows.loc[("sex", "pca_reconstructions"), "cv_auc"] < rows.loc[("sex", "pca_voxels"), "cv_auc"] - 0.1
    assert rows.loc[("sex", "brain_mask_volume"), "cv_auc"] > 0.7  # size alone predicts sex here
    assert rows.loc[("sex", "latent_size_controlled"), "cv_auc"] > 0.65  # the local effect survives control
    assert rows.loc[("sex", "latent"), "cv_auc"] > rows.loc[("sex", "pca_voxels"), "cv_auc"]
    assert rows["heldout_auc"].notna().loc[[("sex", "latent"), ("sex", "brain_mask_volume")]].all()
    no_test_volumes = rows.index.get_level_values(1).isin(["pca_voxels", "pca_reconstructions"])
    assert (rows["n_heldout"] == np.where(no_test_volumes, 0, 40)).all()
    assert np.isnan(rows.loc[("sex", "pca_voxels"), "heldout_auc"])  # no test volumes were given
    assert set(suite.directions) == {"sex", "age_old", "age_group", "sex_size_controlled"}
    assert suite.directions["sex"].positive == "male" and suite.directions["age_group"].positive == "older"
    assert suite.directions["sex_size_controlled"].metadata["size_covariate"] == "etiv_mm3"
    assert all(np.isfinite(v) or np.isnan(v) for v in suite.flat_metrics().values())


def test_permutation_test_scores_the_same_repeated_cv_as_the_auc():
    """The p-value qualifies the AUC it is reported with: the permutation test's observed statistic is the CV
    point estimate itself (mean AUC over the same n_repeats x n_splits folds)."""
    z, y, _ = _logistic_cohort(120, 6, strength=1.0, seed=11)
    res = evaluate_probe(make_probe("binary", "latent", FAST), z, y, "binary", FAST)
    assert res.fold_metrics["auc"].shape == (FAST.n_repeats * FAST.n_splits,)
    assert res.permutation_score == pytest.approx(res.cv["auc"].value, abs=1e-12)
    assert res.cv["auc"].value == pytest.approx(res.fold_metrics["auc"].mean())
    group = np.digitize(z[:, 1] + 0.5 * z[:, 0], [-1, 0, 1])
    ordinal = evaluate_probe(make_probe("ordinal", "latent", FAST), z, group, "ordinal", FAST)
    assert ordinal.permutation_score == pytest.approx(ordinal.cv["spearman"].value, abs=1e-12)


def test_corrected_t_interval_formula():
    values = np.array([0.7, 0.8, 0.75, 0.65, 0.9, 0.72])
    est = corrected_t_interval(values, test_over_train=0.25, level=0.95)
    from scipy.stats import t

    half = t.ppf(0.975, 5) * np.sqrt((1 / 6 + 0.25) * values.var(ddof=1))
    assert (est.value, est.low, est.high) == pytest.approx((values.mean(), values.mean() - half, values.mean() + half))
    assert np.isnan(corrected_t_interval(np.array([0.7]), 0.25, 0.95).low)


def test_cv_interval_includes_refit_variance():
    """Across independent cohorts from one generative model, the CV AUC scatters around the expected AUC of a
    probe refitted on a fold's worth of subjects. The corrected-t interval is as wide as that scatter and covers
    the expected AUC (a bootstrap of subjects with the fold models fixed is narrower and misses it more often:
    measured 88% coverage, width 0.22 vs 0.31, with these settings)."""
    settings = ProbeSettings(n_splits=5, n_repeats=2, C=1.0, n_bootstrap=50, n_permutations=0)
    rng = np.random.default_rng(12)

    def cohort(n):
        z = rng.normal(size=(n, 10))
        y = (rng.random(n) < 1 / (1 + np.exp(-1.2 * z[:, 0]))).astype(np.int64)
        return z, y

    z_big, y_big = cohort(20000)
    expected = np.mean([roc_auc_score(y_big, make_probe("binary", "latent", settings).fit(*cohort(64))
                                      .decision_function(z_big)) for _ in range(60)])
    estimates, covered, widths = [], [], []
    for _ in range(40):
        auc = evaluate_probe(make_probe("binary", "latent", settings), *cohort(80), "binary", settings).cv["auc"]
        estimates.append(auc.value)
        covered.append(auc.contains(expected))
        widths.append(auc.high - auc.low)
    assert np.mean(covered) >= 0.85
    assert np.mean(widths) >= 0.8 * 2 * 1.96 * np.std(estimates)


def _size_cohort(n: int, seed: int):
    """Latents of a cohort where males have larger heads (global size g, +2 SD) and a larger local region
    (l, +1 SD) whose tissue adds to the native brain-mask volume, and whose size varies a lot between subjects.
    eTIV measures head size only. Returns latents (n, 8), subjects table, and the map latents -> (g, l, ...)."""
    rng = np.random.default_rng(seed)
    male = rng.permutation(np.repeat([0, 1], n // 2)).astype(float)
    g = rng.normal(0, 1, n) + 2.0 * male
    local = rng.normal(0, 1, n) + 1.0 * male
    scales = np.geomspace(0.5, 3, 8)
    basis = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    z = np.column_stack([g, local, rng.normal(0, 0.3, (n, 6))]) @ basis.T * scales
    table = pd.DataFrame({
        "sex": np.where(male == 1, "M", "F"), "age_group": rng.choice(["22-25", "26-30", "31-35", "36+"], n),
        "brain_mask_volume_mm3": 1.2e6 * np.exp(0.06 * (g + 2.0 * local)),  # holds the local tissue too
        "etiv_mm3": 1.5e6 * np.exp(0.06 * g + rng.normal(0, 0.005, n)),
    })
    return z, table, np.diag(1 / scales) @ basis  # z @ this = (g, local, noise...)


@pytest.mark.parametrize("seed", [0, 1])
def test_size_control_by_etiv_keeps_the_local_sign_that_brain_mask_volume_reverses(seed):
    """The issue's failure, reproduced: a local male enlargement that adds volume. Regressing out the native
    brain-mask volume makes the size-controlled sex direction *shrink* the local region (at fixed mask volume
    males have larger heads and so smaller local regions) and lean on head size; regressing out eTIV keeps
    head size fixed and grows the local region, as planted."""
    z, table, to_sources = _size_cohort(400, seed)
    settings = ProbeSettings(n_splits=5, n_repeats=2, C=1.0, n_bootstrap=100, n_permutations=0)
    moves = {}
    for cov in ("brain_mask_volume_mm3", "etiv_mm3"):
        suite = run_probe_suite(z, table, settings, targets=("sex",), size_covariate=cov, baselines=False)
        moves[cov] = suite.directions["sex_size_controlled"].vector @ to_sources  # change of (g, local, ...)
        assert suite.directions["sex_size_controlled"].metadata["size_covariate"] == cov
        controlled = next(r for r in suite.results if r.features == "latent_size_controlled")
        assert controlled.cv["auc"].value > 0.55  # it separates the sexes either way: the AUC alone cannot tell
    g_old, local_old = moves["brain_mask_volume_mm3"][:2]
    g_new, local_new = moves["etiv_mm3"][:2]
    assert local_old < -0.1 and g_old > 0.2  # reversed: smaller local region, larger head
    assert local_new > 0.3 and abs(g_new) < 0.1  # as planted, at fixed head size


def test_spline_size_control_removes_a_nonlinear_size_dependence():
    """Latents that follow head size non-linearly (a quadratic) and hold no sex information beyond it: a linear
    residualisation leaves size (hence sex) in them; the spline removes it."""
    rng = np.random.default_rng(13)
    n = 400
    male = rng.permutation(np.repeat([0, 1], n // 2))
    g = rng.normal(0, 1, n) + 2.0 * male
    z = np.column_stack([g**2, np.exp(g / 2), rng.normal(size=(n, 4))]) + rng.normal(0, 0.05, (n, 6))
    table = pd.DataFrame({"sex": np.where(male == 1, "M", "F"), "age_group": "22-25",
                          "brain_mask_volume_mm3": 1.2e6 * np.exp(0.06 * g), "etiv_mm3": 1.5e6 * np.exp(0.06 * g)})
    aucs = {}
    for kind in ("linear", "spline"):
        for fit in ("within", "pooled"):
            settings = ProbeSettings(n_splits=5, n_repeats=2, C=1.0, n_bootstrap=50, n_permutations=0,
                                     size_control=kind, size_control_fit=fit)
            suite = run_probe_suite(z, table, settings, targets=("sex",), baselines=False)
            aucs[kind, fit] = next(r for r in suite.results if r.features == "latent_size_controlled").cv["auc"]
    for fit in ("within", "pooled"):
        assert aucs["linear", fit].low > 0.6
        assert aucs["spline", fit].value < aucs["linear", fit].value - 0.1
    assert aucs["spline", "pooled"].contains(0.5)
    # Fitted within sex (the default), the spline's small misfit where the sexes' head sizes barely overlap
    # (2 SD apart here, latents nearly noise-free) stays in the residuals as a group offset: not quite 0.5.
    assert aucs["spline", "within"].value < 0.65
    with pytest.raises(ValueError, match="size_control"):
        ProbeSettings(size_control="cubic")


def test_planted_label_is_a_target_when_the_column_exists():
    table = pd.DataFrame({"sex": ["F", "M"] * 4, "age_group": ["22-25"] * 8})
    assert available_targets(table) == ("sex", "age_old", "age_group")
    planted = table.assign(planted=[0, 1, 1, 0, 0, 1, 1, 0])
    assert available_targets(planted)[-1] == "planted"
    np.testing.assert_array_equal(target_labels(planted, "planted"), [0, 1, 1, 0, 0, 1, 1, 0])
    with pytest.raises(ValueError, match="column 'planted' has values"):
        target_labels(planted.assign(planted=[0, 1, 2, 0, 0, 1, 1, 0]), "planted")
    rng = np.random.default_rng(14)
    n = 120
    label = rng.permutation(np.repeat([0, 1], n // 2))
    z = rng.normal(size=(n, 6))
    z[:, 2] += 1.5 * label
    subjects = pd.DataFrame({"sex": rng.choice(["F", "M"], n), "age_group": rng.choice(["22-25", "36+"], n),
                             "planted": label, "brain_mask_volume_mm3": 1.2e6, "etiv_mm3": 1.5e6 + rng.normal(0, 1e4, n)})
    settings = ProbeSettings(n_splits=3, n_repeats=1, C=1.0, n_bootstrap=50, n_permutations=0)
    suite = run_probe_suite(z, subjects, settings, targets=("planted",), size_control_targets=("planted",),
                            baselines=False)
    assert set(suite.directions) == {"planted", "planted_size_controlled"}
    assert suite.directions["planted"].positive == "planted"
    assert suite.results[0].cv["auc"].low > 0.7


def test_the_probe_scored_on_held_out_rows_is_the_one_returned_and_fitted_on_every_fitting_row():
    """The suite's directions come from ``result.fitted``: the probe fitted once on all fitting rows, the same
    one the held-out rows were scored with (no second fit of the same rows)."""
    z, y, _ = _logistic_cohort(80, 6, 2.0, seed=5)
    settings = FAST.replace(n_permutations=0)
    probe = make_probe("binary", "latent", settings)
    plain = evaluate_probe(probe, z[:60], y[:60], "binary", settings)
    assert plain.fitted is None  # nothing asked for it: no extra fit
    res = evaluate_probe(probe, z[:60], y[:60], "binary", settings, X_test=z[60:], y_test=y[60:])
    expected = make_probe("binary", "latent", settings).fit(z[:60], y[:60]).decision_function(z[60:])
    np.testing.assert_allclose(res.fitted.decision_function(z[60:]), expected)
    assert res.heldout["auc"].value == pytest.approx(M.auc(y[60:], expected))
    refit = evaluate_probe(probe, z[:60], y[:60], "binary", settings, refit=True)
    np.testing.assert_allclose(refit.fitted.decision_function(z[60:]), expected)
