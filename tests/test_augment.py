"""Differentiable augmentation for the discriminator (train/augment.py)."""

from __future__ import annotations

import pytest
import torch

from brainlatent.config import ConfigError, params_from_dict
from brainlatent.train.augment import augment, cutout, gain, parse_policy, translation


def _brain(batch: int = 3) -> torch.Tensor:
    """A bright block inside a zero border wider than any shift (1/8 of each axis)."""
    x = torch.zeros(batch, 1, 16, 24, 16)
    x[:, :, 4:12, 6:18, 4:12] = torch.rand(batch, 1, 8, 12, 8) + 0.5
    return x


def test_policy_names_are_checked():
    assert parse_policy("") == () and parse_policy("none") == ()
    assert parse_policy("gain, translation") == ("gain", "translation")
    with pytest.raises(ValueError, match="flip"):
        parse_policy("gain,flip")


def test_the_config_refuses_an_unknown_transform(tmp_path):
    with pytest.raises(ConfigError, match="augment"):
        params_from_dict({"gan": {"augment": "translation,rotate"}})


def test_gain_scales_each_volume_and_keeps_the_background_zero():
    torch.manual_seed(0)
    x = _brain()
    y = gain(x)
    ratio = y.sum((1, 2, 3, 4)) / x.sum((1, 2, 3, 4))
    assert ((ratio > 0.8) & (ratio < 1.23)).all() and ratio.std() > 0  # exp(+-0.2), drawn per volume
    assert (y[x == 0] == 0).all()


def test_translation_moves_volumes_by_whole_voxels_without_losing_them():
    torch.manual_seed(0)
    x = _brain(8)
    y = translation(x)
    assert y.shape == x.shape
    # The border is wider than the largest shift: every voxel survives, only its position changes.
    assert torch.allclose(y.sum((1, 2, 3, 4)), x.sum((1, 2, 3, 4)))
    centres = [(v[0] > 0).nonzero().float().mean(0) for v in y]
    assert len({tuple(c.tolist()) for c in centres}) > 1  # shifts are drawn per volume


def test_cutout_zeroes_one_box_of_half_each_axis():
    torch.manual_seed(0)
    x = torch.ones(4, 1, 16, 24, 16)
    y = cutout(x)
    zeroed = (y == 0).sum((1, 2, 3, 4))
    assert (zeroed > 0).all() and (zeroed <= 8 * 12 * 8).all()


def test_gradients_reach_the_input_and_runs_repeat_with_the_seed():
    x = _brain().requires_grad_(True)
    torch.manual_seed(3)
    y = augment(x, parse_policy("gain,translation,cutout"))
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.manual_seed(3)
    assert torch.equal(augment(x.detach(), parse_policy("gain,translation,cutout")), y.detach())
