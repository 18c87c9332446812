"""Text-to-image and image-to-image sampling with an SDXL engine: the one implementation used by
the sampling CLI, the streamlit page, class-image generation and validation during training.

Host work (tokenizing, the sampler loop's scalar bookkeeping, PNG writing) stays in Python; the
heavy parts (text encoders, UNet + denoiser, VAE decoder) are cells that graph mode compiles once
per shape.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from PIL import Image, PngImagePlugin

from gm.errors import ConfigError
from gm.fs import publish
from gm.modules.diffusionmodules.discretizer import Discretization
from gm.step_cell import StepCell
from gm.util import instantiate_from_config

_logger = logging.getLogger(__name__)
_DIFFUSION = "gm.modules.diffusionmodules"
SAMPLERS = {
    "EulerEDMSampler": f"{_DIFFUSION}.sampling.EulerEDMSampler",
    "HeunEDMSampler": f"{_DIFFUSION}.sampling.HeunEDMSampler",
    "EulerAncestralSampler": f"{_DIFFUSION}.sampling.EulerAncestralSampler",
    "DPMPP2SAncestralSampler": f"{_DIFFUSION}.sampling.DPMPP2SAncestralSampler",
    "DPMPP2MSampler": f"{_DIFFUSION}.sampling.DPMPP2MSampler",
    "LinearMultistepSampler": f"{_DIFFUSION}.sampling.LinearMultistepSampler",
    "LCMSampler": f"{_DIFFUSION}.sampling.LCMSampler",
    "AncestralSampler": f"{_DIFFUSION}.sampling.AncestralSampler",  # the reference's: plain Euler steps
}
DISCRETIZATIONS = {
    "LegacyDDPMDiscretization": f"{_DIFFUSION}.discretizer.LegacyDDPMDiscretization",
    "EDMDiscretization": f"{_DIFFUSION}.discretizer.EDMDiscretization",  # Karras sigmas
    # diffusers' timesteps ("leading", offset 1: the official SDXL scheduler config)
    "DiffusersDDPMDiscretization": f"{_DIFFUSION}.discretizer.DiffusersDDPMDiscretization",
    "LCMDiscretization": f"{_DIFFUSION}.discretizer.LCMDiscretization",  # for LCMSampler
}
LATENT_CHANNELS = 4
VAE_DOWNSCALE = 8

Cond = Dict[str, Tensor]


@dataclass
class SamplingOptions:
    """Everything that decides a sampled image besides the weights, the prompt and the noise."""

    sampler: str = "EulerEDMSampler"
    discretization: str = "LegacyDDPMDiscretization"
    num_steps: int = 40
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    height: int = 1024
    width: int = 1024
    orig_height: Optional[int] = None  # micro-conditioning "original size"; defaults to height/width
    orig_width: Optional[int] = None
    crop_top: int = 0
    crop_left: int = 0
    seed: int = 42
    strength: float = 1.0  # img2img: fraction of the schedule that is re-noised

    def validate(self) -> None:
        """Raise ConfigError naming the flag for any impossible value."""
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {self.sampler}: expected one of {sorted(SAMPLERS)}")
        if self.discretization not in DISCRETIZATIONS:
            raise ConfigError(f"--discretization {self.discretization}: expected one of {sorted(DISCRETIZATIONS)}")
        if self.num_steps < 1:
            raise ConfigError(f"--sample_step {self.num_steps}: must be at least 1")
        if self.guidance_scale < 0:
            raise ConfigError(f"--guidance_scale {self.guidance_scale}: must be >= 0")
        for flag, size in (("height", self.height), ("width", self.width)):
            if size < VAE_DOWNSCALE or size % VAE_DOWNSCALE:
                raise ConfigError(f"image {flag} {size}: must be a positive multiple of {VAE_DOWNSCALE}")
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"--strength {self.strength}: must be in (0, 1]")

    @property
    def latent_shape(self) -> Tuple[int, int, int]:
        return LATENT_CHANNELS, self.height // VAE_DOWNSCALE, self.width // VAE_DOWNSCALE

    @property
    def uses_guidance(self) -> bool:
        # as diffusers: a scale of 1 or less is plain conditional sampling
        return self.guidance_scale > 1.0


def build_sampler(options: SamplingOptions, verbose: bool = True):
    """The sampler (with its discretization and guider) named by ``options``."""
    options.validate()
    guider = ({"target": f"{_DIFFUSION}.guiders.VanillaCFG", "params": {"scale": options.guidance_scale}}
              if options.uses_guidance else {"target": f"{_DIFFUSION}.guiders.IdentityGuider"})
    return instantiate_from_config({"target": SAMPLERS[options.sampler], "params": {
        "discretization_config": {"target": DISCRETIZATIONS[options.discretization]},
        "num_steps": options.num_steps, "guider_config": guider, "verbose": verbose}})


class DenoiseStep(StepCell):
    """``(x, sigma, context, vector) -> denoised``: UNet + preconditioning as one compiled cell.

    ``auto_prefix=False`` keeps the engine's parameter names as they are.
    """

    def __init__(self, engine: nn.Cell):
        super().__init__(auto_prefix=False)
        self.engine = engine

    def construct(self, x: Tensor, sigma: Tensor, context: Tensor, vector: Tensor) -> Tensor:
        return self.engine.denoise(x, sigma, context, vector)


class DecodeStep(nn.Cell):
    """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [0, 1]."""

    def __init__(self, engine: nn.Cell):
        super().__init__(auto_prefix=False)
        self.engine = engine

    def construct(self, latents: Tensor) -> Tensor:
        images = self.engine.decode_first_stage(latents)
        return ops.clamp((images + 1.0) / 2.0, 0.0, 1.0)


class Sampler:
    """Samples images from one engine; compiled cells are built once and reused across calls."""

    def __init__(self, engine: nn.Cell):
        self.engine = engine
        self.denoise_step = DenoiseStep(engine)
        self.decode_step = DecodeStep(engine)

    def conditioning(self, prompts: Sequence[str], options: SamplingOptions) -> Tuple[Cond, Optional[Cond]]:
        """(cond, uncond) for the prompts; uncond is None without guidance.

        An empty negative prompt gives zero text embeddings (crossattn and the pooled part of the
        vector) with the same micro-conditioning, as SDXL base does; a given one is encoded.
        """
        batch = self._batch(prompts, options)
        conditioner = self.engine.conditioner
        if not options.uses_guidance:
            return conditioner.encode(batch), None
        if options.negative_prompt:
            negative = dict(batch, txt=[options.negative_prompt] * len(prompts))
            return conditioner.get_unconditional_conditioning(batch, negative, force_uc_zero_embeddings=())
        return conditioner.get_unconditional_conditioning(batch, batch, force_uc_zero_embeddings=("txt",))

    @staticmethod
    def _batch(prompts: Sequence[str], options: SamplingOptions) -> Dict[str, object]:
        n = len(prompts)
        original = (options.orig_height or options.height, options.orig_width or options.width)
        return {
            "txt": list(prompts),
            "original_size_as_tuple": np.tile(np.array([original], np.float32), (n, 1)),
            "crop_coords_top_left": np.tile(np.array([[options.crop_top, options.crop_left]], np.float32), (n, 1)),
            "target_size_as_tuple": np.tile(np.array([[options.height, options.width]], np.float32), (n, 1)),
        }

    def initial_noise(self, num_images: int, options: SamplingOptions) -> np.ndarray:
        """Unit-variance starting noise (B, 4, h, w) from ``options.seed`` (numpy PCG64: the same on
        every device and in both modes)."""
        return np.random.default_rng(options.seed).standard_normal((num_images, *options.latent_shape)).astype(
            np.float32)

    def sample_latents(self, prompts: Sequence[str], options: SamplingOptions, noise: Optional[np.ndarray] = None,
                       init_latents: Optional[Tensor] = None) -> Tensor:
        """Final latents (B, 4, h, w). ``noise``: starting noise (default from the seed);
        ``init_latents``: img2img start (scaled latents), re-noised to ``options.strength``."""
        sampler = build_sampler(options)
        noise = self.initial_noise(len(prompts), options) if noise is None else np.asarray(noise, np.float32)
        expected = (len(prompts), *options.latent_shape)
        if noise.shape != expected:
            raise ConfigError(f"initial latents have shape {noise.shape}; expected {expected} for this size/batch")
        cond, uncond = self.conditioning(prompts, options)
        x = Tensor(noise)
        if init_latents is not None:
            sampler.discretization = Img2ImgDiscretization(sampler.discretization, options.strength)
            sigmas = sampler.discretization(options.num_steps)
            # the sampler multiplies its start by sqrt(1 + sigma_0^2); undo that for the re-noised image
            x = (init_latents + x * float(sigmas[0])) / float(math.sqrt(1.0 + sigmas[0] ** 2))
        rng = np.random.default_rng(options.seed + 1)

        def noise_fn(shape):
            return Tensor(rng.standard_normal(shape).astype(np.float32))

        return sampler(self._denoise_fn, x, cond, uncond, noise_fn=noise_fn)

    def _denoise_fn(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        return self.denoise_step(x, sigma, cond["crossattn"], cond["vector"])

    def decode(self, latents: Tensor) -> np.ndarray:
        """Latents -> uint8 images (B, H, W, 3), rounded as diffusers' ``numpy_to_pil``."""
        images = self.decode_step(latents).asnumpy().transpose(0, 2, 3, 1)
        return (images * 255).round().astype(np.uint8)

    def encode_image(self, image: Image.Image, options: SamplingOptions) -> Tensor:
        """An RGB image resized to the target size -> scaled latents (posterior mean), for img2img."""
        image = image.convert("RGB").resize((options.width, options.height), Image.Resampling.LANCZOS)
        array = np.asarray(image, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0
        return self.engine.encode_first_stage(Tensor(array))

    def __call__(self, prompts: Sequence[str], options: SamplingOptions, noise: Optional[np.ndarray] = None,
                 init_image: Optional[Image.Image] = None) -> np.ndarray:
        """Prompts -> uint8 images (B, H, W, 3)."""
        init_latents = None
        if init_image is not None:
            init_latents = self.encode_image(init_image, options)
            init_latents = ops.tile(init_latents, (len(prompts), 1, 1, 1))
        return self.decode(self.sample_latents(prompts, options, noise, init_latents))


class Img2ImgDiscretization(Discretization):
    """Keeps the lowest ``strength`` fraction of another discretization's sigmas (at least one step)."""

    def __init__(self, discretization: Discretization, strength: float):
        self.inner = discretization
        self.strength = strength

    def __call__(self, n: int, do_append_zero: bool = True, flip: bool = False) -> np.ndarray:
        sigmas = self.inner(n, do_append_zero=do_append_zero, flip=False)
        keep = max(int(self.strength * (len(sigmas) - 1)), 1) + (1 if do_append_zero else 0)
        sigmas = sigmas[-keep:]
        return sigmas[::-1].copy() if flip else sigmas

    def get_sigmas(self, n: int) -> np.ndarray:
        return self(n, do_append_zero=False)


def save_images(images: np.ndarray, folder: str | Path, prompts: Sequence[str], options: SamplingOptions,
                weights: str = "", start_index: int = 0, grid_cols: Optional[int] = None) -> List[Path]:
    """One PNG per image with the sampling settings in its text metadata, plus a grid when several.

    Returns the image paths. File names continue from ``start_index`` so runs never overwrite.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        path = folder / f"{start_index + i:06d}.png"
        save_png(image, path, {"prompt": prompt, "weights": weights, "image_index": i, **asdict(options)})
        paths.append(path)
    if len(images) > 1:
        make_grid(images, grid_cols).save(folder / f"grid_{start_index:06d}.png")
    _logger.info("saved %d images to %s", len(paths), folder)
    return paths


def next_image_index(folder: str | Path) -> int:
    """The first free ``NNNNNN.png`` number in ``folder``: a new run continues after earlier images."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    numbers = [int(p.stem) for p in folder.glob("*.png") if p.stem.isdigit()]
    numbers += [int(p.stem[5:]) for p in folder.glob("grid_*.png") if p.stem[5:].isdigit()]
    return max(numbers) + 1 if numbers else 0


def save_png(image: np.ndarray, path: Path, settings: Dict[str, object]) -> None:
    """One uint8 (H, W, 3) image as PNG with ``settings`` as text chunks (and all of them as JSON in
    ``parameters``); written to a temporary name first so a crash never leaves a broken PNG."""
    info = PngImagePlugin.PngInfo()
    for key, value in settings.items():
        info.add_text(key, str(value))
    info.add_text("parameters", json.dumps(settings, default=str))
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)
    publish(tmp, path)


def make_grid(images: np.ndarray, cols: Optional[int] = None) -> Image.Image:
    """(B, H, W, 3) uint8 -> one image with ``cols`` columns (default: near square)."""
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return Image.fromarray(grid)


def set_mode(ms_mode: int, device_target: str) -> None:
    """MindSpore context for the scripts: 0 graph mode, 1 PyNative; CPU, GPU or Ascend."""
    if ms_mode not in (0, 1):
        raise ConfigError(f"--ms_mode {ms_mode}: use 0 (graph mode) or 1 (PyNative)")
    if device_target not in ("CPU", "GPU", "Ascend"):
        raise ConfigError(f"--device_target {device_target}: use CPU, GPU or Ascend")
    try:
        ms.set_context(mode=ms_mode, device_target=device_target)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--device_target {device_target}: not usable here ({first})") from None
    if device_target == "CPU":
        # kernel-by-kernel execution: the same compile time, 30% faster train steps on this
        # backend than the default level (measured, tiny config)
        ms.set_context(jit_config={"jit_level": "O0"})
