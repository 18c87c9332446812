"""The VAE posterior: a diagonal Gaussian over latents."""

from __future__ import annotations

from typing import Tuple

from mindspore import Tensor, ops

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # sgm's clamp, keeps exp(logvar) finite


def split_moments(moments: Tensor) -> Tuple[Tensor, Tensor]:
    """Encoder moments (B, 2*Z, h, w) -> (mean, logvar), each (B, Z, h, w), logvar clamped to [-30, 20].

    A plain function so it can run inside graph-mode code (MindSpore cannot build a class
    instance from tensors there).
    """
    mean, logvar = ops.chunk(moments, 2, 1)
    return mean, ops.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)


def gaussian_sample(mean: Tensor, logvar: Tensor, noise: Tensor) -> Tensor:
    """mean + exp(0.5 * logvar) * noise, with standard-normal ``noise`` shaped like ``mean``."""
    return mean + ops.exp(0.5 * logvar) * noise


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element, as sgm's ``DiagonalGaussianDistribution``.

    Args:
        parameters: (B, 2*Z, h, w) encoder moments; the first Z channels are the mean, the next
            Z the log-variance (clamped to [-30, 20]).
    Randomness is passed in: ``sample(noise)`` takes standard-normal ``noise`` shaped like ``mean``.
    For host-side (PyNative) use; graph code uses ``split_moments``/``gaussian_sample``.
    """

    def __init__(self, parameters: Tensor):
        self.mean, self.logvar = split_moments(parameters)
        self.std = ops.exp(0.5 * self.logvar)
        self.var = ops.exp(self.logvar)

    def sample(self, noise: Tensor) -> Tensor:
        """A latent (B, Z, h, w): mean + std * noise, with ``noise`` ~ N(0, 1) of the same shape."""
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        """The most likely latent: the mean, (B, Z, h, w)."""
        return self.mean
