"""Guiders: how conditional and unconditional predictions are batched and combined."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict, Optional, Tuple

from mindspore import Tensor, ops

Cond = Dict[str, Tensor]


class Guider(ABC):
    """``prepare_inputs`` builds the network batch; ``__call__`` turns its output into one prediction."""

    @abstractmethod
    def prepare_inputs(self, x: Tensor, sigma: Tensor, cond: Cond,
                       uncond: Optional[Cond]) -> Tuple[Tensor, Tensor, Cond]:
        """Returns (x, sigma, cond) for one network call."""

    @abstractmethod
    def __call__(self, denoised: Tensor, sigma: Tensor) -> Tensor:
        """Combine the network's denoised batch into (B, C, H, W)."""


class IdentityGuider(Guider):
    """No guidance: the conditional prediction alone."""

    def prepare_inputs(self, x, sigma, cond, uncond):
        return x, sigma, cond

    def __call__(self, denoised, sigma):
        return denoised


class VanillaCFG(Guider):
    """Classifier-free guidance (Ho & Salimans 2022): ``u + scale * (c - u)``.

    Conditional and unconditional halves run as one batch of 2B (fewer, larger ops). On denoised
    latents this equals diffusers' guidance on the noise prediction, as denoised is affine in eps.
    """

    def __init__(self, scale: float):
        self.scale = float(scale)

    def prepare_inputs(self, x, sigma, cond, uncond):
        if uncond is None:
            raise ValueError("classifier-free guidance needs unconditional conditioning")
        both = {k: ops.concat([uncond[k], cond[k]], axis=0) for k in cond}
        return ops.concat([x, x], axis=0), ops.concat([sigma, sigma], axis=0), both

    def __call__(self, denoised, sigma):
        uncond, cond = ops.chunk(denoised, 2, axis=0)
        return uncond + self.scale * (cond - uncond)
