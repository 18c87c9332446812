"""Training configuration: YAML + flags, schema checks, errors that name the flag or key."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gm.errors import ConfigError
from gm.train_config import load_training_config

TINY = "configs/training/sd_xl_tiny_dreambooth_lora.yaml"

REPO = Path(__file__).resolve().parents[2]


def test_flags_override_yaml_and_model_comes_from_base_config(tmp_path):
    cfg = load_training_config(TINY, {"learning_rate": 2e-3, "lora_rank": 8, "snr_gamma": 5.0, "seed": None})
    assert cfg.optim.learning_rate == 2e-3 and cfg.lora.rank == 8 and cfg.train.snr_gamma == 5.0
    assert cfg.train.seed == 0  # unset flag keeps the YAML value
    unet = cfg.model.params.network_config.params
    assert unet.model_channels == 32 and unet.zero_init_residual_outputs is False
    full = load_training_config("configs/training/sd_xl_base_finetune_dreambooth_lora_910b.yaml")
    assert full.model.params.network_config.params.transformer_depth == [1, 2, 10]


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in REPO.glob("configs/training/*.yaml")))
def test_every_shipped_training_config_loads_and_names_a_model(path):
    cfg = load_training_config(path)
    assert cfg.model.target == "gm.models.diffusion.DiffusionEngine"
    if "textencoder" in path:  # the reference's name for UNet + text-encoder LoRA
        assert cfg.lora.train_text_encoder is True


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



def test_the_schema_generates_every_config_flag_and_nothing_drifts():
    import train_dreambooth
    from gm.train_config import FLAG_KEYS, SETTINGS

    parser = train_dreambooth.build_parser()
    options = {a.dest: a for a in parser._actions}
    flagged = [s for s in SETTINGS if s.flag]
    assert len(flagged) == len(FLAG_KEYS) >= 30
    for s in flagged:  # each flag exists, says which key it sets, and is unset by default
        assert options[s.flag].default is None and s.key in options[s.flag].help, s.key
    # every other flag of the script is about the run, not the training config
    run_flags = {"help", "config", "weight", "instance_data_path", "instance_prompt", "class_data_path",
                 "class_prompt", "save_path", "ms_mode", "device_target", "is_parallel", "compile_cache", "input_cache",
                 "compile_helper", "compile_only", "pynative_jit",
                 "resume_from_checkpoint", "overwrite", "init_lora"}
    assert set(options) - set(FLAG_KEYS) == run_flags
    args = train_dreambooth.parse_args(["--train_data_repeat", "3", "--center_crop", "--random_flip", "false",
                                        "--lora_unet_targets", "attn", "ff", "--snr_gamma", "5"])
    cfg = load_training_config(TINY, {k: getattr(args, k) for k in FLAG_KEYS})
    assert cfg.data.repeats == 3 and cfg.data.center_crop is True and cfg.data.random_flip is False
    assert list(cfg.lora.unet_targets) == ["attn", "ff"] and cfg.train.snr_gamma == 5.0


@pytest.mark.parametrize("words", [["attn,ff,proj"], ["attn,", "ff", "proj"], ["attn", "ff,proj"]])
def test_a_list_flag_takes_commas_as_well_as_spaces(words):
    import train_dreambooth
    from gm.train_config import FLAG_KEYS

    args = train_dreambooth.parse_args(["--lora_unet_targets", *words])
    cfg = load_training_config(TINY, {k: getattr(args, k) for k in FLAG_KEYS})
    assert list(cfg.lora.unet_targets) == ["attn", "ff", "proj"]


@pytest.mark.parametrize("section,key,value,message", [
    ("optim", "beta2", 1.5, "optim.beta2 1.5: must be in \\[0, 1\\)"),
    ("optim", "eps", 0.0, "optim.eps 0.0: must be > 0"),
    ("train", "loss_scale", "auto", "train.loss_scale auto: expected one of dynamic, static"),
    ("lora", "format", "onnx", "lora.format onnx: expected one of kohya"),
])
def test_yaml_only_keys_are_checked_by_the_same_schema(tmp_path, section, key, value, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(OmegaConf.to_yaml({"base_config": "configs/inference/sd_xl_tiny.yaml", section: {key: value}}))
    with pytest.raises(ConfigError, match=f"bad.yaml: {message}"):
        load_training_config(bad)


def test_memory_hungry_switches_only_for_models_small_beside_the_memory():
    from gm.memory import available_memory, fp32_weight_bytes, is_small_model
    from gm.models.diffusion import build_engine
    from gm.modules.pynative_jit import use_pynative_jit

    tiny = build_engine(load_training_config(TINY).model, allocate=False)
    full = build_engine(load_training_config("configs/training/sd_xl_base_finetune_dreambooth_lora_910b.yaml").model,
                        allocate=False)
    machine = 24 * 2**30  # this machine's RAM
    assert is_small_model(fp32_weight_bytes(tiny), machine)
    # 3.5 B fp32 parameters (14 GB): a second copy in the compile helper would not fit beside the
    # run, nor PyNative's compiled levels (measured: beyond 24 GB)
    assert not is_small_model(fp32_weight_bytes(full), machine)
    assert is_small_model(fp32_weight_bytes(full), None)  # memory unknown: allowed
    assert available_memory() > 0  # /proc/meminfo on these machines
    assert use_pynative_jit("auto", 1, "CPU", tiny) == "levels"
    assert use_pynative_jit("auto", 1, "CPU", full) == "shared" and use_pynative_jit("on", 1, "CPU", full) == "levels"
    assert use_pynative_jit("shared", 1, "CPU", tiny) == "shared"
    assert use_pynative_jit("auto", 1, "Ascend", tiny) == "off"  # measured on the CPU only
    assert use_pynative_jit("on", 0, "CPU", tiny) == use_pynative_jit("off", 1, "CPU", tiny) == "off"
