"""Training configuration: YAML + flags, schema checks, errors that name the flag or key."""

import pytest
from omegaconf import OmegaConf

from gm.errors import ConfigError
from gm.train_config import load_training_config

TINY = "configs/training/sd_xl_tiny_dreambooth_lora.yaml"


def test_flags_override_yaml_and_model_comes_from_base_config(tmp_path):
    cfg = load_training_config(TINY, {"learning_rate": 2e-3, "lora_rank": 8, "snr_gamma": 5.0, "seed": None})
    assert cfg.optim.learning_rate == 2e-3 and cfg.lora.rank == 8 and cfg.train.snr_gamma == 5.0
    assert cfg.train.seed == 0  # unset flag keeps the YAML value
    unet = cfg.model.params.network_config.params
    assert unet.model_channels == 32 and unet.zero_init_residual_outputs is False
    full = load_training_config("configs/training/sd_xl_base_finetune_dreambooth_lora_910b.yaml")
    assert full.model.params.network_config.params.transformer_depth == [1, 2, 10]


def test_unknown_keys_and_wrong_types_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(OmegaConf.to_yaml({"base_config": "configs/inference/sd_xl_tiny.yaml", "optim": {"lr": 1.0}}))
    with pytest.raises(ConfigError, match="bad.yaml.*lr"):
        load_training_config(bad)
    bad.write_text(OmegaConf.to_yaml({"base_config": "configs/inference/sd_xl_tiny.yaml",
                                      "train": {"max_train_steps": "many"}}))
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_training_config(bad)


@pytest.mark.parametrize("flag,value,message", [
    ("lora_rank", 0, "--lora_rank 0: must be >= 1"),
    ("lr_scheduler", "exponential", "--lr_scheduler exponential: expected one of"),
    ("resolution", 100, "--resolution 100: must be a positive multiple of 8"),
    ("mixed_precision", "fp8", "--mixed_precision fp8"),
    ("max_num_ckpt", 0, "--max_num_ckpt 0"),
    ("seed", -1, "--seed -1: must be >= 0"),
    ("learning_rate", float("inf"), "--learning_rate inf: must be a finite number"),
    ("learning_rate", float("nan"), "--learning_rate nan: must be a finite number"),
    ("guidance_scale", -1.0, "--guidance_scale -1.0: must be >= 0"),
    ("lora_alpha", 0.0, "--lora_alpha 0.0: must be > 0"),
    ("lora_unet_targets", ["attn", "mlp"], "--lora_unet_targets .*expected one or more of attn, ff, proj"),
    ("validation_prompt", "   ", "--validation_prompt '   ': is blank"),
    ("checkpointing_steps", 0, "--checkpointing_steps 0: must be >= 1"),
    ("max_skipped_steps", 0, "--max_skipped_steps 0: must be >= 1"),
])
def test_impossible_flag_values_name_the_flag(flag, value, message):
    with pytest.raises(ConfigError, match=message):
        load_training_config(TINY, {flag: value})


def test_unknown_sampler_in_the_yaml_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(OmegaConf.to_yaml({"base_config": "configs/inference/sd_xl_tiny.yaml",
                                      "sampling": {"sampler": "Heun"}}))
    with pytest.raises(ConfigError, match="bad.yaml: sampling.sampler Heun: expected one of .*EulerEDMSampler"):
        load_training_config(bad)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="--config nowhere.yaml: no such file"):
        load_training_config("nowhere.yaml")
