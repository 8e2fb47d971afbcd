"""GAN and StyleGAN training through the shared loop, MLflow and the registry (tiny volumes)."""

from __future__ import annotations

import collections
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from brainlatent import registry
from brainlatent.train.runner import make_task, train_family


def test_gan_trains_registers_and_samples_by_alias(tiny_processed, tiny_params):
    out = train_family("gan", tiny_params)
    assert out.finished and out.model_version == "1"
    client = MlflowClient()
    run = client.get_run(out.run_id)
    for key in ("train/d_loss", "train/g_loss", "train/d_r1", "val/proxy"):
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
    levels = [m.value for m in client.get_metric_history(out.run_id, "schedule/resolution_level")]
    assert levels == [0.0, 1.0, 2.0]  # one epoch per level, 3 levels for 16^3
    alphas = [m.value for m in client.get_metric_history(out.run_id, "schedule/alpha")]
    assert alphas[0] == 1.0 and alphas[1] == 0.0  # a new level starts faded out
    final = "volumes/epoch_003"
    kinds = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(out.run_id, final)}
    assert {"samples", "style_mixing", "truncation_sweep"} <= kinds
    model = registry.load_model("models:/brainlatent-stylegan@candidate").model
    w = model.mapping(torch.randn(2, model.z_dim))
    assert model.decode(w).shape == (2, 1, 16, 16, 16)




@pytest.mark.parametrize("family", ["gan", "stylegan"])
def test_validation_samples_do_not_depend_on_the_global_random_stream(family, tiny_params):
    """The validation proxy compares epochs and tuning trials on the same draws: latents and StyleGAN's noise
    come from the proxy's own seeded generator, whatever the training batches consumed."""
    from brainlatent.models.stylegan import NoiseInjection

    task = make_task(family, tiny_params, (16, 16, 16), torch.device("cpu"))
    task.on_epoch_start(0)
    for module in task.model.modules():  # noise strengths start at 0: make the noise matter
        if isinstance(module, NoiseInjection):
            module.weight.data.fill_(1.0)
    torch.manual_seed(1)
    first = task.proxy_samples(4)
    torch.manual_seed(2)
    assert torch.equal(task.proxy_samples(4), first)


@pytest.mark.parametrize("family", ["gan", "stylegan"])
def test_augmented_steps_train(family, tiny_params):
    """gan/stylegan.augment: the discriminator sees augmented reals and fakes; both phases stay finite."""
    cfg = dataclasses.replace(tiny_params.family(family), augment="gain,translation,cutout")
    _two_steps_are_finite(family, dataclasses.replace(tiny_params, **{family: cfg}))


@pytest.mark.parametrize("family", ["ae", "vae", "gan", "stylegan"])
def test_bf16_autocast_training_steps_are_finite(family, tiny_params):
    """train.bf16: every family's step (R1 step included) runs under bf16 autocast on CPU with finite losses."""
    _two_steps_are_finite(family, dataclasses.replace(tiny_params, train=dataclasses.replace(tiny_params.train, bf16=True)))


def _two_steps_are_finite(family, params):
    """Two training steps of ``family`` (the second is the R1 step of the adversarial families) on random
    16^3 volumes: every loss finite."""
    task = make_task(family, params, (16, 16, 16), torch.device("cpu"))
    task.steps_per_epoch = 4
    task.on_epoch_start(0)
    x = task.prepare_batch(torch.rand(4, 1, 16, 16, 16))
    for step in range(2):
        losses = task.train_step(x, 0, step)
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in losses.values()), losses


@pytest.mark.parametrize("family", ["gan", "stylegan"])
def test_each_phase_computes_only_the_gradients_it_uses(family, tiny_params):
    """The D step's fake batch is made without a generator graph; the G step backpropagates through D to
    reach G without computing D's weight gradients (D's next step would discard them)."""
    params = dataclasses.replace(tiny_params, **{family: dataclasses.replace(tiny_params.family(family), n_critic=1)})
    task = make_task(family, params, (16, 16, 16), torch.device("cpu"))
    task.steps_per_epoch = 4
    task.on_epoch_start(0)
    generator_grad_mode = []
    task.model.generator.register_forward_pre_hook(lambda m, a: generator_grad_mode.append(torch.is_grad_enabled()))
    d_grads = collections.Counter()
    for name, p in task.model.discriminator.named_parameters():
        p.register_hook(lambda g, name=name: d_grads.update([name]))
    task.train_step(task.prepare_batch(torch.rand(4, 1, 16, 16, 16)), 0, 1)  # D step, then G step
    assert generator_grad_mode == [False, True]
    assert d_grads and max(d_grads.values()) == 1


def test_adversarial_step_benchmark_runs_its_quick_smoke_run():
    """benchmarks/bench_adversarial_steps.py --quick: the seed comparison and the phase table, tiny sizes."""
    script = Path(__file__).parents[1] / "benchmarks" / "bench_adversarial_steps.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1"], capture_output=True, text=True,
                          cwd=script.parents[1], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r.split("|")[2].strip() for r in rows[:3]] == ["G", "D", "R1"]
    assert {r.split("|")[1].strip() for r in rows[3:]} == {"stylegan", "gan"}
