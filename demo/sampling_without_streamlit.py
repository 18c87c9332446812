"""Sample SDXL images from the command line (txt2img or img2img).

    python demo/sampling_without_streamlit.py --weight sd_xl_base_1.0.safetensors \
        --prompt "a photo of an astronaut riding a horse" --sd_xl_base_ratios 1.0

    # with a LoRA trained by train_dreambooth.py: base weights first, then the LoRA file
    python demo/sampling_without_streamlit.py --weight sd_xl_base_1.0.safetensors,out/sks_dog_lora.safetensors \
        --prompt "a photo of sks dog in a bucket"

    # several LoRAs (any format: kohya, diffusers, the seed's ckpt, ours), one scale each
    python demo/sampling_without_streamlit.py --weight sd_xl_base_1.0.safetensors,sks.safetensors,style.safetensors \
        --lora_scale 1.0 0.6 --prompt "a photo of sks dog in a bucket"

    # reproduce another implementation's image exactly from its starting noise
    python demo/sampling_without_streamlit.py --weight sdxl-folder/ --prompt prompt.txt \
        --init_latent_path latents.npy --sampler EulerEDMSampler --sample_step 40

Writes one PNG per image (prompt, negative prompt, seed, sampler, steps, guidance and weights in
the PNG text metadata) and a grid per prompt into --save_path.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from gm.checkpoint.lora_merge import load_base_with_loras  # noqa: E402
from gm.cli import run_cli, setup_logging  # noqa: E402
from gm.errors import ConfigError  # noqa: E402
from gm.inference import (  # noqa: E402
    DISCRETIZATIONS,
    SAMPLERS,
    Sampler,
    SamplingOptions,
    next_image_index,
    save_images,
    set_mode,
)
from gm.models.diffusion import build_engine  # noqa: E402
from gm.modules.diffusionmodules.denoiser_scaling import PREDICTION_TYPES  # noqa: E402
from gm.modules.pynative_jit import apply_pynative_jit  # noqa: E402
from gm.precision import PRECISIONS, apply_mixed_precision  # noqa: E402

_logger = logging.getLogger("gm.sampling")

# SDXL's training aspect-ratio buckets: "width/height" -> (width, height) (Stability's sgm table).
SD_XL_BASE_RATIOS = {
    "0.5": (704, 1408), "0.52": (704, 1344), "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216),
    "0.72": (832, 1152), "0.78": (896, 1152), "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024),
    "1.0": (1024, 1024), "1.07": (1024, 960), "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896),
    "1.38": (1152, 832), "1.46": (1216, 832), "1.67": (1280, 768), "1.75": (1344, 768), "1.91": (1344, 704),
    "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640), "2.5": (1600, 640), "2.89": (1664, 576),
    "3.0": (1728, 576),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="txt2img", choices=["txt2img", "img2img"])
    p.add_argument("--config", default=str(REPO / "configs" / "inference" / "sd_xl_base.yaml"))
    p.add_argument("--weight", default="",
                   help="base weights (official .safetensors, diffusers folder or .ckpt), optionally followed by "
                        "',' and one or more LoRA files (any format: kohya, diffusers, the seed's ckpt, ours)")
    p.add_argument("--lora_scale", type=float, nargs="+", default=None,
                   help="one scale per LoRA in --weight (default 1.0 each)")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars",
                   help="a prompt, or a .txt file with one prompt per line")
    p.add_argument("--negative_prompt", default="", help="empty: zero text embeddings, as SDXL base")
    p.add_argument("--prediction_type", default=None, choices=PREDICTION_TYPES,
                   help="what the UNet predicts (default: what --weight declares, else --config's)")
    p.add_argument("--sampler", default="EulerEDMSampler", choices=sorted(SAMPLERS))
    p.add_argument("--discretization", default="LegacyDDPMDiscretization", choices=sorted(DISCRETIZATIONS),
                   help="EDMDiscretization gives Karras sigmas")
    p.add_argument("--sample_step", type=int, default=40)
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                   help="UNet and text encoders compute in this precision (fp16/bf16: Ascend/GPU); the VAE in fp32")
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_cols", type=int, default=1, help="images per prompt = num_cols x num_rows")
    p.add_argument("--num_rows", type=int, default=1)
    p.add_argument("--sd_xl_base_ratios", default="1.0", help=f"width/height bucket: {', '.join(SD_XL_BASE_RATIOS)}")
    p.add_argument("--width", type=int, default=None, help="explicit image width (overrides the ratio bucket)")
    p.add_argument("--height", type=int, default=None, help="explicit image height (overrides the ratio bucket)")
    p.add_argument("--orig_width", type=int, default=None, help="micro-conditioning original size (default: width)")
    p.add_argument("--orig_height", type=int, default=None)
    p.add_argument("--crop_coords_top", type=int, default=0)
    p.add_argument("--crop_coords_left", type=int, default=0)
    p.add_argument("--init_latent_path", default=None, help=".npy of starting noise (B, 4, H/8, W/8), unit variance")
    p.add_argument("--img", default=None, help="img2img: the input image")
    p.add_argument("--strength", type=float, default=0.75, help="img2img: how much of the schedule to redo")
    p.add_argument("--save_path", default="outputs/samples")
    p.add_argument("--ms_mode", type=int, default=0, help="0: graph mode, 1: PyNative")
    p.add_argument("--pynative_jit", choices=("auto", "on", "off", "shared"), default="auto",
                   help="PyNative: each UNet level as one compiled graph; shared: one graph per block structure "
                        "(auto, on the CPU: levels for small models, else shared)")
    p.add_argument("--device_target", default="CPU")
    return p.parse_args(argv)


def read_prompts(prompt: str) -> list[str]:
    """A prompt, or the non-empty lines of a .txt file."""
    if prompt.endswith(".txt"):
        path = Path(prompt)
        if not path.is_file():
            raise ConfigError(f"--prompt {prompt}: no such prompt file")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"--prompt {prompt}: the file holds no prompts")
        return prompts
    if not prompt.strip():
        raise ConfigError("--prompt is blank; give a prompt or a .txt file with one prompt per line")
    return [prompt]


def options_from_args(args: argparse.Namespace) -> SamplingOptions:
    if args.sd_xl_base_ratios not in SD_XL_BASE_RATIOS:
        raise ConfigError(f"--sd_xl_base_ratios {args.sd_xl_base_ratios}: expected one of "
                          f"{', '.join(SD_XL_BASE_RATIOS)}")
    width, height = SD_XL_BASE_RATIOS[args.sd_xl_base_ratios]
    options = SamplingOptions(
        sampler=args.sampler, discretization=args.discretization, num_steps=args.sample_step,
        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
        height=args.height or height, width=args.width or width, orig_height=args.orig_height,
        orig_width=args.orig_width, crop_top=args.crop_coords_top, crop_left=args.crop_coords_left,
        seed=args.seed, strength=args.strength if args.task == "img2img" else 1.0)
    options.validate()
    if args.precision != "fp32" and args.device_target == "CPU":
        raise ConfigError(f"--precision {args.precision} needs --device_target Ascend or GPU; on CPU sample with "
                          "--precision fp32")
    if args.num_cols < 1 or args.num_rows < 1:
        raise ConfigError("--num_cols and --num_rows must be at least 1")
    return options


def load_init_latents(path: str, expected: tuple) -> np.ndarray:
    if not Path(path).is_file():
        raise ConfigError(f"--init_latent_path {path}: no such file")
    try:
        latents = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ConfigError(f"--init_latent_path {path}: not a numpy .npy array ({err})") from None
    if not isinstance(latents, np.ndarray):  # an .npz archive
        raise ConfigError(f"--init_latent_path {path}: an .npz archive; save one array with np.save (.npy)")
    latents = latents.astype(np.float32)
    if latents.shape != expected:
        raise ConfigError(f"--init_latent_path {path}: shape {latents.shape}, expected {expected} "
                          "(images per prompt, 4, height/8, width/8)")
    return latents


def weights_from_args(args: argparse.Namespace) -> tuple[str, list[tuple[str, float]]]:
    """(base, [(LoRA file, scale)]) from ``--weight base[,lora...]`` and ``--lora_scale``."""
    parts = [w.strip() for w in args.weight.split(",")] if args.weight else []
    if not all(parts):
        raise ConfigError(f"--weight {args.weight}: an empty entry; give the base weights, optionally followed "
                          "by ',' and LoRA files")
    base, loras = (parts[0], parts[1:]) if parts else ("", [])
    scales = args.lora_scale if args.lora_scale is not None else [1.0] * len(loras)
    if len(scales) != len(loras):
        raise ConfigError(f"--lora_scale: {len(scales)} scale(s) for {len(loras)} LoRA file(s) in --weight; "
                          "give one per LoRA")
    if not all(math.isfinite(scale) for scale in scales):
        raise ConfigError(f"--lora_scale {' '.join(map(str, scales))}: scales must be finite numbers")
    for lora in loras:
        if not Path(lora).is_file():
            raise ConfigError(f"--weight {args.weight}: LoRA file {lora} does not exist")
    return base, list(zip(loras, scales))


def describe_weights(base: str, loras: list[tuple[str, float]]) -> str:
    """The PNG metadata's ``weights``: base, then each LoRA with its scale where not 1."""
    return ",".join([base] + [lora if scale == 1.0 else f"{lora}:{scale:g}" for lora, scale in loras])


def main(argv=None) -> None:
    setup_logging()
    args = parse_args(argv)
    options = options_from_args(args)
    prompts = read_prompts(args.prompt)
    base, loras = weights_from_args(args)
    init_image = None
    if args.task == "img2img":
        from PIL import Image

        if not args.img or not Path(args.img).is_file():
            raise ConfigError(f"--img {args.img}: img2img needs an existing input image")
        try:
            init_image = Image.open(args.img)
            init_image.load()
        except (OSError, Image.DecompressionBombError) as err:
            raise ConfigError(f"--img {args.img}: not a readable image ({err})") from None
    per_prompt = args.num_cols * args.num_rows
    noise = None
    if args.init_latent_path:
        noise = load_init_latents(args.init_latent_path, (per_prompt, *options.latent_shape))

    set_mode(args.ms_mode, args.device_target)
    engine = build_engine(args.config)
    if base:
        # LoRAs are folded into the base weights: sampling then costs what the base costs
        load_base_with_loras(engine, base, loras, args.prediction_type)
    else:
        _logger.warning("no --weight given: sampling with randomly initialised weights")
        if args.prediction_type:
            engine.denoiser.set_prediction_type(args.prediction_type)
    apply_mixed_precision(engine, args.precision, "--precision")  # after the merge: the weights stay fp32
    apply_pynative_jit(args.pynative_jit, args.ms_mode, args.device_target, engine)
    sampler = Sampler(engine)
    save_path = Path(args.save_path)
    first = next_image_index(save_path)  # continue after images already there: a run never replaces one
    for index, prompt in enumerate(prompts):
        start = time.perf_counter()
        images = sampler([prompt] * per_prompt, options, noise=noise, init_image=init_image)
        seconds = time.perf_counter() - start
        save_images(images, save_path, [prompt] * per_prompt, options, weights=describe_weights(base, loras),
                    start_index=first + index * per_prompt, grid_cols=args.num_cols)
        _logger.info("prompt %d/%d: %d images in %.1f s (%.2f s/step)", index + 1, len(prompts), per_prompt,
                     seconds, seconds / options.num_steps)


if __name__ == "__main__":
    run_cli(main)
