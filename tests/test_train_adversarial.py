"""GAN and StyleGAN training through the shared loop, MLflow and the registry (tiny volumes)."""

from __future__ import annotations

import torch
from mlflow.tracking import MlflowClient

from brainlatent import registry
from brainlatent.train.runner import train_family


def test_gan_trains_registers_and_samples_by_alias(tiny_processed, tiny_params):
    out = train_family("gan", tiny_params)
    assert out.finished and out.model_version == "1"
    client = MlflowClient()
    run = client.get_run(out.run_id)
    for key in ("train_d_loss", "train_g_loss", "train_d_r1", "val_proxy"):
        assert key in run.data.metrics, key
    arts = [a.path for a in client.list_artifacts(out.run_id, "volumes/epoch_002/samples")]
    assert any(a.endswith("montage.png") for a in arts)
    gan = registry.load_model("models:/brainlatent-gan@candidate").model
    vols = gan.sample(3, generator=torch.Generator().manual_seed(0))
    assert vols.shape == (3, 1, 16, 16, 16) and 0 <= vols.min() and vols.max() <= 1


def test_stylegan_grows_progressively_and_logs_mixing_and_truncation(tiny_processed, tiny_params):
    out = train_family("stylegan", tiny_params)
    assert out.finished
    client = MlflowClient()
    levels = [m.value for m in client.get_metric_history(out.run_id, "resolution_level")]
    assert levels == [0.0, 1.0, 2.0]  # one epoch per level, 3 levels for 16^3
    alphas = [m.value for m in client.get_metric_history(out.run_id, "alpha")]
    assert alphas[0] == 1.0 and alphas[1] == 0.0  # a new level starts faded out
    final = "volumes/epoch_003"
    kinds = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(out.run_id, final)}
    assert {"samples", "style_mixing", "truncation_sweep"} <= kinds
    model = registry.load_model("models:/brainlatent-stylegan@candidate").model
    w = model.mapping(torch.randn(2, model.z_dim))
    assert model.decode(w).shape == (2, 1, 16, 16, 16)


import dataclasses

import pytest

from brainlatent.train.runner import make_task


@pytest.mark.parametrize("family", ["ae", "vae", "gan", "stylegan"])
def test_bf16_autocast_training_steps_are_finite(family, tiny_params):
    """train.bf16: every family's step (R1 step included) runs under bf16 autocast on CPU with finite losses."""
    params = dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, bf16=True))
    task = make_task(family, params, (16, 16, 16), torch.device("cpu"))
    task.steps_per_epoch = 4
    task.on_epoch_start(0)
    x = task.prepare_batch(torch.rand(4, 1, 16, 16, 16))
    for step in range(2):
        losses = task.train_step(x, 0, step)
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in losses.values()), losses
