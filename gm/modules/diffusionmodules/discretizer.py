"""Noise-level discretizations: ``n -> sigmas``, descending, ending in 0 (Stability's sgm interface)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


def append_zero(sigmas: np.ndarray) -> np.ndarray:
    return np.concatenate([sigmas, np.zeros(1, dtype=sigmas.dtype)])


def roughly_equally_spaced_steps(num_substeps: int, max_step: int) -> np.ndarray:
    """Ascending timesteps ``floor(linspace(max_step-1, 0, n, endpoint=False))`` reversed.

    The same choice as diffusers' ``timestep_spacing="trailing"`` (it always includes step 999).
    """
    return np.linspace(max_step - 1, 0, num_substeps, endpoint=False).astype(int)[::-1]


class Discretization(ABC):
    """Maps a step count to noise levels."""

    def __call__(self, n: int, do_append_zero: bool = True, flip: bool = False) -> np.ndarray:
        """Sigmas (float64) descending from the highest noise level, then 0 if ``do_append_zero``;
        ``flip`` reverses the result (ascending, as the denoiser's lookup table wants)."""
        sigmas = self.get_sigmas(n)
        sigmas = append_zero(sigmas) if do_append_zero else sigmas
        return sigmas[::-1].copy() if flip else sigmas

    @abstractmethod
    def get_sigmas(self, n: int) -> np.ndarray:
        """``n`` sigmas, descending."""


class LegacyDDPMDiscretization(Discretization):
    """The DDPM schedule SDXL was trained with: scaled-linear betas over 1000 steps.

    betas = linspace(sqrt(linear_start), sqrt(linear_end), T)^2, sigma_t = sqrt((1 - abar_t) / abar_t).
    """

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.0120, num_timesteps: int = 1000):
        self.num_timesteps = num_timesteps
        betas = np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2
        self.alphas_cumprod = np.cumprod(1.0 - betas)

    def get_sigmas(self, n: int) -> np.ndarray:
        if n < self.num_timesteps:
            alphas_cumprod = self.alphas_cumprod[roughly_equally_spaced_steps(n, self.num_timesteps)]
        elif n == self.num_timesteps:
            alphas_cumprod = self.alphas_cumprod
        else:
            raise ValueError(f"cannot take {n} steps from a {self.num_timesteps}-step schedule")
        sigmas = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
        return sigmas[::-1].copy()


class EDMDiscretization(Discretization):
    """Karras et al. (2022) sigmas: ``(smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``.

    For SDXL use the DDPM schedule's range (sigma_min 0.0292, sigma_max 14.6146), as diffusers'
    ``use_karras_sigmas`` does.
    """

    def __init__(self, sigma_min: float = 0.0291675, sigma_max: float = 14.614642, rho: float = 7.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho

    def get_sigmas(self, n: int) -> np.ndarray:
        ramp = np.linspace(0, 1, n, dtype=np.float64)
        min_inv_rho = self.sigma_min ** (1 / self.rho)
        max_inv_rho = self.sigma_max ** (1 / self.rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** self.rho


class DiffusersDDPMDiscretization(LegacyDDPMDiscretization):
    """The training schedule at diffusers' timesteps: SDXL base's shipped scheduler config
    (``timestep_spacing="leading"``, ``steps_offset=1``), so a sampler gives the image of
    diffusers' default SDXL pipeline. "leading": ``k * (T // n) + steps_offset``; "trailing":
    ``round(T - k * T / n) - 1``. Both are integer timesteps, so each sigma is a table entry and
    the denoiser's nearest-timestep lookup returns exactly that timestep."""

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.0120, num_timesteps: int = 1000,
                 timestep_spacing: str = "leading", steps_offset: int = 1):
        super().__init__(linear_start, linear_end, num_timesteps)
        if timestep_spacing not in ("leading", "trailing"):
            raise ValueError(f"timestep_spacing {timestep_spacing!r}: expected 'leading' or 'trailing'")
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset

    def timesteps(self, n: int) -> np.ndarray:
        """``n`` integer timesteps, descending."""
        if not 1 <= n <= self.num_timesteps:
            raise ValueError(f"cannot take {n} steps from a {self.num_timesteps}-step schedule")
        if self.timestep_spacing == "leading":
            ascending = np.arange(n) * (self.num_timesteps // n) + self.steps_offset
            return np.minimum(ascending, self.num_timesteps - 1)[::-1].copy()
        return np.round(np.arange(self.num_timesteps, 0, -self.num_timesteps / n)).astype(int)[:n] - 1

    def get_sigmas(self, n: int) -> np.ndarray:
        alphas_cumprod = self.alphas_cumprod[self.timesteps(n)]
        return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


class LCMDiscretization(LegacyDDPMDiscretization):
    """Latent-consistency-model timesteps (diffusers' ``LCMScheduler``): ``n`` of the
    ``original_steps`` timesteps ``k * T / original_steps - 1`` the consistency model was distilled
    on, picked at ``floor(linspace(0, original_steps, n))`` from the top (n = 4 of 50: 999, 759,
    499, 259)."""

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.0120, num_timesteps: int = 1000,
                 original_steps: int = 50):
        super().__init__(linear_start, linear_end, num_timesteps)
        self.original_steps = original_steps

    def timesteps(self, n: int) -> np.ndarray:
        """``n`` integer timesteps, descending."""
        if not 1 <= n <= self.original_steps:
            raise ValueError(f"LCM takes 1 to {self.original_steps} steps, not {n}")
        origin = (np.arange(1, self.original_steps + 1) * (self.num_timesteps // self.original_steps) - 1)[::-1]
        return origin[np.floor(np.linspace(0, len(origin), n, endpoint=False)).astype(int)].copy()

    def get_sigmas(self, n: int) -> np.ndarray:
        alphas_cumprod = self.alphas_cumprod[self.timesteps(n)]
        return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
