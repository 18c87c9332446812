"""Pure helper functions of the diffusion UNet."""

from __future__ import annotations

import math
from functools import cache

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.common.initializer import initializer


@cache
def _frequencies(half: int, max_period: float) -> np.ndarray:
    """``exp(-log(max_period) * i / half)`` for i < half, float32, computed on the host.

    The exponent is rounded in float32 in sgm/diffusers' order, the exp is taken in float64:
    MindSpore's CPU float32 exp is off by up to 4.5e-6 relative (measured), which at t ~ 1000
    moves sin/cos by ~1e-3; this way the embedding matches torch's to ~3e-5 at t = 1024.
    """
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(t * f), sin(t * f)]`` with ``f_i = max_period ** (-i / (dim // 2))``.

    The SGM form (cos first), equal to diffusers' ``Timesteps(dim, flip_sin_to_cos=True,
    downscale_freq_shift=0)``; used for the UNet's timesteps and for SDXL's size/crop conditioning.

    Args:
        timesteps: (N,) float or int values (fractional timesteps are fine).
        dim: output width; odd widths get one zero column at the end.
        max_period: the longest period, 10000 as in the Transformer paper.
    Returns:
        (N, dim) float32.
    """
    half = dim // 2
    freqs = Tensor(_frequencies(half, float(max_period)))  # (half,), a compile-time constant
    args = timesteps.astype(ms.float32).reshape(-1, 1) * freqs.reshape(1, -1)  # (N, half)
    embedding = ops.concat([ops.cos(args), ops.sin(args)], axis=-1)
    if dim % 2:
        embedding = ops.concat([embedding, ops.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


def zero_module(cell: nn.Cell) -> nn.Cell:
    """Set every parameter of ``cell`` to zero and return it.

    sgm zero-initialises the last layer of each residual branch (ResBlock ``out_layers.3``,
    transformer ``proj_out``, the UNet's ``out.2``) so that a fresh network starts as identity-ish.
    Lazy: under ``mindspore.nn.utils.no_init_parameters()`` nothing is allocated.
    """
    for param in cell.get_parameters():
        param.set_data(initializer("zeros", param.shape, param.dtype))
    return cell
