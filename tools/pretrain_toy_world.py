"""Pretrain the tiny SDXL from scratch on the toy world: the VAE, then the UNet; resumable.

    python tools/pretrain_toy_world.py --out runs/toy_world                      # configs/pretrain/toy_world.yaml
    python tools/pretrain_toy_world.py --out runs/toy_world --vae_steps 20 --unet_steps 20   # a smoke run

Both stages run this project's own model code and training step (``gm.train_step.TrainStep``,
AdamW, clipping): the VAE (reconstruction + KL, ``gm.models.autoencoder.AutoencoderLoss``) on
the world's photos, its latent space then rescaled so the config's ``scale_factor`` gives
unit-variance latents, then every UNet weight with the SDXL denoising loss on the VAE's latents
of the same photos and their captions (10% dropped to the unconditional embedding), with both
text encoders trained alongside (``unet.train_text_encoders``; off, they keep their seeded
initialisation and the UNet must learn to read their random features). A killed run continues
from its newest state in ``--out/<stage>/state`` when started again with the same command. The result is
``--out/sd_xl_toy_world.safetensors`` (official single-file names, ``save.dtype``) and
``--out/MODEL_CARD.md`` (data, steps, losses, seed, time, the command that reproduces it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from gm.cli import run_cli, setup_logging  # noqa: E402
from gm.errors import ConfigError  # noqa: E402

_logger = logging.getLogger("gm.pretrain")
DEFAULT_CONFIG = REPO / "configs" / "pretrain" / "toy_world.yaml"
OUTPUT_NAME = "sd_xl_toy_world.safetensors"
JUDGE_NAME = "toy_world_judge.safetensors"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder: world photos, stage states, the result")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--vae_steps", type=int, help="override vae.steps")
    parser.add_argument("--unet_steps", type=int, help="override unet.steps")
    parser.add_argument("--unet_refine_steps", type=int,
                        help="override unet_refine.steps (a warm restart of the UNet stage; 0: none)")
    parser.add_argument("--num_images", type=int, help="override data.num_images")
    parser.add_argument("--device_target", default="CPU", choices=["CPU", "GPU", "Ascend"])
    parser.add_argument("--ms_mode", type=int, default=0, choices=[0, 1], help="0: graph mode, 1: PyNative")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override any config value, e.g. --set quality.images_per_class=8 judge.epochs=10")
    parser.add_argument("--vae_from", default=None, metavar="WEIGHTS",
                        help="skip the VAE stage: take the VAE of this single file (e.g. an earlier base's "
                             ".safetensors of this config); its held-out reconstruction is measured again")
    parser.add_argument("--judge_from", default=None, metavar="JUDGE",
                        help="skip training the judge: use this judge file (it reads images through the VAE "
                             "it was trained with, so pair it with --vae_from); its held-out accuracy is "
                             "measured again")
    args = parser.parse_args(argv)
    for flag in ("vae_from", "judge_from"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"--{flag} {value}: no such file")
    return args


def load_pretrain_config(args: argparse.Namespace):
    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    cfg = OmegaConf.load(path)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or OmegaConf.select(cfg, key) is None:
            raise ConfigError(f"--set {item}: expected KEY=VALUE with a KEY of {path}")
        OmegaConf.update(cfg, key, yaml_value(value))
    for flag, key, least in (("vae_steps", "vae.steps", 1), ("unet_steps", "unet.steps", 1),
                             ("unet_refine_steps", "unet_refine.steps", 0), ("num_images", "data.num_images", 1)):
        value = getattr(args, flag)
        if value is not None:
            if value < least:
                raise ConfigError(f"--{flag} {value}: must be >= {least}")
            OmegaConf.update(cfg, key, value)
    return cfg


def yaml_value(text: str):
    """``--set`` values are read as YAML scalars: 8 -> int, 1e-3 -> float, true -> bool."""
    import yaml

    return yaml.safe_load(text)


# -- the data -----------------------------------------------------------------------------------

def world_photos(out: Path, count: int, resolution: int, seed: int,
                 omit_rate: float = 0.0) -> Tuple[np.ndarray, List[str]]:
    """Photos 0..count-1 of the world as uint8 (N, R, R, 3) and their captions (each attribute left
    out at ``omit_rate``, :func:`gm.data.toy_world.world_caption`), rendered once into
    ``out/world_<seed>_<count>_<R>[_omit<percent>].npz``."""
    from gm.data.toy_world import render_world_photo, world_caption

    omitted = f"_omit{round(omit_rate * 100)}" if omit_rate else ""
    cache = out / f"world_{seed}_{count}_{resolution}{omitted}.npz"
    if cache.is_file():
        data = np.load(cache)
        return data["images"], [str(c) for c in data["captions"]]
    images, captions = [], []
    for index in range(count):
        photo, item = render_world_photo(index, size=resolution, seed=seed)
        images.append(np.asarray(photo))
        captions.append(world_caption(item, index, seed=seed, omit_rate=omit_rate))
    images = np.stack(images)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, captions=np.array(captions))
    tmp.replace(cache)
    _logger.info("rendered %d toy-world photos at %dx%d", count, resolution, resolution)
    return images, captions


def to_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, R, R, 3) -> float32 (N, 3, R, R) in [-1, 1]."""
    return (images.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


# -- one resumable stage ------------------------------------------------------------------------

def run_stage(name: str, out: Path, step_cell, batch: Callable[[int], Sequence], steps: int, schedule,
              save_cfg, config_text: str) -> Dict[str, float]:
    """Train ``steps`` updates of ``step_cell`` (a TrainStep) on ``batch(step)``, resuming from
    ``out/name/state``; returns the mean losses of the last ``log_every`` steps."""
    from mindspore import Tensor
    from tqdm import tqdm

    from gm.train_state import load_state, prune_states, save_state, state_folders, verify_state

    folder = out / name
    first = 0
    # The newest good state at or before ``steps``: a smaller step count ships an earlier state.
    good = [f for f in state_folders(folder) if int(f.name.split("_")[-1]) <= steps and verify_state(f) is None]
    if good:
        state = load_state(good[-1])
        check_same_stage_config(name, state.path, state.config_text, config_text)
        step_cell.load_state_arrays(state.arrays, str(state.path))
        first = state.step
        _logger.info("%s: resuming from %s (step %d of %d)", name, state.path, first, steps)
    recent: List[Tuple[float, float, float]] = []
    log = (folder / "log.jsonl")
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("a") as log_file:
        for step in tqdm(range(first, steps), desc=name, initial=first, total=steps):
            rate = schedule(step)
            out_ = step_cell(step_cell.learning_rates(rate), *(Tensor(a) for a in batch(step)))
            loss, first_part, second_part = (float(t.asnumpy()) for t in out_[:3])
            if not np.isfinite(loss):
                raise ConfigError(f"{name} step {step + 1}: the loss is {loss}; lower the learning rate in the "
                                  f"config and start again (the last state in {folder / 'state'} is intact)")
            recent = (recent + [(loss, first_part, second_part)])[-save_cfg.log_every:]
            done = step + 1
            if done % save_cfg.log_every == 0 or done == steps:
                means = np.mean(recent, axis=0)
                log_file.write(json.dumps({"step": done, "loss": means[0], "parts": means[1:].tolist(),
                                           "lr_scale": rate, "seconds": round(time.perf_counter() - start, 1)})
                               + "\n")
                log_file.flush()
            if done % save_cfg.state_every == 0 or done == steps:
                save_state(folder, done, step_cell.state_arrays(), {"stage": name}, config_text)
                prune_states(folder, save_cfg.keep_states)
    if recent:
        means = np.mean(recent, axis=0)
    else:  # resumed at the last step (e.g. to ship an earlier state with a smaller --unet_steps)
        last = [r for r in log_rows(log) if r["step"] == steps]
        means = [last[-1]["loss"], *last[-1]["parts"]] if last else [np.nan] * 3
    return {"loss": float(means[0]), "part_1": float(means[1]), "part_2": float(means[2]),
            "seconds": stage_seconds(log, steps)}


def stage_scheduler(section) -> str:
    """A stage's ``lr_scheduler``; stage configs written before they had one trained at a constant rate."""
    return section.get("lr_scheduler", "constant")


def stage_schedule(section):
    """The learning-rate multiplier of a stage config section (``steps``, ``lr_scheduler``, ``lr_warmup_steps``)."""
    from gm.optim import LRSchedule

    return LRSchedule(stage_scheduler(section), section.get("lr_warmup_steps", 0), section.steps)


# Settings added to a stage after runs were saved without them: their value in those runs.
STAGE_DEFAULTS = {"vae": {"noise_warmup_steps": 0}}


def check_same_stage_config(name: str, state_path: Path, saved_text: str, config_text: str) -> None:
    """A stage resumes only under the settings it was trained with; ``steps`` may differ only on a
    constant learning rate (a decaying one was planned for the saved run's length)."""
    from gm.run_folder import config_changes

    defaults = STAGE_DEFAULTS.get(name, {})
    saved, current = ({**defaults, **OmegaConf.to_container(OmegaConf.create(text)[name], resolve=True)}
                      for text in (saved_text, config_text))
    changes = config_changes(saved, current)
    if [key for key, _, _ in changes] == ["steps"] and stage_scheduler(current) in (
            "constant", "constant_with_warmup"):
        return
    if changes:
        raise ConfigError(f"{state_path}: trained with {name}." + ", ".join(f"{k}={then}" for k, then, _ in changes)
                          + f", not {', '.join(f'{k}={now}' for k, _, now in changes)}; pass the same settings "
                          "or start a new --out")


def log_rows(log: Path) -> List[dict]:
    """A stage's ``log.jsonl`` rows, oldest first (none before its first run)."""
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def stage_seconds(log: Path, steps: int) -> float:
    """Training seconds of a stage over all its (resumed) runs: each run's log rows count its own
    seconds from its start, so a run's time is its last row's, up to step ``steps``."""
    total, previous = 0.0, 0.0
    for row in (r for r in log_rows(log) if r["step"] <= steps):
        if row["seconds"] < previous:  # a resumed run starts counting again
            total += previous
        previous = row["seconds"]
    return round(total + previous, 1)


def trainable_only(cells: Sequence, engine) -> list:
    """Mark every parameter of ``cells`` trainable and every other parameter of ``engine`` frozen."""
    chosen = {id(p) for cell in cells for p in cell.get_parameters()}
    params = []
    for param in engine.get_parameters():
        param.requires_grad = id(param) in chosen
        if param.requires_grad:
            params.append(param)
    return params


# -- the stages ---------------------------------------------------------------------------------

def train_vae(engine, pixels: np.ndarray, cfg, out: Path, config_text: str) -> Dict[str, float]:
    from gm.models.autoencoder import AutoencoderLoss
    from gm.optim import build_optimizer
    from gm.train_step import TrainStep

    vae = engine.first_stage_model
    params = trainable_only([vae], engine)
    step = TrainStep(AutoencoderLoss(vae, cfg.vae.kl_weight),
                     build_optimizer([{"params": params, "lr": cfg.vae.learning_rate,
                                       "weight_decay": cfg.vae.weight_decay}]),
                     max_grad_norm=cfg.vae.max_grad_norm)
    # The VAE is convolutional (its one attention layer works at any size): training on crops costs
    # (crop / resolution)^2 of the full photos, as SD's VAE was trained at 256 and is used at 1024.
    crop = int(cfg.vae.get("crop") or pixels.shape[2])
    if crop % 8 or not 8 <= crop <= pixels.shape[2]:
        raise ConfigError(f"vae.crop {crop}: must be a multiple of 8 from 8 to data.resolution {pixels.shape[2]}")
    return run_stage("vae", out, step, lambda i: vae_batch(pixels, cfg, i, crop, vae.embed_dim), cfg.vae.steps,
                     stage_schedule(cfg.vae), cfg.save, config_text)


def vae_batch(pixels: np.ndarray, cfg, step: int, crop: int, channels: int) -> Tuple[np.ndarray, np.ndarray]:
    """The VAE stage's batch ``step``: random ``crop`` squares of the photos and the posterior's noise
    (``channels`` latent channels), drawn from ``(data.seed, step)``. Over the first
    ``vae.noise_warmup_steps`` the noise grows linearly from 0: a fresh encoder's latents are far
    smaller than the unit noise of its initial posterior, which then hides the photo from the
    decoder (measured: held-out MAE 24.2/255 after 500 steps without the noise, 27.4-28.7 with it)."""
    rng = np.random.default_rng([cfg.data.seed, 1, step])
    idx = rng.integers(0, len(pixels), cfg.vae.batch_size)
    corners = rng.integers(0, pixels.shape[2] - crop + 1, (len(idx), 2))
    crops = np.stack([pixels[j, :, y:y + crop, x:x + crop] for j, (y, x) in zip(idx, corners)])
    noise = rng.standard_normal((len(idx), channels, crop // 8, crop // 8), dtype=np.float32)
    warmup = int(cfg.vae.get("noise_warmup_steps", STAGE_DEFAULTS["vae"]["noise_warmup_steps"]))
    if step < warmup:
        noise *= step / warmup
    return crops, noise


def encode_all(engine, pixels: np.ndarray, chunk: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """Posterior (mean, std) of every image, eagerly."""
    from mindspore import Tensor

    from gm.frozen_inputs import EncodeMoments, eager

    encode = EncodeMoments(engine)
    means, stds = [], []
    with eager():
        for start in range(0, len(pixels), chunk):
            mean, std = encode(Tensor(pixels[start:start + chunk]))
            means.append(mean.asnumpy())
            stds.append(std.asnumpy())
    return np.concatenate(means), np.concatenate(stds)


def fit_latent_scale(engine, pixels: np.ndarray) -> float:
    """Rescale the trained VAE's latent space so that ``scale_factor`` x latents has unit std."""
    from gm.models.autoencoder import rescale_latent_space

    mean, std = encode_all(engine, pixels[:512])
    spread = float(np.sqrt(np.mean(mean ** 2 + std ** 2)))  # std of a posterior sample (zero-mean assumed)
    factor = 1.0 / (engine.scale_factor * spread)
    rescale_latent_space(engine.first_stage_model, factor)
    _logger.info("latent spread %.4f: VAE latent space rescaled by %.4f for scale_factor %.5f",
                 spread, factor, engine.scale_factor)
    return factor


def heldout_reconstruction(engine, images: np.ndarray) -> Dict[str, float]:
    """Mean absolute error (0-255 scale) and PSNR (dB) of the VAE's reconstruction (posterior mean,
    as uint8 photos) of ``images``, uint8 (N, R, R, 3) photos the VAE never trained on."""
    errors = vae_round_trip(engine, images).astype(np.float32) - images.astype(np.float32)
    mse = float(np.mean(errors ** 2))
    return {"heldout_images": len(images), "heldout_mae_255": float(np.mean(np.abs(errors))),
            "heldout_psnr_db": float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))}


def conditioning_table(engine, distinct: List[str], resolution: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                              np.ndarray]:
    """``(crossattn, vector)`` of each of the ``distinct`` captions, in order, and the unconditional
    pair (text zeroed, as sampling's)."""
    from gm.frozen_inputs import eager

    crossattn, vector = [], []
    with eager():
        for start in range(0, len(distinct), 32):
            batch = size_batch(distinct[start:start + 32], resolution)
            cond, uncond = engine.conditioner.get_unconditional_conditioning(batch)
            crossattn.append(cond["crossattn"].asnumpy())
            vector.append(cond["vector"].asnumpy())
        uncond_crossattn, uncond_vector = uncond["crossattn"].asnumpy()[:1], uncond["vector"].asnumpy()[:1]
    return np.concatenate(crossattn), np.concatenate(vector), uncond_crossattn, uncond_vector


def size_batch(captions: List[str], resolution: int) -> Dict[str, object]:
    """The conditioner's batch for square photos shown whole (SDXL's micro-conditioning at ``resolution``)."""
    size = np.array([[resolution, resolution]], np.float32)
    return {"txt": captions, "original_size_as_tuple": size, "crop_coords_top_left": np.zeros((1, 2), np.float32),
            "target_size_as_tuple": size}


def text_encoders(engine) -> list:
    """The conditioner's embedders that read the caption (both CLIPs), made trainable in the graph."""
    conditioner = engine.conditioner
    chosen = [i for i, key in enumerate(conditioner.input_keys) if key == "txt"]
    for i in chosen:
        conditioner.embedders[i].is_trainable = True
    conditioner.frozen = tuple(frozen and i not in chosen for i, frozen in enumerate(conditioner.frozen))
    return [conditioner.embedders[i] for i in chosen]


def train_unet(engine, pixels: np.ndarray, captions: List[str], cfg, out: Path,
               config_text: str) -> Dict[str, Dict[str, float]]:
    """The UNet stage, then its warm restart (``unet_refine``) when that has steps; each stage's result."""
    from gm.frozen_inputs import sample_latents
    from gm.modules.cpu_kernels import fold_batch_into_matmul
    from gm.modules.diffusionmodules.loss import CaptionDropConditioning, DreamBoothLoss, sample_noise_and_sigmas
    from gm.optim import build_optimizer, parameter_groups
    from gm.train_step import TrainStep

    # the posterior of every photo (eager; 8192 photos in ~1.5 min on 2 cores with the oneDNN
    # convolutions, ~20 min before them), kept so that a resumed run skips it
    cache = out / "unet" / "vae_moments.npz"
    if cache.is_file():
        moments = np.load(cache)
        mean, std = moments["mean"], moments["std"]
    else:
        mean, std = encode_all(engine, pixels)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache.with_suffix(".tmp.npz"), mean=mean, std=std)
        cache.with_suffix(".tmp.npz").replace(cache)
    u = cfg.unet
    train_text = bool(u.get("train_text_encoders", False))
    # Frozen text encoders: their outputs per distinct caption, once. Trained ones: the caption's
    # token ids go into the graph, and a dropped caption's text is zeroed there.
    distinct = sorted(set(captions))
    rows = np.array([{c: i for i, c in enumerate(distinct)}[c] for c in captions])
    if train_text:
        conditioner = engine.conditioner
        arrays = conditioner.prepare_arrays(size_batch(distinct, cfg.data.resolution))
        keep = conditioner.keep_masks(arrays, {"txt"})
        text_columns = tuple((1.0 - keep[key])[None].astype(np.float32) for key in ("crossattn", "vector"))
        trainable_only([engine.model, *text_encoders(engine)], engine)
    else:
        crossattn, vector, uncond_crossattn, uncond_vector = conditioning_table(engine, distinct, cfg.data.resolution)
        trainable_only([engine.model], engine)
    # set before the UNet's training graph is built (the VAE's stage and the encoding ran per sample)
    fold_batch_into_matmul(cfg.kernels.unet_fold_batch)
    loss = DreamBoothLoss(engine, with_prior_preservation=False, train_text_encoder=train_text)
    if train_text:
        loss.conditioning = CaptionDropConditioning(engine.conditioner, text_columns)
    step = TrainStep(loss, build_optimizer(parameter_groups(engine, learning_rate=u.learning_rate,
                                                            weight_decay=u.weight_decay)),
                     max_grad_norm=u.max_grad_norm)

    def batches(stream: int):
        return lambda i: batch(np.random.default_rng([cfg.data.seed, stream, i]))

    def batch(rng):
        idx = rng.integers(0, len(pixels), u.batch_size)
        latents = sample_latents(mean[idx], std[idx], rng.standard_normal(mean[idx].shape, dtype=np.float32),
                                 engine.scale_factor)
        noise, sigmas = sample_noise_and_sigmas(rng, latents.shape, engine.denoiser)
        drop = rng.random(len(idx)) < u.ucg_rate
        if train_text:
            return (latents, noise, sigmas, *(a[rows[idx]] for a in arrays), drop.astype(np.float32))
        ctx = np.where(drop[:, None, None], uncond_crossattn, crossattn[rows[idx]])
        vec = np.where(drop[:, None], uncond_vector, vector[rows[idx]])
        return latents, noise, sigmas, ctx.astype(np.float32), vec.astype(np.float32)

    results = {"unet": run_stage("unet", out, step, batches(2), u.steps,
                                 stage_schedule(u), cfg.save, config_text)}
    r = cfg.get("unet_refine")
    if r is not None and r.steps > 0:
        # A warm restart: the same step (its Adam moments carry over) on fresh batches, under a new
        # schedule of its own peak, so a finished cosine run trains on without starting over.
        restart = stage_schedule(r)
        scale = r.learning_rate / u.learning_rate
        results["unet_refine"] = run_stage("unet_refine", out, step, batches(3), r.steps,
                                           lambda i: scale * restart(i), cfg.save, config_text)
    return results


def vae_round_trip(engine, images: np.ndarray, chunk: int = 64) -> np.ndarray:
    """uint8 photos (N, R, R, 3) as the trained VAE reproduces them (posterior mean, decoded)."""
    from mindspore import Tensor

    from gm.frozen_inputs import eager

    out = []
    with eager():
        for start in range(0, len(images), chunk):
            decoded = engine.first_stage_model(Tensor(to_pixels(images[start:start + chunk]))).asnumpy()
            out.append(np.clip((decoded.transpose(0, 2, 3, 1) + 1.0) * 127.5, 0, 255).round().astype(np.uint8))
    return np.concatenate(out)


def _judge_photos_seen_through_vae(engine, cfg, count: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`gm.metrics.toy_world.judge_photos`, a ``judge.vae_share`` of them as the VAE
    reproduces them: the judge reads generated images, which can be no sharper than that. Drawn at
    the world's resolution, as the VAE and the samples see the world."""
    from gm.metrics.toy_world import judge_photos

    images, targets = judge_photos(count, seed, cfg.data.resolution)
    chosen = np.random.default_rng([seed, 0x5AE]).random(len(images)) < cfg.judge.vae_share
    if chosen.any():
        images = images.copy()
        images[chosen] = vae_round_trip(engine, images[chosen])
    return images, targets


def train_judge(engine, cfg, out: Path, judge_from: Path | None = None) -> Dict[str, float]:
    """Train the toy world's judge (``gm.metrics.toy_world``) on its own photos (or take the one of
    ``judge_from``) and score it on photos of yet another seed; writes ``out/JUDGE_NAME``."""
    import shutil

    from gm.metrics.toy_world import HEADS, ToyWorldJudge

    j = cfg.judge
    if judge_from is not None:
        judge = ToyWorldJudge.load(judge_from)
        shutil.copyfile(judge_from, out / JUDGE_NAME)
    else:
        images, targets = _judge_photos_seen_through_vae(engine, cfg, j.photos_per_label, j.seed)
        judge = ToyWorldJudge.fit(images, targets, hidden=j.hidden, epochs=j.epochs, seed=j.seed)
        judge.save(out / JUDGE_NAME)
    test_images, test_targets = _judge_photos_seen_through_vae(engine, cfg, j.test_photos_per_label, j.test_seed)
    result = {f"{head}_accuracy": float(np.mean(judge.predict(test_images, head) ==
                                                np.array(names)[test_targets[:, k]]))
              for k, (head, names) in enumerate(HEADS.items())}
    result["test_photos"] = len(test_images)
    if judge_from is not None:
        result["reused_from"] = str(judge_from)
    _logger.info("judge: held-out accuracy %s", result)
    return result


def base_quality(engine, cfg, out: Path) -> Dict[str, object]:
    """Sample ``quality.images_per_class`` images of "a photo of a <class>" for every class and read
    them with the judge: the share recognised as their class. Writes ``out/base_samples.png``."""
    from gm.data.toy_world import CLASSES
    from gm.inference import Sampler, SamplingOptions, make_grid
    from gm.metrics.toy_world import ToyWorldJudge

    q = cfg.quality
    judge = ToyWorldJudge.load(out / JUDGE_NAME)
    sampler = Sampler(engine)
    engine.set_train(False)
    result: Dict[str, object] = {"images_per_class": q.images_per_class, "sampler": q.sampler,
                                 "num_steps": q.num_steps, "guidance_scale": q.guidance_scale}
    grid_rows = []
    for k, cls in enumerate(CLASSES):
        images = []
        for start in range(0, q.images_per_class, q.batch_size):
            options = SamplingOptions(sampler=q.sampler, num_steps=q.num_steps, guidance_scale=q.guidance_scale,
                                      height=cfg.data.resolution, width=cfg.data.resolution,
                                      seed=q.seed + 1000 * k + start)
            count = min(q.batch_size, q.images_per_class - start)
            images.append(sampler([f"a photo of a {cls}"] * count, options))
        images = np.concatenate(images)
        result[f"{cls}_accuracy"] = judge.accuracy(images, cls)
        result[f"{cls}_diversity"] = judge.diversity(images)
        grid_rows.append(images[:8])
    result["mean_accuracy"] = float(np.mean([result[f"{c}_accuracy"] for c in CLASSES]))
    make_grid(np.concatenate(grid_rows), cols=8).save(out / "base_samples.png")
    _logger.info("base model: class-prompt samples read by the judge %s", result)
    return result


def load_vae(engine, path: Path, whole_model: bool = False) -> None:
    """The VAE weights the first stage saved (official names, ``first_stage_model.*`` only), or with
    ``whole_model`` the VAE part of a whole single file of this config (``--vae_from``)."""
    from safetensors import safe_open

    from gm.checkpoint.load import assign_parameters, engine_state

    expected = {k for k in engine_state(engine) if k.startswith("first_stage_model.")}
    with safe_open(str(path), "np") as f:
        found = {k for k in f.keys() if k.startswith("first_stage_model.")} if whole_model else set(f.keys())
        if found != expected:
            hint = "give a base of this model config" if whole_model else "delete it to retrain the VAE stage"
            raise ConfigError(f"{path}: not this config's VAE weights; {hint}")
        assign_parameters(engine, ((k, f.get_tensor(k).astype(np.float32)) for k in sorted(expected)))


def _stage_notes(name: str, result: Dict[str, float], cfg) -> str:
    """The model card's "parts" column of one stage."""
    if name == "vae":
        return (f"reconstruction L1 {result['part_1']:.4f}, KL {result['part_2']:.4f}; held-out "
                f"({result['heldout_images']} photos): MAE {result['heldout_mae_255']:.2f}/255, PSNR "
                f"{result['heldout_psnr_db']:.2f} dB")
    if name == "unet_refine":
        return f"warm restart from the unet stage's result, learning rate {cfg[name].learning_rate}"
    return "-"


def write_model_card(out: Path, cfg, results: Dict[str, Dict[str, float]], argv: Sequence[str], seconds: float) -> None:
    lines = [
        "# sd_xl_toy_world: the tiny SDXL pretrained on the toy world",
        "",
        f"Model: `{cfg.model_config}` (SDXL topology at small width), official single-file names, "
        f"{cfg.save.dtype}, {cfg.unet.get('prediction_type') or 'epsilon'} prediction. Data: "
        f"{cfg.data.num_images} photos of `gm.data.toy_world` at "
        f"{cfg.data.resolution}x{cfg.data.resolution}, seed {cfg.data.seed} (classes toy, ball, cup, dog; "
        "the DreamBooth subject, a red/yellow striped robot, never appears).",
        "",
        "| stage | steps | final loss (mean of the last steps) | parts | seconds |",
        "|---|---|---|---|---|",
    ]
    stages = [name for name in ("vae", "unet", "unet_refine") if name in results]
    for name in stages:
        r = results[name]
        if "reused_from" in r:
            lines.append(f"| {name} | taken from `{r['reused_from']}` (`--vae_from`) | - | held-out "
                         f"({r['heldout_images']} photos): MAE {r['heldout_mae_255']:.2f}/255, PSNR "
                         f"{r['heldout_psnr_db']:.2f} dB | 0 |")
            continue
        lines.append(f"| {name} | {cfg[name].steps} | {r['loss']:.4f} | {_stage_notes(name, r, cfg)} | "
                     f"{r['seconds']} |")
    judge, quality = results["judge"], results["quality"]
    reused = f", taken from `{judge['reused_from']}` (`--judge_from`)" if "reused_from" in judge else ""
    lines += ["", f"Judge (`{JUDGE_NAME}`, `gm.metrics.toy_world`{reused}): held-out accuracy on "
              f"{judge['test_photos']} photos: label {judge['label_accuracy']:.3f}, "
              f"colour {judge['colour_accuracy']:.3f}, "
              f"pattern {judge['pattern_accuracy']:.3f}.", "",
              f"Base model quality: {quality['images_per_class']} samples per class prompt \"a photo of a "
              f"<class>\" ({quality['sampler']}, {quality['num_steps']} steps, guidance "
              f"{quality['guidance_scale']}), read by the judge (`base_samples.png`: 8 per class, one row each):",
              "", "| class | recognised as the class | diversity |", "|---|---|---|"]
    from gm.data.toy_world import CLASSES

    for cls in CLASSES:
        lines.append(f"| {cls} | {quality[cls + '_accuracy']:.3f} | {quality[cls + '_diversity']:.3f} |")
    lines.append(f"| mean | {quality['mean_accuracy']:.3f} | |")
    trained = sum(results[stage]["seconds"] for stage in stages)
    lines += ["", f"Training time: {trained / 3600:.2f} h over all (resumed) runs; this run took "
              f"{seconds / 3600:.2f} h (with the judge and the sampling). "
              "Reproduce (same machine type, same MindSpore) with:",
              "", "```bash", "python tools/pretrain_toy_world.py " + " ".join(argv), "```", "",
              "Config:", "", "```yaml", OmegaConf.to_yaml(cfg).rstrip(), "```", ""]
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = load_pretrain_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import mindspore as ms

    from gm.checkpoint.load import engine_state
    from gm.checkpoint.prediction_type import marker_arrays, marker_metadata
    from gm.checkpoint.save import save_weights
    from gm.inference import set_mode
    from gm.models.diffusion import build_engine

    set_mode(args.ms_mode, args.device_target)
    started = time.perf_counter()
    config_text = OmegaConf.to_yaml(cfg)
    count = cfg.data.num_images
    images, captions = world_photos(out, count + cfg.data.heldout_images, cfg.data.resolution, cfg.data.seed,
                                    cfg.data.get("caption_omit_rate", 0.0))
    images, captions, heldout = images[:count], captions[:count], images[count:]
    pixels = to_pixels(images)
    ms.set_seed(cfg.data.seed)
    engine = build_engine(REPO / cfg.model_config)
    prediction_type = cfg.unet.get("prediction_type") or engine.denoiser.scaling.prediction_type
    engine.denoiser.set_prediction_type(prediction_type)
    results = {}
    vae_file = out / "vae" / "vae_rescaled.safetensors"
    if vae_file.is_file():
        load_vae(engine, vae_file)
        _logger.info("vae: trained and rescaled weights from %s", vae_file)
        results["vae"] = json.loads((out / "vae" / "result.json").read_text())
    else:
        if args.vae_from:
            load_vae(engine, Path(args.vae_from), whole_model=True)
            _logger.info("vae: the VAE of %s", args.vae_from)
            results["vae"] = {"reused_from": args.vae_from, "seconds": 0.0}
        else:
            results["vae"] = train_vae(engine, pixels, cfg, out, config_text)
            results["vae"]["latent_rescale"] = fit_latent_scale(engine, pixels)
        results["vae"].update(heldout_reconstruction(engine, heldout))  # photos num_images.. of the world
        _logger.info("vae: held-out reconstruction %s", results["vae"])
        vae = {k: v for k, v in engine_state(engine).items() if k.startswith("first_stage_model.")}
        save_weights(vae.items(), vae_file)
        (out / "vae" / "result.json").write_text(json.dumps(results["vae"]))
    results.update(train_unet(engine, pixels, captions, cfg, out, config_text))
    if not (out / JUDGE_NAME).is_file() or not (out / "judge.json").is_file():
        judge_from = Path(args.judge_from) if args.judge_from else None
        (out / "judge.json").write_text(json.dumps(train_judge(engine, cfg, out, judge_from)))
    results["judge"] = json.loads((out / "judge.json").read_text())
    results["quality"] = base_quality(engine, cfg, out)
    # a v-prediction base says so as other tools read it (gm.checkpoint.prediction_type)
    save_weights(itertools.chain(engine_state(engine).items(), marker_arrays(prediction_type).items()),
                 out / OUTPUT_NAME, cfg.save.dtype,
                 metadata={"modelspec.title": "sd_xl_toy_world", **marker_metadata(prediction_type),
                           "pretrain_config": json.dumps(OmegaConf.to_container(cfg, resolve=True))})
    write_model_card(out, cfg, results, argv, time.perf_counter() - started)
    _logger.info("wrote %s and %s", out / OUTPUT_NAME, out / "MODEL_CARD.md")


if __name__ == "__main__":
    run_cli(main)
