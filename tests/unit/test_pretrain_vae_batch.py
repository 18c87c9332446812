"""The pretraining tool's VAE batches (tools/pretrain_toy_world.py): crops and the posterior's noise,
which grows from 0 over ``vae.noise_warmup_steps``; a run saved before that setting existed resumes."""

import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import pretrain_toy_world as tool  # noqa: E402

from gm.errors import ConfigError  # noqa: E402


def _cfg(warmup=None):
    vae = {"batch_size": 3, "steps": 10, "learning_rate": 1e-3}
    if warmup is not None:
        vae["noise_warmup_steps"] = warmup
    return OmegaConf.create({"data": {"seed": 0}, "vae": vae})


PIXELS = np.random.default_rng(0).uniform(-1, 1, (5, 3, 16, 16)).astype(np.float32)


def test_vae_noise_grows_linearly_over_its_warmup_then_is_the_unit_draw():
    for step in (0, 2, 4, 7):
        crops, plain = tool.vae_batch(PIXELS, _cfg(), step, 8, 4)
        warm_crops, warm = tool.vae_batch(PIXELS, _cfg(4), step, 8, 4)
        assert crops.shape == (3, 3, 8, 8) and plain.shape == (3, 4, 1, 1)
        np.testing.assert_array_equal(warm_crops, crops)  # the same photos and corners either way
        np.testing.assert_array_equal(warm, plain * min(1.0, step / 4))
    assert np.std(tool.vae_batch(PIXELS, _cfg(), 1, 16, 4)[1]) > 0.3  # a real unit-variance draw


def test_a_vae_stage_saved_before_the_noise_warmup_setting_resumes_only_at_its_default():
    saved = OmegaConf.to_yaml(_cfg())
    tool.check_same_stage_config("vae", Path("state"), saved, OmegaConf.to_yaml(_cfg(0)))
    with pytest.raises(ConfigError, match="noise_warmup_steps"):
        tool.check_same_stage_config("vae", Path("state"), saved, OmegaConf.to_yaml(_cfg(4)))
