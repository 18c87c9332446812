"""The SDXL diffusion engine: composes conditioner, UNet, autoencoder and denoiser.

No CLI arguments, no I/O, no optimizer: scripts build it from YAML with ``build_engine`` and load
weights with ``gm.checkpoint.load.load_weights``. Parameter names are the official single-file
keys: ``model.diffusion_model.*``, ``first_stage_model.*``, ``conditioner.embedders.N.*``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from mindspore import Tensor, nn
from omegaconf import DictConfig, OmegaConf

from gm.errors import ConfigError
from gm.util import instantiate_from_config


class DiffusionWrapper(nn.Cell):
    """Holds the UNet under the attribute ``diffusion_model`` (sgm's OpenAIWrapper), which gives
    its parameters the official ``model.diffusion_model.`` prefix."""

    def __init__(self, diffusion_model: nn.Cell):
        super().__init__()
        self.diffusion_model = diffusion_model

    def construct(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor) -> Tensor:
        return self.diffusion_model(x, t, context, y)


class DiffusionEngine(nn.Cell):
    """SDXL: ``conditioner`` (text + micro-conditioning), ``model`` (UNet), ``first_stage_model``
    (KL autoencoder), ``denoiser`` (preconditioning over the discrete schedule).

    Args:
        network_config, denoiser_config, first_stage_config, conditioner_config: ``{target, params}``.
        scale_factor: latents = scale_factor * VAE posterior (0.13025 for SDXL).
    """

    def __init__(self, network_config: Mapping, denoiser_config: Mapping, first_stage_config: Mapping,
                 conditioner_config: Mapping, scale_factor: float = 1.0):
        super().__init__()
        self.model = DiffusionWrapper(instantiate_from_config(network_config))
        self.denoiser = instantiate_from_config(denoiser_config)
        self.conditioner = instantiate_from_config(conditioner_config)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.scale_factor = scale_factor

    def encode_first_stage(self, images: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8).

        With ``noise`` (shaped like the latents) the posterior is sampled, else its mean is used.
        """
        mean, logvar = self.first_stage_model.encode(images)
        latents = mean if noise is None else mean + (0.5 * logvar).exp() * noise
        return latents * self.scale_factor

    def decode_first_stage(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.first_stage_model.decode(latents / self.scale_factor)

    def get_conditioning(self, batch: Mapping[str, Any]) -> Dict[str, Tensor]:
        """``{"crossattn": (B, 77, D), "vector": (B, adm)}`` for a batch with ``txt`` and the sizes."""
        return self.conditioner.encode(batch)

    def denoise(self, x: Tensor, sigma: Tensor, context: Tensor, vector: Tensor) -> Tensor:
        """Denoised latents for noisy latents ``x`` (B, 4, h, w) at noise levels ``sigma`` (B,)."""
        return self.denoiser(self.model, x, sigma, context, vector)


REPO = Path(__file__).resolve().parents[2]


def resolve_config_path(path: str, relative_to: Path) -> Path:
    """A path named inside a YAML file: absolute, or relative to that file's folder or to the repo."""
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    for root in (relative_to, REPO):
        if (root / candidate).is_file():
            return root / candidate
    return REPO / candidate


def base_model_section(base_config: str, overrides: Optional[Mapping], yaml_path: Path) -> DictConfig:
    """A training YAML's model: the ``model`` of its ``base_config`` (an inference YAML) with the
    training YAML's own ``model:`` overrides merged on top."""
    base = resolve_config_path(base_config, yaml_path.parent)
    if not base.is_file():
        raise ConfigError(f"{yaml_path}: base_config {base_config} not found")
    model = OmegaConf.load(base).model
    return OmegaConf.merge(model, overrides) if overrides is not None else model


def load_config(config: str | os.PathLike | DictConfig) -> DictConfig:
    """A YAML path or an already loaded config, with a clear error for a missing file.

    A training YAML (``base_config`` plus ``model:`` overrides, the reference's inference command
    passes one) comes back as ``{"model": <its resolved model>}``, so every script that builds a
    model from ``--config`` takes either kind."""
    if isinstance(config, DictConfig):
        return config
    if not os.path.isfile(config):
        raise ConfigError(f"config file {config} does not exist; see configs/ for the shipped ones")
    cfg = OmegaConf.load(config)
    if "base_config" in cfg:
        return OmegaConf.create({"model": base_model_section(cfg.base_config, cfg.get("model"), Path(config))})
    return cfg


def build_engine(config: str | os.PathLike | DictConfig, allocate: bool = True) -> DiffusionEngine:
    """Build the engine from a YAML config whose ``model`` key names ``DiffusionEngine`` (or from
    that ``model`` section itself).

    ``allocate=False`` declares parameters without memory (MindSpore's deferred initialisation):
    enough to inspect names and shapes of the full 3.5 B-parameter model on a small machine.
    """
    cfg = load_config(config)
    if "model" not in cfg and "target" not in cfg:
        raise ConfigError(f"config {config} has no 'model' section")
    model = cfg.model if "model" in cfg else cfg
    context = contextlib.nullcontext()
    if not allocate:
        from mindspore.nn.utils import no_init_parameters

        context = no_init_parameters()
    with context:
        return instantiate_from_config(model)
