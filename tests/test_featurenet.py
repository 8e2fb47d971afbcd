"""FeatureNet trains on a learnable toy problem, is deterministic, and MedicalNet weights load faithfully."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainlatent.metrics.generative import fid
from brainlatent.models.featurenet import (
    FeatureExtractor,
    FeatureNet,
    MedicalNetFeatures,
    encode_age_group,
    encode_sex,
    evaluate_featurenet,
    extract_features,
    fit_featurenet,
    load_featurenet,
    load_medicalnet,
    medicalnet_resnet,
    predict_attributes,
    save_featurenet,
)

SHAPE = (16, 16, 16)


@pytest.fixture(autouse=True)
def _few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ellipsoids(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Toy cohort: males are 12% larger ellipsoids (+-4% jitter); a dark core grows with the age group."""
    rng = np.random.default_rng(seed)
    sex = rng.integers(0, 2, n)
    age = rng.integers(0, 4, n)
    grid = np.stack(np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in SHAPE], indexing="ij"))
    vols = []
    for s, a in zip(sex, age):
        radii = np.array([4.0, 5.0, 4.0]) * (1.12 if s else 1.0) * rng.uniform(0.96, 1.04)
        rel = grid - rng.uniform(-0.7, 0.7, 3)[:, None, None, None]
        inside = ((rel / radii[:, None, None, None]) ** 2).sum(0) < 1
        core = (rel**2).sum(0) < (1.2 + 0.6 * a) ** 2
        vols.append(np.clip(0.8 * inside - 0.5 * core + rng.normal(0, 0.05, SHAPE), 0, 1))
    return (
        torch.tensor(np.stack(vols)[:, None], dtype=torch.float32),
        torch.tensor(sex, dtype=torch.float32),
        torch.tensor(age),
    )


TINY = dict(channels=(8, 16, 32), feature_dim=16, batch_size=8, lr=3e-3)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    x, s, a = ellipsoids(64, 0)
    xv, sv, av = ellipsoids(32, 1)
    model, history = fit_featurenet(x, s, a, xv, sv, av, epochs=20, seed=0, **TINY)
    return model, history


def test_featurenet_learns_the_size_difference(trained):
    model, history = trained
    xt, st, at = ellipsoids(32, 2)
    result = evaluate_featurenet(model, xt, st, at)
    assert result["sex_auc"] > 0.85, result
    assert result["age_acc"] > 0.4, result  # chance: 0.25
    assert len(history) == 20 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert {"val_loss", "val_sex_auc", "val_age_acc"} <= set(history[0])
    # The returned weights are those of the best validation epoch.
    xv, sv, av = ellipsoids(32, 1)
    best = min(row["val_loss"] for row in history)
    assert evaluate_featurenet(model, xv, sv, av)["loss"] == pytest.approx(best, rel=1e-5)


def test_features_shape_and_feature_extractor_interface(trained):
    model, _ = trained
    x, _, _ = ellipsoids(5, 3)
    assert isinstance(model, FeatureExtractor)
    assert model.features(x).shape == (5, 16)
    sex_logit, age_logits = model(x)
    assert sex_logit.shape == (5,) and age_logits.shape == (5, 4)
    feats = extract_features(model, x.numpy()[:, 0].astype(np.float16), batch_size=2)  # volumes.npy layout
    assert feats.shape == (5, 16) and feats.dtype == np.float64
    np.testing.assert_allclose(feats, extract_features(model, x, batch_size=5), atol=1e-2)  # float16 input
    pred = predict_attributes(model, x)
    assert pred.p_male.shape == (5,) and np.allclose(pred.age_probs.sum(1), 1.0)


def test_features_separate_the_sexes_in_fid(trained):
    model, _ = trained
    x, s, _ = ellipsoids(48, 4)
    f = extract_features(model, x)
    males, females = f[s.numpy() == 1], f[s.numpy() == 0]
    half = len(females) // 2
    within = fid(females[:half], females[half:])["fid"]
    between = fid(males, females)["fid"]
    assert between > within


def test_fit_is_deterministic_given_the_seed():
    x, s, a = ellipsoids(16, 5)
    kw = dict(channels=(4, 8), feature_dim=8, epochs=2, batch_size=8)
    m1, h1 = fit_featurenet(x, s, a, seed=3, **kw)
    m2, h2 = fit_featurenet(x, s, a, seed=3, **kw)
    m3, _ = fit_featurenet(x, s, a, seed=4, **kw)
    assert h1 == h2
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert not torch.equal(m1.features(x), m3.features(x))


def test_save_and_load_roundtrip(tmp_path, trained):
    model, _ = trained
    save_featurenet(model, tmp_path / "featurenet.pt")
    loaded = load_featurenet(tmp_path / "featurenet.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x, _, _ = ellipsoids(3, 6)
    with torch.no_grad():
        # Same weights; the memory layout (not saved) may pick another conv kernel: equal to float rounding.
        torch.testing.assert_close(loaded.features(x), model.features(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not found"):
        load_featurenet(tmp_path / "missing.pt")


def test_input_validation():
    model = FeatureNet(SHAPE, channels=(4, 8), feature_dim=8)
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16, 16\)"):
        model.features(torch.zeros(1, 1, 16, 16, 8))
    with pytest.raises(ValueError, match="too small"):
        FeatureNet((4, 4, 4), channels=(4, 8, 16, 32))
    x, s, a = ellipsoids(4, 7)
    with pytest.raises(ValueError, match="age_group_idx"):
        fit_featurenet(x, s, a + 4, epochs=1)
    with pytest.raises(ValueError, match="4 volumes but 3"):
        fit_featurenet(x, s[:3], a, epochs=1)
    assert encode_sex(["F", "M"]).tolist() == [0.0, 1.0]
    assert encode_age_group(["22-25", "36+"]).tolist() == [0, 3]
    with pytest.raises(ValueError, match="unknown"):
        encode_sex(["female"])


# ------------------------------------------------------------------------------------------ MedicalNet
@pytest.mark.parametrize("depth", [10, 18])
def test_load_medicalnet_reproduces_the_saved_network(tmp_path, depth):
    torch.manual_seed(depth)
    original = medicalnet_resnet(depth).eval()
    # Saved as MedicalNet does: DataParallel "module." prefix inside {"state_dict": ...}, plus a seg head.
    state = {f"module.{k}": v for k, v in original.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(2, 2)
    path = tmp_path / f"resnet_{depth}.pth"
    torch.save({"state_dict": state}, path)

    extractor = load_medicalnet(path, depth=depth, normalize=False)
    assert isinstance(extractor, FeatureExtractor) and isinstance(extractor, MedicalNetFeatures)
    x = torch.rand(2, 1, *SHAPE)
    with torch.no_grad():
        feats = extractor.features(x)
        assert feats.shape == (2, 512)
        assert torch.equal(feats, original(x))
    assert extract_features(load_medicalnet(path, depth=depth), x).shape == (2, 512)


def test_medicalnet_layout_is_dilated_like_tencent_medicalnet():
    net = medicalnet_resnet(10).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        h = net.maxpool(net.act(net.bn1(net.conv1(x))))  # stride 2 + max-pool: 8^3
        h2 = net.layer2(net.layer1(h))  # 4^3
        h4 = net.layer4(net.layer3(h2))
    assert net.conv1.kernel_size == (7, 7, 7) and net.conv1.stride == (2, 2, 2)
    assert h2.shape[2:] == h4.shape[2:] == (4, 4, 4)
    assert net.layer4[0].conv1.dilation == (4, 4, 4)


def test_load_medicalnet_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_medicalnet(tmp_path / "nope.pth")
    state = medicalnet_resnet(10).state_dict()
    ok = tmp_path / "resnet_10.pth"
    torch.save(state, ok)  # a bare state dict is accepted
    assert isinstance(load_medicalnet(ok, depth=10), MedicalNetFeatures)
    with pytest.raises(ValueError, match="keys do not match a MedicalNet ResNet-18"):
        load_medicalnet(ok, depth=18)  # ResNet-10 weights: shortcut B convs, one block per layer
    del state["layer1.0.conv1.weight"]
    truncated = tmp_path / "truncated.pth"
    torch.save(state, truncated)
    with pytest.raises(ValueError, match=r"missing \['layer1.0.conv1.weight'\]"):
        load_medicalnet(truncated, depth=10)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable"):
        load_medicalnet(garbage)
    with pytest.raises(ValueError, match="depth"):
        medicalnet_resnet(34)


def test_medicalnet_normalisation_zscores_the_foreground():
    x = torch.zeros(1, 1, 8, 8, 8)
    x[..., 2:6, 2:6, 2:6] = torch.rand(1, 1, 4, 4, 4) * 0.5 + 0.25
    z = MedicalNetFeatures.zscore_foreground(x)
    fg = z[x > 0]
    assert fg.mean().abs() < 1e-5 and (fg.std(unbiased=False) - 1).abs() < 1e-4
    assert torch.all(z[x == 0] == 0)
