"""The training configuration: a YAML file (checked against this schema, unknown keys rejected)
with command-line flags layered on top. The resolved result is saved beside every checkpoint.

A training YAML names the model by ``base_config`` (an inference YAML, relative to the repo or
absolute) and may override any part of it under ``model:``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gm.errors import ConfigError
from gm.inference import SAMPLERS
from gm.modules.lora import UNET_TARGET_GROUPS
from gm.optim import LR_SCHEDULERS
from gm.precision import PRECISIONS

REPO = Path(__file__).resolve().parents[1]


@dataclass
class LoraSection:
    rank: int = 4
    alpha: Optional[float] = None  # None: alpha = rank (scale 1), as diffusers/PEFT
    dropout: float = 0.0
    # groups of UNet layers (gm.modules.lora): attn (to_q/k/v/out.0 of both attentions), ff, proj
    unet_targets: List[str] = field(default_factory=lambda: ["attn"])
    train_text_encoder: bool = False
    # file format of every saved LoRA (gm.checkpoint.lora_formats): kohya (ComfyUI, A1111/Forge and
    # diffusers load it), diffusers (PEFT), gm (ours); the *_lora.ckpt beside it stays ours
    format: str = "kohya"
    # precision of the factors in that file (fp32, fp16 or bf16, as kohya's --save_precision);
    # the *_lora.ckpt stays fp32
    save_precision: str = "fp32"


@dataclass
class OptimSection:
    learning_rate: float = 1e-4
    text_encoder_lr: Optional[float] = 5e-6
    lr_scheduler: str = "constant"  # constant, constant_with_warmup, linear, cosine
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class DataSection:
    resolution: int = 1024
    center_crop: bool = False
    random_flip: bool = False
    repeats: int = 1
    batch_size: int = 1


@dataclass
class TrainSection:
    max_train_steps: int = 500
    gradient_accumulation_steps: int = 1
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    sample_batch_size: int = 4
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    mixed_precision: str = "fp32"  # fp32; fp16/bf16 on Ascend/GPU
    loss_scale: str = "dynamic"  # fp16 only: dynamic or static
    seed: int = 0
    save_ckpt_interval: int = 500
    max_num_ckpt: Optional[int] = None  # keep the newest N checkpoints; None keeps all
    # full training state (gm.train_state: LoRA, optimizer moments, loss scale, step) every N
    # optimizer steps and at the end, for --resume_from_checkpoint; None: every save_ckpt_interval
    checkpointing_steps: Optional[int] = None
    checkpoints_total_limit: Optional[int] = None  # keep the newest N states; None keeps all
    # stop after this many optimizer steps in a row with non-finite gradients (each one skipped)
    max_skipped_steps: int = 100
    # VAE moments and text conditioning computed once before the loop (gm.frozen_inputs); with
    # the text encoders trained, the latents only
    cache_latents: bool = True
    gradient_checkpointing: bool = False  # recompute ResBlock/transformer activations in backward
    # the fixed-noise instance loss before and after training (summary.json)
    probe_loss: bool = True


@dataclass
class SamplingSection:
    """Class-image generation and validation images (the shared sampler)."""

    sampler: str = "EulerEDMSampler"
    num_steps: int = 40
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    validation_prompt: Optional[str] = None
    validation_steps: int = 100
    num_validation_images: int = 2


@dataclass
class TrainingConfig:
    base_config: str = "configs/inference/sd_xl_base.yaml"
    model: Any = None
    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)


# LoRA file formats training writes (gm.checkpoint.lora_formats; the seed's layout holds no
# text-encoder LoRA, so it is an export: tools/convert_lora.py)
TRAINING_LORA_FORMATS = ("kohya", "diffusers", "gm")
LORA_SAVE_PRECISIONS = ("fp32", "fp16", "bf16")

# config keys that may change when a run is resumed (cadence of outputs, not the trained numbers)
RESUMABLE_CHANGES = ("train.save_ckpt_interval", "train.max_num_ckpt", "train.checkpointing_steps",
                     "train.checkpoints_total_limit", "train.max_skipped_steps", "train.probe_loss",
                     "sampling.validation_steps", "lora.format", "lora.save_precision")

# command-line flag -> config key (flags left unset keep the YAML value)
FLAG_KEYS = {
    "lora_rank": "lora.rank", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_unet_targets": "lora.unet_targets", "train_text_encoder": "lora.train_text_encoder",
    "lora_format": "lora.format", "save_precision": "lora.save_precision",
    "learning_rate": "optim.learning_rate", "text_encoder_lr": "optim.text_encoder_lr",
    "lr_scheduler": "optim.lr_scheduler", "lr_warmup_steps": "optim.lr_warmup_steps",
    "max_grad_norm": "optim.max_grad_norm",
    "resolution": "data.resolution", "center_crop": "data.center_crop", "random_flip": "data.random_flip",
    "train_batch_size": "data.batch_size", "repeats": "data.repeats",
    "max_train_steps": "train.max_train_steps", "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "prior_loss_weight": "train.prior_loss_weight", "num_class_images": "train.num_class_images",
    "sample_batch_size": "train.sample_batch_size", "snr_gamma": "train.snr_gamma",
    "noise_offset": "train.noise_offset", "mixed_precision": "train.mixed_precision", "seed": "train.seed",
    "save_ckpt_interval": "train.save_ckpt_interval", "max_num_ckpt": "train.max_num_ckpt",
    "checkpointing_steps": "train.checkpointing_steps", "checkpoints_total_limit": "train.checkpoints_total_limit",
    "max_skipped_steps": "train.max_skipped_steps",
    "cache_latents": "train.cache_latents", "gradient_checkpointing": "train.gradient_checkpointing",
    "probe_loss": "train.probe_loss",
    "validation_prompt": "sampling.validation_prompt", "validation_steps": "sampling.validation_steps",
    "num_validation_images": "sampling.num_validation_images", "sample_steps": "sampling.num_steps",
    "guidance_scale": "sampling.guidance_scale",
}


def _resolve_path(path: str, relative_to: Path) -> Path:
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    for root in (relative_to, REPO):
        if (root / candidate).is_file():
            return root / candidate
    return REPO / candidate


def load_training_config(path: str | os.PathLike, overrides: Optional[Mapping[str, Any]] = None) -> DictConfig:
    """YAML at ``path`` + ``overrides`` (flag name -> value; None = unset) -> the resolved config.

    Raises ConfigError naming the file/flag for unknown keys, wrong types and impossible values.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; see configs/training/ for the shipped ones")
    try:
        schema = OmegaConf.structured(TrainingConfig)
        user = OmegaConf.load(path)
        cfg = OmegaConf.merge(schema, user)
        for flag, value in (overrides or {}).items():
            if value is not None:
                OmegaConf.update(cfg, FLAG_KEYS[flag], value, merge=False)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"--config {path}: {' '.join(str(err).split())}") from None
    base = _resolve_path(cfg.base_config, path.parent)
    if not base.is_file():
        raise ConfigError(f"{path}: base_config {cfg.base_config} not found")
    model = OmegaConf.load(base).model
    if cfg.model is not None:
        model = OmegaConf.merge(model, cfg.model)
    if cfg.train.gradient_checkpointing:
        model = OmegaConf.merge(model, {"params": {"network_config": {"params": {"use_checkpoint": True}}}})
    cfg.model = model
    validate(cfg, path)
    return cfg


def validate(cfg: DictConfig, path: Path) -> None:
    """Impossible values, named by their command-line flag where one exists."""
    flag = {v: k for k, v in FLAG_KEYS.items()}

    def fail(key: str, value: Any, expected: str) -> None:
        name = f"--{flag[key]}" if key in flag else f"{path}: {key}"
        raise ConfigError(f"{name} {value}: {expected}")

    checks = [
        ("lora.rank", cfg.lora.rank >= 1, "must be >= 1"),
        ("lora.dropout", 0 <= cfg.lora.dropout < 1, "must be in [0, 1)"),
        ("optim.learning_rate", cfg.optim.learning_rate > 0, "must be > 0"),
        ("optim.lr_scheduler", cfg.optim.lr_scheduler in LR_SCHEDULERS, f"expected one of {', '.join(LR_SCHEDULERS)}"),
        ("optim.lr_warmup_steps", cfg.optim.lr_warmup_steps >= 0, "must be >= 0"),
        ("optim.max_grad_norm", cfg.optim.max_grad_norm >= 0, "must be >= 0 (0 disables clipping)"),
        ("data.resolution", cfg.data.resolution >= 8 and cfg.data.resolution % 8 == 0,
         "must be a positive multiple of 8"),
        ("data.batch_size", cfg.data.batch_size >= 1, "must be >= 1"),
        ("data.repeats", cfg.data.repeats >= 1, "must be >= 1"),
        ("train.max_train_steps", cfg.train.max_train_steps >= 1, "must be >= 1"),
        ("train.gradient_accumulation_steps", cfg.train.gradient_accumulation_steps >= 1, "must be >= 1"),
        ("train.prior_loss_weight", cfg.train.prior_loss_weight >= 0, "must be >= 0"),
        ("train.num_class_images", cfg.train.num_class_images >= 0, "must be >= 0"),
        ("train.sample_batch_size", cfg.train.sample_batch_size >= 1, "must be >= 1"),
        ("train.snr_gamma", cfg.train.snr_gamma is None or cfg.train.snr_gamma > 0, "must be > 0"),
        ("train.noise_offset", cfg.train.noise_offset >= 0, "must be >= 0"),
        ("train.mixed_precision", cfg.train.mixed_precision in PRECISIONS, f"expected one of {', '.join(PRECISIONS)}"),
        ("train.loss_scale", cfg.train.loss_scale in ("dynamic", "static"), "expected dynamic or static"),
        ("train.save_ckpt_interval", cfg.train.save_ckpt_interval >= 1, "must be >= 1"),
        ("train.max_num_ckpt", cfg.train.max_num_ckpt is None or cfg.train.max_num_ckpt >= 1, "must be >= 1"),
        ("train.checkpointing_steps", cfg.train.checkpointing_steps is None or cfg.train.checkpointing_steps >= 1,
         "must be >= 1"),
        ("train.checkpoints_total_limit",
         cfg.train.checkpoints_total_limit is None or cfg.train.checkpoints_total_limit >= 1, "must be >= 1"),
        ("train.max_skipped_steps", cfg.train.max_skipped_steps >= 1, "must be >= 1"),
        ("sampling.num_steps", cfg.sampling.num_steps >= 1, "must be >= 1"),
        ("sampling.validation_steps", cfg.sampling.validation_steps >= 1, "must be >= 1"),
        ("sampling.num_validation_images", cfg.sampling.num_validation_images >= 1, "must be >= 1"),
        ("sampling.sampler", cfg.sampling.sampler in SAMPLERS, f"expected one of {', '.join(sorted(SAMPLERS))}"),
        ("sampling.guidance_scale", cfg.sampling.guidance_scale >= 0, "must be >= 0"),
        ("train.seed", cfg.train.seed >= 0, "must be >= 0"),
        ("lora.alpha", cfg.lora.alpha is None or cfg.lora.alpha > 0, "must be > 0 (scale = alpha / rank)"),
        ("lora.unet_targets", bool(cfg.lora.unet_targets) and set(cfg.lora.unet_targets) <= set(UNET_TARGET_GROUPS),
         f"expected one or more of {', '.join(UNET_TARGET_GROUPS)}"),
        ("optim.text_encoder_lr", cfg.optim.text_encoder_lr is None or cfg.optim.text_encoder_lr > 0, "must be > 0"),
    ]
    # NaN and infinity pass every comparison above that they should fail, or poison the run later
    floats = ("lora.alpha", "lora.dropout", "optim.learning_rate", "optim.text_encoder_lr", "optim.max_grad_norm",
              "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.eps", "train.prior_loss_weight",
              "train.snr_gamma", "train.noise_offset", "sampling.guidance_scale")
    for key in floats:
        value = OmegaConf.select(cfg, key)
        if value is not None and not math.isfinite(value):
            fail(key, value, "must be a finite number")
    for key, ok, expected in checks:
        if not ok:
            fail(key, OmegaConf.select(cfg, key), expected)
    prompt = cfg.sampling.validation_prompt
    if prompt and not prompt.strip():  # '' turns validation off; spaces only are a mistake
        fail("sampling.validation_prompt", repr(prompt), "is blank; give a prompt, or '' for no validation images")
