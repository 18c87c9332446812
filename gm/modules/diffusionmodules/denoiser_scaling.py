"""Preconditioning of the network input/output per noise level (Karras et al. 2022, Table 1), and
the loss weight that makes the denoising loss the MSE on the network's own target.

Sigma is the variance-exploding noise level of ``x_noisy = x + sigma * n`` (sigma_data = 1, the
latents being scaled to unit variance). Two parametrisations are served:
- ``EpsScaling``: the network predicts the noise ``n`` (SDXL base and refiner, SD 1.x; diffusers'
  ``prediction_type="epsilon"``);
- ``VScaling``: the network predicts the velocity ``v = alpha * n - sigma_vp * x`` of Salimans & Ho
  2022 (SD 2.x 768-v and v-prediction SDXL fine-tunes; diffusers' ``"v_prediction"``, kohya's
  ``--v_parameterization``). At high noise its output is (minus) the clean latents themselves, so
  the first sampler steps, which lay a picture out, are as precise as the network is, not amplified
  by sigma as the noise prediction's error is.
"""

from __future__ import annotations

from typing import Tuple

from mindspore import Tensor, ops


class EpsScaling:
    """The network predicts the noise: denoised = x - sigma * eps(x / sqrt(sigma^2 + 1), sigma)."""

    prediction_type = "epsilon"

    def __call__(self, sigma: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (c_skip, c_out, c_in, c_noise), each shaped like ``sigma``."""
        c_skip = ops.ones_like(sigma)
        c_out = -sigma
        c_in = 1.0 / ops.sqrt(sigma**2 + 1.0)
        c_noise = sigma
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """w(sigma) with ``w * (denoised - x)^2 = (eps_pred - n)^2`` (sgm's ``EpsWeighting``); it is
        also the signal-to-noise ratio 1 / sigma^2 that min-SNR weighting clips."""
        return 1.0 / (sigma * sigma)


class VScaling:
    """The network predicts the velocity: denoised = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v(...)."""

    prediction_type = "v_prediction"

    def __call__(self, sigma: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (c_skip, c_out, c_in, c_noise), each shaped like ``sigma``."""
        s2 = sigma**2 + 1.0
        c_skip = 1.0 / s2
        c_out = -sigma / ops.sqrt(s2)
        c_in = 1.0 / ops.sqrt(s2)
        c_noise = sigma
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """w(sigma) with ``w * (denoised - x)^2 = (v_pred - v)^2`` (sgm's ``VWeighting``): SNR + 1,
        the quantity diffusers' scripts clip for min-SNR weighting of a v-prediction model."""
        return (sigma * sigma + 1.0) / (sigma * sigma)


# the names diffusers' schedulers use (``prediction_type``), as ``--prediction_type`` takes them
SCALINGS = {cls.prediction_type: cls for cls in (EpsScaling, VScaling)}
PREDICTION_TYPES = tuple(SCALINGS)
