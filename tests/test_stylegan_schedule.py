"""StyleGAN's progressive-growing schedule must reach and train the full resolution, in training and in every
tuning trial (issue 16 item 4): refused by name when it cannot; tuning trials compress it into tune.epochs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny_params_dict

from brainlatent.config import ConfigError, StyleGANConfig, params_from_dict
from brainlatent.train.adversarial import StyleGANTask
from brainlatent.tuning import check_schedules, resolve_tuned, trial_family_config


def test_a_schedule_that_cannot_reach_the_last_level_is_refused_naming_the_keys():
    # Levels start at 0, 3, 6: 6 epochs never enter the last level, 8 end inside its fade-in.
    for epochs in (5, 6, 8):
        with pytest.raises(ValueError, match=r"epochs: .*n_levels = 3.*epochs_per_level = 3.*need >= 9"):
            StyleGANConfig(n_levels=3, epochs_per_level=3, epochs=epochs)
    assert StyleGANConfig(n_levels=3, epochs_per_level=3, epochs=9).epochs == 9
    raw = tiny_params_dict(stylegan={"n_levels": 3, "epochs": 2, "epochs_per_level": 1})
    with pytest.raises(ConfigError, match=r"stylegan.*2 epochs cannot train StyleGAN's full resolution"):
        params_from_dict(raw)


def test_null_n_levels_is_checked_against_data_shape_by_train_and_tune():
    """n_levels null: the levels follow data.shape (24 x 32 x 24 -> 3), known to train and tune only."""
    params = params_from_dict(tiny_params_dict(data={"shape": [24, 32, 24]}, stylegan={"epochs": 5, "epochs_per_level": 3}))
    with pytest.raises(ValueError, match=r"stylegan.epochs: .*null: the default for data.shape \[24, 32, 24\]"):
        check_schedules(params, "stylegan")
    check_schedules(dataclasses.replace(params, stylegan=dataclasses.replace(params.stylegan, epochs=9)), "stylegan")
    check_schedules(params, "gan")  # other families have no schedule


def test_tuning_trials_compress_the_schedule_and_reach_the_last_level_at_full_alpha():
    """tune.epochs = 1 with the default schedule (3 epochs per level, 20 epochs): a trial spends 0.15 epoch per
    level and ends at the last level, faded in, like the training it stands for (not on the coarsest level)."""
    params = params_from_dict(tiny_params_dict(data={"shape": [24, 32, 24]}, tune={"epochs": 1},
                                               stylegan={"epochs": 20, "epochs_per_level": 3}))
    trial = trial_family_config(params.stylegan, params.tune.epochs, {"lr_g": 1e-3})
    assert (trial.epochs, trial.epochs_per_level, trial.lr_g) == (1, pytest.approx(0.15), 1e-3)
    task = StyleGANTask("stylegan", trial, (24, 32, 24), torch.device("cpu"))
    assert task.model.n_levels == 3
    assert task.schedule(0.0) == (0, 1.0)
    assert task.schedule(0.99) == (2, 1.0)  # the end of the trial: the last level, fully faded in
    level, alpha = task.schedule(0.31)
    assert level == 2 and alpha < 1.0  # fading in the last level
    assert trial_family_config(params.ae, 1).epochs == 1  # other families: only the epochs change


def test_tuned_values_that_break_the_schedule_are_refused_before_training(project):
    raw = tiny_params_dict(data={"shape": [24, 32, 24]}, stylegan={"epochs": 20, "epochs_per_level": 3})
    raw["tune"]["space"] = {"stylegan": {"epochs_per_level": {"low": 1.0, "high": 10.0}}}
    params = params_from_dict(raw)
    (project / "tuned").mkdir()
    tuned = {"family": "stylegan", "params": {"epochs_per_level": 8.0}, "study": "s", "skipped": False}
    (project / "tuned" / "stylegan.json").write_text(json.dumps(tuned))
    with pytest.raises(ValueError, match=r"stylegan.epochs \(training, from tuned/stylegan.json.*need >= 24"):
        resolve_tuned(params, "stylegan", root=project)
    tuned["params"]["epochs_per_level"] = 5.0
    (project / "tuned" / "stylegan.json").write_text(json.dumps(tuned))
    assert resolve_tuned(params, "stylegan", root=project).params.stylegan.epochs_per_level == 5.0
