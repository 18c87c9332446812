"""Denoisers: wrap the network with noise-level preconditioning (sgm's ``Denoiser`` interface)."""

from __future__ import annotations

from typing import Mapping

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from gm.errors import ConfigError
from gm.modules.diffusionmodules.denoiser_scaling import SCALINGS
from gm.util import instantiate_from_config


class DiscreteDenoiser(nn.Cell):
    """Denoiser for a network trained on a discrete schedule (SDXL: 1000 DDPM steps, eps target).

    ``denoised = network(x * c_in, t(sigma), cond) * c_out + x * c_skip`` where t(sigma) is the
    index of the nearest training sigma (``quantize_c_noise``), so sampling at any sigma feeds the
    UNet the integer timestep it was trained on.
    """

    def __init__(self, scaling_config: Mapping, num_idx: int, discretization_config: Mapping,
                 do_append_zero: bool = False, quantize_c_noise: bool = True, flip: bool = True):
        super().__init__()
        self.scaling = instantiate_from_config(scaling_config)
        self.discretization = instantiate_from_config(discretization_config)
        self.quantize_c_noise = quantize_c_noise
        sigmas = self.discretization(num_idx, do_append_zero=do_append_zero, flip=flip)  # ascending
        self.sigmas_np = sigmas
        self.sigmas = Tensor(sigmas.astype(np.float32))

    def set_prediction_type(self, prediction_type: str) -> None:
        """Precondition for another network target (``epsilon`` or ``v_prediction``); call it before
        a graph using this denoiser is compiled (the scaling is a constant of the graph)."""
        if prediction_type not in SCALINGS:
            raise ConfigError(f"prediction type '{prediction_type}': expected one of {', '.join(SCALINGS)}")
        self.scaling = SCALINGS[prediction_type]()

    def sigma_to_idx(self, sigma: Tensor) -> Tensor:
        """Index of the nearest training sigma, (B,) int32."""
        dists = ops.abs(sigma.reshape(1, -1) - self.sigmas.reshape(-1, 1))  # (num_idx, B)
        return ops.argmin(dists, axis=0).astype(ms.int32)

    def possibly_quantize_c_noise(self, c_noise: Tensor) -> Tensor:
        if self.quantize_c_noise:
            return self.sigma_to_idx(c_noise).astype(ms.float32)
        return c_noise

    def construct(self, network: nn.Cell, x: Tensor, sigma: Tensor, context: Tensor, vector: Tensor) -> Tensor:
        """Args: x (B, C, H, W) noisy latents; sigma (B,); context (B, 77, D); vector (B, adm).
        Returns the denoised latents (B, C, H, W)."""
        c_skip, c_out, c_in, c_noise = self.scaling(sigma)
        c_noise = self.possibly_quantize_c_noise(c_noise)
        eps = network(x * c_in.reshape(-1, 1, 1, 1), c_noise, context, vector)
        return eps * c_out.reshape(-1, 1, 1, 1) + x * c_skip.reshape(-1, 1, 1, 1)
