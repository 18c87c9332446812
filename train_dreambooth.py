"""DreamBooth LoRA fine-tuning of SDXL with prior preservation (MindSpore).

    python train_dreambooth.py --config configs/training/sd_xl_base_finetune_dreambooth_lora_910b.yaml \
        --weight sd_xl_base_1.0.safetensors --instance_data_path dog/ --instance_prompt "a photo of sks dog" \
        --class_data_path class_dog/ --class_prompt "a photo of a dog" --num_class_images 100 \
        --save_path runs/dog --device_target Ascend

Reads top to bottom: parse and check the inputs, build the model, top up the class images with
the base model, inject LoRA, then train (one compiled step) and write LoRA checkpoints, a JSONL
log and validation images into --save_path. Flags override the YAML config; the resolved config
is saved as --save_path/config.yaml.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # summary.json timings count from here (imports included)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from gm.cli import run_cli, setup_logging  # noqa: E402
from gm.errors import ConfigError  # noqa: E402
from gm.fs import atomic_write_text  # noqa: E402
from gm.run_folder import (  # noqa: E402
    TrainingStopped,
    check_save_path,
    clear_run,
    config_differences,
    rewind_run,
)
from gm.train_config import FLAG_KEYS, RESUMABLE_CHANGES, add_config_flags, load_training_config, str2bool  # noqa: E402,E501

_logger = logging.getLogger("gm.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "training" / "sd_xl_tiny_dreambooth_lora.yaml"))
    p.add_argument("--weight", default="", help="base weights: official .safetensors, diffusers folder or .ckpt")
    p.add_argument("--instance_data_path", default=None, help="folder of subject photos (+ optional <image>.txt)")
    p.add_argument("--instance_prompt", default=None, help='e.g. "a photo of sks dog"')
    p.add_argument("--class_data_path", default=None, help="class images folder; enables prior preservation")
    p.add_argument("--class_prompt", default=None, help='e.g. "a photo of a dog"')
    p.add_argument("--save_path", default="runs/dreambooth")
    p.add_argument("--ms_mode", type=int, default=0, help="0: graph mode, 1: PyNative")
    p.add_argument("--device_target", default="CPU")
    p.add_argument("--is_parallel", type=str2bool, nargs="?", const=True, default=False)
    p.add_argument("--compile_cache", default=None,
                   help="folder for MindSpore's persistent graph cache (default: ~/.cache/sdxl_dreambooth_ms/"
                        "compile, one subfolder per model/shape/code version); 'off' disables it")
    p.add_argument("--compile_helper", choices=("auto", "off"), default="auto",
                   help="auto: on a cold compile cache, a standalone CPU run compiles the train step in a "
                        "short-lived second process while it builds and encodes its inputs, then loads it (the "
                        "step then runs ~30%% faster in ~0.7 GB less); off: compile in this process")
    p.add_argument("--pynative_jit", choices=("auto", "on", "off", "shared"), default="auto",
                   help="PyNative (--ms_mode 1): run each UNet level as one compiled graph, the rest eagerly "
                        "(measured 6-15x faster steps, more memory); shared: each ResBlock and transformer "
                        "block through one compiled graph per block structure (few graphs however deep the "
                        "model; the backward recomputes each block); auto, on the CPU: levels for models whose fp32 "
                        "weights are at most 1/8 of the free memory, else shared; off: every op eagerly, for "
                        "stepping through the UNet")
    p.add_argument("--compile_only", action="store_true", help=argparse.SUPPRESS)  # the compile helper itself
    p.add_argument("--input_cache", default=None,
                   help="folder where the cached VAE moments and text conditioning (--cache_latents) are kept "
                        "for the next run on the same images, prompts and base model (default: ~/.cache/"
                        "sdxl_dreambooth_ms/inputs); 'off' encodes them every run")
    add_config_flags(p)  # one per training-config setting (gm.train_config): flag, help and check
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (the newest complete state in --save_path/state) or a state folder: continue "
                        "that run exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --save_path (its checkpoints, states, samples and logs)")
    p.add_argument("--init_lora", default=None,
                   help="start from this LoRA file (kohya, diffusers, the seed's *_lora.ckpt or ours); its rank "
                        "must equal --lora_rank and its modules lie within the trained ones")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_inputs(args: argparse.Namespace, cfg) -> None:
    """User mistakes that need no model: fail in a second, before anything is built."""
    from gm.data.dreambooth import validate_instance_folder

    if args.init_lora and not Path(args.init_lora).is_file():
        raise ConfigError(f"--init_lora {args.init_lora}: no such file")
    if cfg.train.gradient_checkpointing and args.ms_mode != 0:
        raise ConfigError("--gradient_checkpointing needs graph mode (--ms_mode 0): MindSpore 2.10's recompute "
                          "returns zero gradients in PyNative")
    if not args.instance_prompt or not args.instance_prompt.strip():
        raise ConfigError('--instance_prompt is required (and not blank), e.g. --instance_prompt "a photo of sks dog"')
    if args.class_prompt is not None and not args.class_prompt.strip():
        raise ConfigError('--class_prompt is blank; give the class, e.g. --class_prompt "a photo of a dog"')
    if args.device_target == "CPU" and cfg.train.mixed_precision != "fp32":
        raise ConfigError(f"--mixed_precision {cfg.train.mixed_precision}: the CPU target trains in fp32 only "
                          "(fp16/bf16 are for --device_target Ascend or GPU)")
    if args.device_target == "CPU" and cfg.train.prior_generation_precision not in (None, "fp32"):
        raise ConfigError(f"--prior_generation_precision {cfg.train.prior_generation_precision}: the CPU target "
                          "samples in fp32 only (fp16/bf16 are for --device_target Ascend or GPU)")
    if args.device_target not in ("CPU", "GPU", "Ascend"):
        raise ConfigError(f"--device_target {args.device_target}: expected CPU, GPU or Ascend")
    if not args.instance_data_path:
        raise ConfigError("--instance_data_path is required: a folder with 3-5 photos of the subject")
    validate_instance_folder(args.instance_data_path)
    if args.class_data_path and not args.class_prompt:
        raise ConfigError('--class_prompt is required with --class_data_path, e.g. --class_prompt "a photo of a dog"')
    if args.class_prompt and not args.class_data_path:
        _logger.warning("--class_prompt is ignored without --class_data_path (no prior preservation)")
    if args.class_data_path and cfg.train.prior_loss_weight > 0 and cfg.train.num_class_images == 0:
        raise ConfigError("--num_class_images 0 with --class_data_path: prior preservation needs class images; give "
                          "a count (e.g. 100), or drop --class_data_path to train without prior preservation")
    if args.class_data_path and Path(args.class_data_path).exists() and not Path(args.class_data_path).is_dir():
        raise ConfigError(f"--class_data_path {args.class_data_path}: is a file; give a folder (made if missing)")
    if args.class_data_path and _same_or_inside(args.class_data_path, args.instance_data_path):
        raise ConfigError(f"--class_data_path {args.class_data_path}: is the instance folder (or inside it); "
                          "generated class images would be trained on as photos of the subject -- give a separate "
                          "folder, e.g. class_images/dog")
    if cfg.eval.toy_world_judge and not resolve_repo_path(cfg.eval.toy_world_judge).is_file():
        raise ConfigError(f"--eval_toy_world_judge {cfg.eval.toy_world_judge}: no such file (give '' to skip the "
                          "evaluation)")
    for flag, value in (("eval_clip", cfg.eval.clip), ("eval_dino", cfg.eval.dino), ("eval_prompts", cfg.eval.prompts)):
        if value and not Path(value).exists():
            raise ConfigError(f"--{flag} {value}: no such file or folder")
    if cfg.eval.prompts:
        from gm.metrics.dreambooth import read_prompt_file

        read_prompt_file(cfg.eval.prompts, "--eval_prompts")
    base_weight(args, cfg)
    check_save_path(Path(args.save_path), resume=bool(args.resume_from_checkpoint), overwrite=args.overwrite)
    if args.resume_from_checkpoint:
        from gm.train_state import find_state

        find_state(args.save_path, args.resume_from_checkpoint)  # exists and verifies; the config is compared later


def base_weight(args: argparse.Namespace, cfg) -> Optional[str]:
    """The base weights to load: --weight, else the config's ``weight`` (relative to the repo);
    ``--weight none`` trains on a randomly initialised base."""
    if args.weight:
        return None if args.weight.lower() == "none" else args.weight
    if not cfg.weight:
        return None
    path = Path(cfg.weight) if Path(cfg.weight).is_absolute() else REPO / cfg.weight
    if not path.exists():
        raise ConfigError(f"--config {args.config}: weight {cfg.weight} does not exist; give --weight FILE "
                          "(or --weight none for a randomly initialised base)")
    return str(path)


def base_prediction_type(args: argparse.Namespace, cfg) -> Optional[str]:
    """``--prediction_type``, else what the base weights declare (``gm.checkpoint.prediction_type``);
    None: the model config's preconditioning holds. Resolved before anything is compiled, since the
    compiled graphs (and their cache) depend on it."""
    from gm.checkpoint.load import declared_prediction_type
    from gm.checkpoint.prediction_type import resolve

    weight = base_weight(args, cfg)
    return resolve(declared_prediction_type(weight) if weight else None, cfg.train.prediction_type, weight)


def apply_prediction_type(engine, cfg) -> None:
    """Precondition the engine for ``train.prediction_type`` (None: as its config says)."""
    if cfg.train.prediction_type:
        engine.denoiser.set_prediction_type(cfg.train.prediction_type)


def prediction_type_metadata(engine) -> dict:
    """The LoRA files' entry naming what the base predicts (ModelSpec; kohya reads it)."""
    from gm.checkpoint.prediction_type import marker_metadata

    return marker_metadata(engine.denoiser.scaling.prediction_type)


def input_store(args: argparse.Namespace) -> Optional[Path]:
    """The folder of stored frozen inputs (``--input_cache``), or None when turned off."""
    if args.input_cache is not None and args.input_cache.lower() == "off":
        return None
    from gm.compile_cache import DEFAULT_ROOT

    return Path(args.input_cache) if args.input_cache else DEFAULT_ROOT.parent / "inputs"


def input_identity(cfg, weight: Optional[str]) -> dict:
    """What the frozen inputs are a function of besides the images and prompts: the base weights
    (file, size, modification time; the seed of a random one), the VAE and text-encoder configs
    and the precision they run in."""
    params = cfg.model.params
    base = {"random_init_seed": cfg.train.seed}
    if weight:
        path = Path(weight).resolve()
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        base = {"weights": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]}
    return {**base, "precision": cfg.train.mixed_precision,
            "vae": OmegaConf.to_container(params.first_stage_config, resolve=True),
            "conditioner": OmegaConf.to_container(params.conditioner_config, resolve=True)}


def resolve_repo_path(path: str) -> Path:
    """A config path: absolute, or relative to the repo (as base_config)."""
    return Path(path) if Path(path).is_absolute() else REPO / path


def _same_or_inside(path: str, folder: str) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def resume_state_folder(args: argparse.Namespace, effective: dict) -> Optional[Path]:
    """The state folder ``--resume_from_checkpoint`` names, checked to belong to this run's config."""
    from gm.train_state import CONFIG_FILE, find_state

    if not args.resume_from_checkpoint:
        return None
    folder = find_state(args.save_path, args.resume_from_checkpoint)
    # flags that set config keys are compared through the config
    allowed = (*RESUMABLE_CHANGES, *(f"cli.{flag}" for flag in FLAG_KEYS))
    differences = config_differences((folder / CONFIG_FILE).read_text(), effective, allowed)
    if differences:
        raise ConfigError(f"--resume_from_checkpoint {folder}: the run was made with other settings "
                          f"({differences[0]}{f' and {len(differences) - 1} more' if len(differences) > 1 else ''}"
                          "); resume with the same flags and config, or start a new --save_path")
    return folder


def micro_batch_rows(cfg, with_prior: bool) -> int:
    """Rows of one micro-batch: the instance samples, and as many class samples with the prior."""
    return cfg.data.batch_size * (2 if with_prior else 1)


def prior_preservation(args: argparse.Namespace, cfg) -> bool:
    """Whether class samples are trained on (a class folder and a positive prior-loss weight)."""
    return bool(args.class_data_path) and cfg.train.prior_loss_weight > 0


def sampling_options(cfg, prompt_seed: int):
    from gm.inference import SamplingOptions

    s = cfg.sampling
    return SamplingOptions(sampler=s.sampler, discretization=s.discretization, num_steps=s.num_steps,
                           guidance_scale=s.guidance_scale,
                           negative_prompt=s.negative_prompt, height=cfg.data.resolution,
                           width=cfg.data.resolution, seed=prompt_seed)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = load_training_config(args.config, {k: getattr(args, k) for k in FLAG_KEYS})
    setup_logging()
    if not args.compile_only:  # the helper's parent checked them (and may have made --save_path since)
        check_inputs(args, cfg)
    cfg.train.prediction_type = base_prediction_type(args, cfg)

    from gm.compile_cache import cache_key, enable_compile_cache, start_compile_helper
    from gm.inference import set_mode
    from gm.modules import native_attention, native_conv, native_norms
    from gm.parallel import init_parallel, stop_on_collective_failure

    set_mode(args.ms_mode, args.device_target)
    with_prior = prior_preservation(args, cfg)
    parallel = init_parallel(args.is_parallel, args.device_target)  # an msrun scheduler's process ends here
    # the gradient mean's divisor (the rank count) is a constant in the train step's graph
    folder = enable_compile_cache(args.compile_cache, cache_key(
        OmegaConf.to_container(cfg, resolve=True), ms_mode=args.ms_mode, device=args.device_target,
        with_prior=with_prior, is_parallel=args.is_parallel, world_size=parallel.world_size,
        # whether the norms, convolutions and attention are our compiled kernels or MindSpore's: different graphs
        cpu_norm_kernels=args.device_target == "CPU" and native_norms.kernels() is not None,
        cpu_conv_kernels=args.device_target == "CPU" and native_conv.kernels() is not None,
        cpu_attention_kernels=args.device_target == "CPU" and native_attention.kernels() is not None),
        exclusive=parallel.world_size == 1)
    if args.compile_only:
        compile_train_step(args, cfg, with_prior)
        # the parent waits for this exit; MindSpore's interpreter teardown would add ~0.7 s to it,
        # and the cache is complete once the marker is written (gm.compile_cache)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    helper = start_compile_helper(Path(__file__), argv, folder) if use_compile_helper(
        args, cfg, folder, parallel.world_size) else None
    setup_logging(parallel.rank)
    try:
        with stop_on_collective_failure(parallel):
            train(args, cfg, parallel, (helper, folder) if helper else None)
    finally:
        if helper is not None and helper.poll() is None:  # the run failed before it needed the graph
            helper.kill()
            helper.wait()


def use_compile_helper(args: argparse.Namespace, cfg, folder: Optional[Path], world_size: int) -> bool:
    """Whether to compile the train step in a helper process (``--compile_helper auto``): a cold
    compile cache, standalone graph mode on the CPU (where the gain was measured), and inputs the
    helper can shape without the data (cached latents, frozen text encoders)."""
    from gm.compile_cache import is_warm
    from gm.memory import available_memory, fp32_weight_bytes, is_small_model
    from gm.models.diffusion import build_engine

    return (args.compile_helper == "auto" and folder is not None and not is_warm(folder) and world_size == 1
            and args.device_target == "CPU" and args.ms_mode == 0 and cfg.train.cache_latents
            and not cfg.lora.train_text_encoder
            and is_small_model(fp32_weight_bytes(build_engine(cfg.model, allocate=False)), available_memory()))


def build_model(args: argparse.Namespace, cfg):
    """The engine with the base weights (``--weight``/the config's; random when none). Returns
    ``(engine, weight path or None)``."""
    import mindspore as ms

    from gm.checkpoint.load import load_weights
    from gm.models.diffusion import build_engine
    from gm.modules.pynative_jit import apply_pynative_jit

    ms.set_seed(cfg.train.seed)  # every rank draws the same random initial weights (LoRA A, a random base)
    engine = build_engine(cfg.model)
    weight = base_weight(args, cfg)
    apply_prediction_type(engine, cfg)
    if weight:
        load_weights(engine, weight, cfg.train.prediction_type)
        _logger.info("base model: %s", weight)
    else:
        _logger.warning("no base weights (--weight none or a config without one): training on a randomly "
                        "initialised base")
    chosen = apply_pynative_jit(args.pynative_jit, args.ms_mode, args.device_target, engine)
    if chosen != "off":
        _logger.info("PyNative: %s (--pynative_jit off: all eagerly)",
                     "each UNet level runs as one compiled graph" if chosen == "levels" else
                     "the UNet's blocks run through one compiled graph per block structure")
    return engine, weight


def add_lora(args: argparse.Namespace, cfg, engine):
    """Inject the LoRA of ``cfg.lora`` (from ``--init_lora`` when given), freeze the rest, cast to
    the training precision. Returns the ``LoRAConfig``."""
    from gm.checkpoint.lora import load_lora
    from gm.modules.lora import LoRAConfig, inject_lora, mark_only_lora_trainable
    from gm.precision import apply_mixed_precision

    lora = LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                      unet_targets=tuple(cfg.lora.unet_targets), text_encoder=cfg.lora.train_text_encoder)
    inject_lora(engine, lora)
    if args.init_lora:
        load_lora(engine, args.init_lora)
    mark_only_lora_trainable(engine)
    apply_mixed_precision(engine, cfg.train.mixed_precision)
    return lora


def build_train_step(cfg, engine, lora, with_prior: bool):
    """The loss (instance + prior preservation) and its compiled training step over the LoRA."""
    from gm.modules.diffusionmodules.loss import DreamBoothLoss
    from gm.optim import build_optimizer, parameter_groups
    from gm.train_step import TrainStep, loss_scale_config

    loss_cell = DreamBoothLoss(engine, with_prior_preservation=with_prior,
                               prior_loss_weight=cfg.train.prior_loss_weight, snr_gamma=cfg.train.snr_gamma,
                               train_text_encoder=lora.text_encoder)
    optim = cfg.optim
    optimizer = build_optimizer(parameter_groups(engine, learning_rate=optim.learning_rate,
                                                 text_encoder_lr=optim.text_encoder_lr,
                                                 weight_decay=optim.weight_decay),
                                betas=(optim.beta1, optim.beta2), eps=optim.eps)
    return TrainStep(loss_cell, optimizer, grad_accum_steps=cfg.train.gradient_accumulation_steps,
                     max_grad_norm=optim.max_grad_norm,
                     loss_scale=loss_scale_config(cfg.train.mixed_precision, cfg.train.loss_scale))


def keeps_sampling_modules(cfg, lora) -> bool:
    """Whether the VAE decoder and text encoders stay after caching (validation, evaluation or
    trained text encoders sample or encode during training)."""
    return bool(cfg.sampling.validation_prompt) or lora.text_encoder or evaluation_enabled(cfg)


def compile_train_step(args: argparse.Namespace, cfg, with_prior: bool) -> None:
    """``--compile_only`` (the compile helper, see ``use_compile_helper``): build the model (without
    its weights) and train step as :func:`train` does, release what it releases, and compile the
    step for inputs of the run's shapes (the compile cache's signature check catches any difference)."""
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor

    from gm.data.dreambooth import SIZE_KEYS
    from gm.frozen_inputs import latent_shape, release_frozen_modules
    from gm.models.diffusion import build_engine
    from gm.modules.embedders.conditioner import OUTPUT_KEYS

    start = time.perf_counter()
    ms.set_seed(cfg.train.seed)  # as build_model: the random ops' seeds are part of the graph
    # no weights: the compiled graph does not depend on their values (the base file's are cast to
    # each parameter's dtype when loaded), and the parameters the step never reads (VAE, text
    # encoders) are then never allocated: -64 MB before compiling at tiny size, -44 MB peak
    engine = build_engine(cfg.model, allocate=False)
    apply_prediction_type(engine, cfg)
    rows = micro_batch_rows(cfg, with_prior)
    resolution = cfg.data.resolution
    # the conditioning's shapes, without running the text encoders (2 s on this path at tiny size)
    cond = {"txt": [""] * rows, **{key: np.full((rows, 2), resolution, np.float32) for key in SIZE_KEYS}}
    shapes = engine.conditioner.output_shapes(cond)
    crossattn, vector = (np.zeros(shapes[key], np.float32) for key in OUTPUT_KEYS)
    lora = add_lora(args, cfg, engine)
    train_step = build_train_step(cfg, engine, lora, with_prior)
    release_frozen_modules(engine, keep_sampling=keeps_sampling_modules(cfg, lora))
    latents = np.zeros((rows, *latent_shape(np.empty((1, 3, resolution, resolution)))), np.float32)
    train_step.set_train(True)
    train_step.compile(train_step.learning_rates(0.0), Tensor(latents), Tensor(latents),
                       Tensor(np.ones(rows, np.float32)), Tensor(crossattn), Tensor(vector))
    _logger.info("train step compiled in %.1f s", time.perf_counter() - start)


def train(args: argparse.Namespace, cfg, parallel, helper=None) -> None:
    """Build, top up class images, train and save; ``parallel``: this process's ``ParallelContext``;
    ``helper``: ``(process, cache folder)`` of a compile helper to wait for before the first step."""
    import mindspore as ms
    from tqdm.auto import tqdm

    from gm.compile_cache import wait_for_compile_helper
    from gm.data.class_images import generate_class_images
    from gm.data.dreambooth import DreamBoothDataset
    from gm.evaluation import before_after_grid, describe
    from gm.frozen_inputs import CachedInputs, FrozenInputs, latent_shape, release_frozen_modules
    from gm.inference import Sampler, save_images
    from gm.modules.pynative_jit import is_compiled_in_pynative
    from gm.optim import LRSchedule
    from gm.parallel import barrier, check_ranks_agree, gather_rows, parameters_bytes
    from gm.plot import plot_run
    from gm.precision import apply_mixed_precision
    from gm.train_state import load_state, prune_states, save_state
    from gm.training import CheckpointWriter, fixed_noise_instance_loss, per_sample_draws, probe_positions

    start_time = PROCESS_START
    timings = {}  # seconds since the process started, and per-phase medians: summary.json "timings"
    save_path = Path(args.save_path)
    with_prior = prior_preservation(args, cfg)
    effective = {**OmegaConf.to_container(cfg, resolve=True), "cli": vars(args), "world_size": parallel.world_size}
    check_ranks_agree(parallel, json.dumps(effective, sort_keys=True).encode(), "the resolved config and flags")
    resume_folder = resume_state_folder(args, effective)
    state = load_state(resume_folder) if resume_folder else None
    if parallel.is_main and args.overwrite:
        removed = clear_run(save_path)
        if removed:
            _logger.warning("--overwrite: removed the previous run's %s from %s", ", ".join(removed), save_path)
    if state is not None:
        _logger.info("resuming from %s (step %d of %d)", state.path, state.step, cfg.train.max_train_steps)
        if parallel.is_main:
            rewind_run(save_path, state.step)

    # -- the model ------------------------------------------------------------------------------
    engine, weight = build_model(args, cfg)
    sampler = Sampler(engine)
    if with_prior:
        # as diffusers: class images in the training precision unless --prior_generation_precision says otherwise
        apply_mixed_precision(engine, cfg.train.prior_generation_precision or cfg.train.mixed_precision,
                              "--prior_generation_precision")
        made = generate_class_images(sampler, args.class_data_path, args.class_prompt, cfg.train.num_class_images,
                                     cfg.train.sample_batch_size, sampling_options(cfg, cfg.train.seed),
                                     parallel.rank, parallel.world_size, barrier=lambda: barrier(parallel))
        _logger.info("class images generated per rank: %s", gather_rows(parallel, [made])[:, 0].astype(int).tolist())
    dataset = DreamBoothDataset(
        args.instance_data_path, args.instance_prompt, class_dir=args.class_data_path if with_prior else None,
        class_prompt=args.class_prompt, resolution=cfg.data.resolution, center_crop=cfg.data.center_crop,
        random_flip=cfg.data.random_flip, repeats=cfg.data.repeats,
        num_class_images=cfg.train.num_class_images, seed=cfg.train.seed)
    images = [f"{p} {p.stat().st_size}" for p in dataset.instance_paths + dataset.class_paths]
    check_ranks_agree(parallel, "\n".join(images).encode(), "the instance/class image files (several machines: "
                      "put --instance_data_path and --class_data_path on a filesystem they share)")
    lora = add_lora(args, cfg, engine)
    lora_params = [(name, p) for name, p in engine.parameters_and_names() if p.requires_grad]
    check_ranks_agree(parallel, parameters_bytes(lora_params), "the initial LoRA weights")

    # -- the training step ----------------------------------------------------------------------
    train_step = build_train_step(cfg, engine, lora, with_prior)
    optim, accum = cfg.optim, cfg.train.gradient_accumulation_steps
    schedule = LRSchedule(optim.lr_scheduler, optim.lr_warmup_steps, cfg.train.max_train_steps)
    if state is not None:
        train_step.load_state_arrays(state.arrays, str(state.path))
        check_ranks_agree(parallel, parameters_bytes(list(train_step.state_parameters().items())),
                          "the resumed training state (several machines: put --save_path on a filesystem they share)")
    timings["build_s"] = round(time.perf_counter() - start_time, 2)
    rows = micro_batch_rows(cfg, with_prior)
    if cfg.train.cache_latents:
        positions = [p for micro in range(cfg.train.max_train_steps * accum)
                     for p in dataset.schedule.positions(micro, cfg.data.batch_size, parallel.rank,
                                                         parallel.world_size)]
        frozen = CachedInputs(engine, dataset, [*positions, *probe_positions(dataset)], chunk=rows,
                              train_text_encoder=lora.text_encoder, store=input_store(args),
                              identity=input_identity(cfg, weight))
        released = release_frozen_modules(engine, keep_sampling=keeps_sampling_modules(cfg, lora))
        _logger.info("released %.1f M frozen parameters no longer needed after caching", released / 1e6)
    else:
        frozen = FrozenInputs(engine, train_text_encoder=lora.text_encoder)
    writer = CheckpointWriter(save_path / "checkpoints", keep=cfg.train.max_num_ckpt, enabled=parallel.is_main,
                              metadata={"base_model": weight or "random-init", "config": args.config,
                                        "instance_prompt": args.instance_prompt,
                                        "resolution": cfg.data.resolution,
                                        "max_train_steps": cfg.train.max_train_steps,
                                        **prediction_type_metadata(engine)},
                              lora_format=cfg.lora.format, precision=cfg.lora.save_precision)
    writer.adopt_existing()  # a resumed run keeps pruning the checkpoints it wrote before the kill
    config_text = OmegaConf.to_yaml(OmegaConf.create(effective))
    if parallel.is_main:
        save_path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(save_path / "config.yaml", config_text)
    if helper is not None and wait_for_compile_helper(*helper):
        _logger.info("train step compiled in a helper process; loading it from %s", helper[1])
    probe = fixed_noise_instance_loss(
        train_step, frozen, dataset, seed=cfg.train.seed, batch_size=cfg.data.batch_size,
        # PyNative with compiled levels too: a forward-only compilation of its own would cost as much
        reuse_train_step=(ms.get_context("mode") == ms.GRAPH_MODE or is_compiled_in_pynative(
            engine.model.diffusion_model)) and not cfg.lora.dropout,
    ) if cfg.train.probe_loss else (lambda: None)
    timings["frozen_inputs_s"] = round(time.perf_counter() - start_time - timings["build_s"], 2)
    log = (save_path / "train_log.jsonl").open("a") if parallel.is_main else None
    # a resumed run keeps the first attempt's "before" loss (its LoRA is no longer the initial one)
    loss_before = state.meta.get("loss_before") if state is not None else probe()
    skipped = dict(state.meta.get("skipped", {"total": 0, "in_a_row": 0})) if state is not None else {
        "total": 0, "in_a_row": 0}
    state_every = cfg.train.checkpointing_steps or cfg.train.save_ckpt_interval

    def save_training_state(done: int) -> None:
        if not parallel.is_main:
            return
        with stop_on_disk_errors(f"the training state of step {done}"):
            folder = save_state(save_path, done, train_step.state_arrays(),
                                {"loss_before": loss_before, "skipped": skipped, "mindspore": ms.__version__},
                                config_text)
        prune_states(save_path, cfg.train.checkpoints_total_limit)
        _logger.info("step %d: training state saved to %s", done, folder)
    timings["probe_s"] = round(time.perf_counter() - start_time - timings["build_s"] - timings["frozen_inputs_s"], 2)
    if loss_before is not None:
        _logger.info("fixed-noise instance loss before training: %.6f", loss_before)
    evaluation = subject_evaluation(args, cfg, dataset) if parallel.is_main else None
    evaluated_before = evaluated_after = None
    # every evaluation of this attempt (a resumed run's earlier ones are in train_log.jsonl)
    evaluations = previous_evaluations(save_path / LOG_FILE_NAME) if state is not None else []
    if evaluation is not None:
        train_step.set_train(False)
        evaluated_before = evaluate_before(evaluation, sampler, save_path)

    # -- the loop -------------------------------------------------------------------------------
    phases = {"data_s": [], "frozen_s": [], "step_s": []}  # host batch + draws, VAE/text (or lookup), train step
    first = state.step if state is not None else 0
    bar = tqdm(range(first, cfg.train.max_train_steps), desc="training", disable=not parallel.is_main,
               initial=first, total=cfg.train.max_train_steps)
    for step in bar:
        start = time.perf_counter()
        lrs = train_step.learning_rates(schedule(step))
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = dataset.batch(step * accum + micro, cfg.data.batch_size, parallel.rank, parallel.world_size)
            posterior_noise, noise, sigmas = per_sample_draws(
                cfg.train.seed, batch["positions"], 2 if with_prior else 1,
                latent_shape(batch["instance_pixels"]), engine.denoiser, cfg.train.noise_offset)
            t1 = time.perf_counter()
            latents, cond_inputs = frozen(batch, posterior_noise)
            t2 = time.perf_counter()
            if not train_step.training:  # LoRA dropout on; probe and sampling switch it off
                train_step.set_train(True)
            loss, loss_instance, loss_class, grad_norm, overflow, _ = train_step(
                lrs, latents, ms.Tensor(noise), ms.Tensor(sigmas), *cond_inputs)
            loss.asnumpy()
            phases["data_s"].append(t1 - t0)
            phases["frozen_s"].append(t2 - t1)
            phases["step_s"].append(time.perf_counter() - t2)
        record = {"step": step + 1, "loss": float(loss.asnumpy()), "loss_instance": float(loss_instance.asnumpy()),
                  "loss_class": float(loss_class.asnumpy()), "lr": float(lrs.asnumpy()[0]),
                  "grad_norm": float(grad_norm.asnumpy()), "overflow": bool(overflow.asnumpy()),
                  "seconds": round(time.perf_counter() - start, 4)}
        skipped["total"] += record["overflow"]
        skipped["in_a_row"] = skipped["in_a_row"] + 1 if record["overflow"] else 0
        record["skipped_steps"] = skipped["total"]
        if record["overflow"]:
            _logger.warning("step %d: non-finite gradients, update skipped (%d in a row)", step + 1,
                            skipped["in_a_row"])
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        done = step + 1
        if done == first + 1:
            timings["first_step_s"] = round(time.perf_counter() - start_time, 2)
        if skipped["in_a_row"] >= cfg.train.max_skipped_steps:
            raise TrainingStopped(
                f"{skipped['in_a_row']} optimizer steps in a row had non-finite gradients (--max_skipped_steps "
                f"{cfg.train.max_skipped_steps}); stopped at step {done}. The last training state in "
                f"{save_path / 'state'} is intact: lower --learning_rate or use fp32, then resume or restart")
        if done % cfg.train.save_ckpt_interval == 0 or done == cfg.train.max_train_steps:
            with stop_on_disk_errors(f"the LoRA checkpoint of step {done}"):
                writer.save(engine, done)
        prompt = cfg.sampling.validation_prompt
        if prompt and parallel.is_main and (done % cfg.sampling.validation_steps == 0
                                            or done == cfg.train.max_train_steps):
            options = sampling_options(cfg, cfg.train.seed)
            n = cfg.sampling.num_validation_images
            engine.set_train(False)
            train_step.set_train(False)
            images = sampler([prompt] * n, options)
            save_images(images, save_path / "samples" / f"step{done:06d}", [prompt] * n, options,
                        weights=str(writer.latest))
        if evaluation is not None and (done == cfg.train.max_train_steps
                                       or (cfg.eval.steps and done % cfg.eval.steps == 0)):
            engine.set_train(False)
            train_step.set_train(False)
            report, images = evaluation.run(sampler)
            record["eval"] = report
            evaluations.append({"step": done, **report})
            _logger.info("step %d evaluation: %s", done, ", ".join(f"{k} {v:.4f}" for k, v in report.items()))
            best = best_checkpoint(evaluations)
            if best is not None and best["step"] == done and parallel.is_main:
                with stop_on_disk_errors("the best LoRA"):
                    writer.save_as(engine, save_path / BEST_LORA, done)
            if done == cfg.train.max_train_steps:
                evaluated_after = report, images
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if done % state_every == 0 or done == cfg.train.max_train_steps:
            save_training_state(done)
    loss_after = probe()
    if loss_after is not None:
        _logger.info("fixed-noise instance loss after training: %.6f (before: %.6f)", loss_after, loss_before)
    evaluated = None
    if evaluation is not None and evaluated_after is not None:
        report, images = evaluated_after
        before_report, before_images = evaluated_before
        before_after_grid(before_images, images, save_path / "before_after.png")
        evaluated = {"before": before_report, "after": report, "steps": evaluations,
                     "best_checkpoint": best_checkpoint(evaluations)}
        _logger.info("evaluation (before -> after training): %s", describe(before_report, report))
        if evaluated["best_checkpoint"]:
            best = evaluated["best_checkpoint"]
            _logger.info("best checkpoint by %s: %s (step %d, %.4f)", best["metric"], save_path / best["checkpoint"],
                         best["step"], best["value"])
        plot_run(save_path / LOG_FILE_NAME, save_path / "metrics.png")
    digests = check_ranks_agree(parallel, parameters_bytes(lora_params), "the trained LoRA weights")
    _logger.info("trained LoRA identical on all %d ranks (sha256 %s)", parallel.world_size, digests[0][:16])
    if log is not None:
        log.close()
        summary = {"steps": cfg.train.max_train_steps, "resumed_from_step": first or None,
                   "skipped_steps": skipped["total"], "latest_lora": str(writer.latest),
                   "fixed_noise_instance_loss_before": loss_before, "fixed_noise_instance_loss_after": loss_after,
                   "world_size": parallel.world_size, "lora_sha256_per_rank": digests,
                   "cached_inputs": frozen.cached, "timings": {**timings, **_median_phases(phases)},
                   "evaluation": evaluated}
        atomic_write_text(save_path / "summary.json", json.dumps(summary, indent=2))


def evaluation_enabled(cfg) -> bool:
    return bool(cfg.eval.toy_world_judge or cfg.eval.clip or cfg.eval.dino)


def subject_evaluation(args: argparse.Namespace, cfg, dataset):
    """The evaluation of ``cfg.eval`` (None when it names no judge and no CLIP/DINO model)."""
    from PIL import Image

    from gm.evaluation import JudgeMetrics, PaperMetrics, SubjectEvaluation, subject_prompts

    e = cfg.eval
    if not evaluation_enabled(cfg):
        return None
    scorers = []
    if e.toy_world_judge:
        from gm.metrics.toy_world import ToyWorldJudge

        scorers.append(JudgeMetrics(ToyWorldJudge.load(resolve_repo_path(e.toy_world_judge)), e.class_label))
    if e.clip or e.dino:
        from gm.metrics.encoders import ClipEvaluator, DinoEvaluator

        real_class = [Image.open(path).convert("RGB") for path in dataset.class_paths]
        scorers.append(PaperMetrics(ClipEvaluator(e.clip) if e.clip else None,
                                    DinoEvaluator(e.dino) if e.dino else None, real_class))
    if e.prompts:
        from gm.metrics.dreambooth import read_prompt_file

        templates = read_prompt_file(e.prompts).prompts(e.unique_token, e.class_label)
        prompts = [p for p in templates for _ in range(e.images_per_prompt)]
    else:
        prompts = subject_prompts(args.instance_prompt, list(e.subject_prompt_suffixes), e.num_images)
    real = [Image.open(path).convert("RGB") for path in dataset.instance_paths]
    return SubjectEvaluation(scorers, real, prompts, args.class_prompt or f"a photo of a {e.class_label}",
                             e.batch_size, sampling_options(cfg, cfg.train.seed))


LOG_FILE_NAME = "train_log.jsonl"
BEST_LORA = "best_lora.safetensors"  # the LoRA of the best evaluation so far, in --lora_format


def previous_evaluations(log_path: Path) -> list:
    """The evaluations a resumed run's first attempt logged (``eval`` of its step records)."""
    if not log_path.is_file():
        return []
    out = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if isinstance(record.get("eval"), dict):
            out.append({"step": record["step"], **record["eval"]})
    return out


def best_checkpoint(evaluations: list) -> Optional[dict]:
    """The evaluated step with the highest DINO (else CLIP-I, else the judge's subject fidelity)."""
    from gm.evaluation import best_metric

    ranked = [(best_metric(e), e) for e in evaluations]
    ranked = [(m, e) for m, e in ranked if m is not None]
    if not ranked:
        return None
    (name, value), best = max(ranked, key=lambda item: item[0][1])
    return {"metric": name, "value": value, "step": best["step"], "checkpoint": BEST_LORA}


def evaluate_before(evaluation, sampler, save_path: Path):
    """The base model's report and images, kept in --save_path/eval_before.npz so that a resumed run
    (whose LoRA is no longer zero) compares against the same "before"."""
    import numpy as np

    from gm.evaluation import EvaluationImages

    cache = save_path / "eval_before.npz"
    if cache.is_file():
        data = np.load(cache)
        return json.loads(str(data["report"])), EvaluationImages(data["subject"], data["klass"])
    report, images = evaluation.run(sampler)
    save_path.mkdir(parents=True, exist_ok=True)
    tmp = save_path / "eval_before.tmp.npz"
    np.savez(tmp, report=json.dumps(report), subject=images.subject, klass=images.klass)
    tmp.replace(cache)
    _logger.info("evaluation of the base model: %s", ", ".join(f"{k} {v:.3f}" for k, v in report.items()))
    return report, images


@contextlib.contextmanager
def stop_on_disk_errors(what: str):
    """An OSError while saving (full disk, read-only folder) ends the run with one line; writes
    are atomic, so what was saved before is intact."""
    try:
        yield
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        raise TrainingStopped(f"could not write {what} ({err.strerror or err}{where}); earlier checkpoints are "
                              "intact -- free some space, then continue with --resume_from_checkpoint latest") from None


def _median_phases(phases) -> dict:
    """Median seconds per micro-batch of each loop phase, after the first step (compilation)."""
    import statistics

    return {f"median_{name}": round(statistics.median(values[1:] or values), 4) for name, values in phases.items()}


if __name__ == "__main__":
    run_cli(main)
