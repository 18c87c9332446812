"""Preconditioning of the network input/output per noise level (Karras et al. 2022, Table 1)."""

from __future__ import annotations

from typing import Tuple

from mindspore import Tensor, ops


class EpsScaling:
    """The network predicts the noise: denoised = x - sigma * eps(x / sqrt(sigma^2 + 1), sigma)."""

    def __call__(self, sigma: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (c_skip, c_out, c_in, c_noise), each shaped like ``sigma``."""
        c_skip = ops.ones_like(sigma)
        c_out = -sigma
        c_in = 1.0 / ops.sqrt(sigma**2 + 1.0)
        c_noise = sigma
        return c_skip, c_out, c_in, c_noise
