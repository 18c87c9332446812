"""The training configuration: a YAML file (checked against this schema, unknown keys rejected)
with command-line flags layered on top. The resolved result is saved beside every checkpoint.

A training YAML names the model by ``base_config`` (an inference YAML, relative to the repo or
absolute) and may override any part of it under ``model:``.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import (
    Any,
    Callable,
    Collection,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gm.errors import ConfigError
from gm.inference import DISCRETIZATIONS, SAMPLERS
from gm.models.diffusion import base_model_section
from gm.modules.diffusionmodules.denoiser_scaling import PREDICTION_TYPES
from gm.modules.lora import UNET_TARGET_GROUPS
from gm.optim import LR_SCHEDULERS
from gm.precision import PRECISIONS


@dataclass(frozen=True)
class Check:
    """A value's condition and the phrase that says what was expected."""

    ok: Callable[[Any], bool]
    expected: str


def at_least(bound: float) -> Check:
    return Check(lambda v: v >= bound, f"must be >= {bound}")


def above(bound: float, why: str = "") -> Check:
    return Check(lambda v: v > bound, f"must be > {bound}{why}")


def one_of(names: Sequence[str]) -> Check:
    return Check(lambda v: v in names, f"expected one of {', '.join(names)}")


def setting(default: Any = None, *, flag: Optional[str] = None, help: Optional[str] = None,
            check: Optional[Check] = None, aliases: Sequence[str] = (), resumable: bool = False) -> Any:
    """A config field and everything derived from it: its command-line flag (``flag``, plus
    ``aliases``; None = YAML only), the flag's help, the check of its value (None always passes)
    and whether a resumed run may change it (cadence of outputs, not the trained numbers)."""
    meta = {"flag": flag, "help": help, "check": check, "aliases": tuple(aliases), "resumable": resumable}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


_POSITIVE = at_least(1)


@dataclass
class LoraSection:
    rank: int = setting(4, flag="lora_rank", check=_POSITIVE)
    # None: alpha = rank (scale 1), as diffusers/PEFT
    alpha: Optional[float] = setting(None, flag="lora_alpha", help="scale = alpha / rank (default: rank)",
                                     check=above(0, " (scale = alpha / rank)"))
    dropout: float = setting(0.0, flag="lora_dropout", check=Check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    # groups of UNet layers (gm.modules.lora): attn (to_q/k/v/out.0 of both attentions), ff, proj
    unet_targets: List[str] = setting(
        ["attn"], flag="lora_unet_targets", help=", ".join(UNET_TARGET_GROUPS),
        check=Check(lambda v: bool(v) and set(v) <= set(UNET_TARGET_GROUPS),
                    f"expected one or more of {', '.join(UNET_TARGET_GROUPS)}"))
    train_text_encoder: bool = setting(False, flag="train_text_encoder", help="also LoRA-train both text encoders")
    # file format of every saved LoRA (gm.checkpoint.lora_formats); the *_lora.ckpt beside it stays
    # ours; the seed's layout holds no text-encoder LoRA, so it is an export (tools/convert_lora.py)
    format: str = setting("kohya", flag="lora_format", resumable=True, check=one_of(("kohya", "diffusers", "gm")),
                          help="format of the saved LoRA files: kohya (default; ComfyUI, A1111/Forge, diffusers), "
                               "diffusers (PEFT) or gm")
    # precision of the factors in that file (as kohya's --save_precision); the *_lora.ckpt stays fp32
    save_precision: str = setting("fp32", flag="save_precision", resumable=True,
                                  check=one_of(("fp32", "fp16", "bf16")),
                                  help="fp32 (default), fp16 or bf16: precision of the saved LoRA .safetensors")


@dataclass
class OptimSection:
    learning_rate: float = setting(1e-4, flag="learning_rate", check=above(0))
    text_encoder_lr: Optional[float] = setting(5e-6, flag="text_encoder_lr", check=above(0))
    lr_scheduler: str = setting("constant", flag="lr_scheduler", help=", ".join(LR_SCHEDULERS),
                                check=one_of(LR_SCHEDULERS))
    lr_warmup_steps: int = setting(0, flag="lr_warmup_steps", check=at_least(0))
    weight_decay: float = setting(1e-4, check=at_least(0))
    beta1: float = setting(0.9, check=Check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    beta2: float = setting(0.999, check=Check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    eps: float = setting(1e-8, check=above(0))
    max_grad_norm: float = setting(1.0, flag="max_grad_norm", help="0 disables clipping",
                                   check=at_least(0))


@dataclass
class DataSection:
    resolution: int = setting(1024, flag="resolution",
                              check=Check(lambda v: v >= 8 and v % 8 == 0, "must be a positive multiple of 8"))
    center_crop: bool = setting(False, flag="center_crop")
    random_flip: bool = setting(False, flag="random_flip")
    repeats: int = setting(1, flag="repeats", aliases=("train_data_repeat",), check=_POSITIVE,
                           help="each instance photo counts this many times per epoch")
    batch_size: int = setting(1, flag="train_batch_size", check=_POSITIVE)


@dataclass
class TrainSection:
    max_train_steps: int = setting(500, flag="max_train_steps", help="optimizer steps", check=_POSITIVE)
    gradient_accumulation_steps: int = setting(1, flag="gradient_accumulation_steps", check=_POSITIVE)
    prior_loss_weight: float = setting(1.0, flag="prior_loss_weight", help="lambda in loss = instance + lambda * class",
                                       check=at_least(0))
    num_class_images: int = setting(100, flag="num_class_images", help="top the class folder up to this many images",
                                    check=at_least(0))
    sample_batch_size: int = setting(4, flag="sample_batch_size", help="class images generated per batch",
                                     check=_POSITIVE)
    snr_gamma: Optional[float] = setting(None, flag="snr_gamma", help="min-SNR-gamma", check=above(0))
    noise_offset: float = setting(0.0, flag="noise_offset", check=at_least(0))
    # None: what the base weights declare (a v_pred key, a diffusers scheduler config), else the model config's
    prediction_type: Optional[str] = setting(
        None, flag="prediction_type", check=one_of(PREDICTION_TYPES),
        help="what the base UNet predicts: epsilon (SDXL base) or v_prediction (kohya's --v_parameterization); "
             "default: what the weights declare, else the model config's")
    mixed_precision: str = setting("fp32", flag="mixed_precision", help="fp32; fp16/bf16 on Ascend/GPU",
                                   check=one_of(PRECISIONS))
    prior_generation_precision: Optional[str] = setting(
        None, flag="prior_generation_precision", check=one_of(PRECISIONS),
        help="precision of class-image sampling (default: --mixed_precision; fp16/bf16 on Ascend/GPU)")
    loss_scale: str = setting("dynamic", check=one_of(("dynamic", "static")))  # fp16 only
    seed: int = setting(0, flag="seed", check=at_least(0))
    save_ckpt_interval: int = setting(500, flag="save_ckpt_interval", help="optimizer steps", check=_POSITIVE,
                                      resumable=True)
    max_num_ckpt: Optional[int] = setting(None, flag="max_num_ckpt", help="keep the newest N checkpoints",
                                          check=_POSITIVE, resumable=True)
    # full training state (gm.train_state) every N optimizer steps and at the end
    checkpointing_steps: Optional[int] = setting(
        None, flag="checkpointing_steps", check=_POSITIVE, resumable=True,
        help="full training state (for --resume_from_checkpoint) every N optimizer steps and at the end "
             "(default: --save_ckpt_interval)")
    checkpoints_total_limit: Optional[int] = setting(None, flag="checkpoints_total_limit", check=_POSITIVE,
                                                     resumable=True,
                                                     help="keep the newest N training states (default: all)")
    max_skipped_steps: int = setting(100, flag="max_skipped_steps", check=_POSITIVE, resumable=True,
                                     help="stop after N optimizer steps in a row with non-finite gradients")
    # with the text encoders trained, the latents only
    cache_latents: bool = setting(True, flag="cache_latents",
                                  help="VAE latents and text conditioning computed once before training "
                                       "(default on; with --train_text_encoder the latents only)")
    gradient_checkpointing: bool = setting(False, flag="gradient_checkpointing",
                                           help="recompute activations in backward: less memory, ~30%% slower")
    probe_loss: bool = setting(True, flag="probe_loss", resumable=True,
                               help="fixed-noise instance loss before/after training in summary.json (default on; "
                                    "its compiled UNet forward costs ~7 GB at full size on a CPU)")


@dataclass
class SamplingSection:
    """Class-image generation and validation images (the shared sampler)."""

    sampler: str = setting("EulerEDMSampler", check=one_of(sorted(SAMPLERS)))
    discretization: str = setting("LegacyDDPMDiscretization", check=one_of(sorted(DISCRETIZATIONS)))
    num_steps: int = setting(40, flag="sample_steps", help="sampler steps for class/validation images",
                             check=_POSITIVE)
    guidance_scale: float = setting(5.0, flag="guidance_scale", check=at_least(0))
    negative_prompt: str = setting("")
    # '' or None: no validation images
    validation_prompt: Optional[str] = setting(
        None, flag="validation_prompt", help="prompt of the validation images ('' for none)",
        check=Check(lambda v: v == "" or bool(v.strip()), "is blank; give a prompt, or '' for no validation images"))
    validation_steps: int = setting(100, flag="validation_steps", check=_POSITIVE, resumable=True)
    num_validation_images: int = setting(2, flag="num_validation_images", check=_POSITIVE)


@dataclass
class EvalSection:
    """Whether the subject was learned and the class kept: images of the subject prompts and of the
    class prompt, sampled before training and at the end (same seeds), read by a judge."""

    # gm.metrics.toy_world's judge file (the tiny default's toy world); '' or None: no evaluation
    toy_world_judge: Optional[str] = setting(
        None, flag="eval_toy_world_judge", resumable=True,
        help="toy-world judge .safetensors: subject fidelity and class diversity before/after training ('' for none)")
    class_label: str = setting("toy", flag="eval_class_token", resumable=True,
                               check=Check(bool, "must name the subject's class"),
                               help="the subject's class (the judge's label; {1} of --eval_prompts)")
    # each: the instance prompt, then a scene ("a photo of a sks toy" + " on a beach")
    subject_prompt_suffixes: List[str] = setting(["on a beach", "on a lawn", "on a wooden table",
                                                  "on a checkered tablecloth"], resumable=True)
    num_images: int = setting(16, flag="eval_num_images", check=at_least(2), resumable=True,
                              help="images per evaluation set (subject prompts, class prompt) without --eval_prompts")
    batch_size: int = setting(4, check=_POSITIVE, resumable=True)
    # the DreamBooth paper's metrics (gm/metrics/encoders.py: transformers folders or .safetensors)
    clip: Optional[str] = setting(None, flag="eval_clip", resumable=True,
                                  help="CLIP model folder/.safetensors: CLIP-I and CLIP-T at each evaluation")
    dino: Optional[str] = setting(None, flag="eval_dino", resumable=True,
                                  help="DINO ViT model folder/.safetensors: DINO at each evaluation")
    steps: Optional[int] = setting(None, flag="eval_steps", check=_POSITIVE, resumable=True,
                                   help="also evaluate every N steps (default: before training and at the end)")
    prompts: Optional[str] = setting(None, flag="eval_prompts", resumable=True,
                                     help="subject prompts: the paper's prompts_and_classes.txt or one per line "
                                          "({0} = --eval_unique_token, {1} = eval.class_label)")
    unique_token: str = setting("sks", flag="eval_unique_token", resumable=True)
    images_per_prompt: int = setting(1, flag="eval_images_per_prompt", check=_POSITIVE, resumable=True)


@dataclass
class TrainingConfig:
    base_config: str = "configs/inference/sd_xl_base.yaml"
    model: Any = None
    # the base weights used when --weight is not given (relative to the repo or absolute; '' = none)
    weight: str = ""
    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    eval: EvalSection = field(default_factory=EvalSection)


@dataclass(frozen=True)
class Setting:
    """One leaf of the schema, with what ``setting`` attached to it."""

    key: str  # "optim.learning_rate"
    kind: Any  # its type hint
    default: Any
    flag: Optional[str]
    help: Optional[str]
    check: Optional[Check]
    aliases: Tuple[str, ...]
    resumable: bool


def schema_settings() -> List[Setting]:
    """Every section field of the training config, in declaration order."""
    out = []
    for section in fields(TrainingConfig):
        if not is_dataclass(section.default_factory if section.default_factory is not MISSING else None):
            continue
        hints = get_type_hints(section.default_factory)
        for f in fields(section.default_factory):
            default = f.default if f.default is not MISSING else f.default_factory()
            m = f.metadata
            out.append(Setting(f"{section.name}.{f.name}", hints[f.name], default, m.get("flag"), m.get("help"),
                               m.get("check"), m.get("aliases", ()), m.get("resumable", False)))
    return out


SETTINGS = schema_settings()
# command-line flag -> config key (flags left unset keep the YAML value)
FLAG_KEYS = {s.flag: s.key for s in SETTINGS if s.flag}
# config keys that may change when a run is resumed (cadence of outputs, not the trained numbers)
RESUMABLE_CHANGES = tuple(s.key for s in SETTINGS if s.resumable)


def str2bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _base_type(kind: Any) -> Any:
    """int for Optional[int], and so on."""
    if get_origin(kind) is Union:
        return next(a for a in get_args(kind) if a is not type(None))
    return kind


def _list_items(value: str) -> List[str]:
    """One command-line word of a list flag: "attn,ff" and "attn ff" give the same list (users of
    kohya's ``--network_args`` write commas). List flags hold names, never a comma inside one."""
    return [item for item in value.split(",") if item]


class _ExtendList(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [item for word in values for item in word])


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per schema setting that has one; unset flags (None) keep the YAML's value."""
    for s in SETTINGS:
        if not s.flag:
            continue
        kind = _base_type(s.kind)
        names = [f"--{s.flag}", *(f"--{alias}" for alias in s.aliases)]
        help_text = f"{s.help + '; ' if s.help else ''}sets {s.key} of --config"
        if kind is bool:
            parser.add_argument(*names, dest=s.flag, type=str2bool, nargs="?", const=True, default=None,
                                help=help_text)
        elif get_origin(kind) in (list, List):
            parser.add_argument(*names, dest=s.flag, nargs="+", type=_list_items, action=_ExtendList, default=None,
                                help=help_text)
        else:
            parser.add_argument(*names, dest=s.flag, type=kind, default=None, help=help_text)


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
    model = base_model_section(cfg.base_config, cfg.model, path)
    if cfg.train.gradient_checkpointing:
        model = OmegaConf.merge(model, {"params": {"network_config": {"params": {"use_checkpoint": True}}}})
    cfg.model = model
    validate(cfg, path, {FLAG_KEYS[f] for f, v in (overrides or {}).items() if v is not None})
    return cfg


def validate(cfg: DictConfig, path: Path, from_flags: Collection[str] = ()) -> None:
    """Each setting's check (and finiteness for floats), named by the flag that set it
    (keys in ``from_flags``) or by its key in the YAML file."""
    for s in SETTINGS:
        value = OmegaConf.select(cfg, s.key)
        if value is None:
            continue
        name = f"--{s.flag}" if s.key in from_flags else f"{path}: {s.key}"
        # NaN and infinity pass comparisons they should fail, or poison the run later
        if _base_type(s.kind) is float and not math.isfinite(value):
            raise ConfigError(f"{name} {value}: must be a finite number")
        if s.check is not None and not s.check.ok(value):
            shown = repr(value) if isinstance(value, str) and not value.strip() else value
            raise ConfigError(f"{name} {shown}: {s.check.expected}")
