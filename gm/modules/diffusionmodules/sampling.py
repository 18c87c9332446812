"""Samplers: the sampling loops only (Karras et al. 2022 "EDM" form, as Stability's sgm).

A sampler takes ``denoise_fn(x, sigma, cond) -> denoised`` (a closure over the engine, so samplers
never reach into it), the conditioning pair and the initial unit-variance noise, and returns the
final latents. Latents live in the variance-exploding parametrisation ``x = x_vp * sqrt(1 + sigma^2)``;
the first noise is scaled by ``sqrt(1 + sigma_max^2)``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np
from mindspore import Tensor, ops
from tqdm.auto import tqdm

from gm.util import instantiate_from_config

Cond = Dict[str, Tensor]
DenoiseFn = Callable[[Tensor, Tensor, Cond], Tensor]
NoiseFn = Callable[[Tuple[int, ...]], Tensor]  # shape -> standard normal noise

_IDENTITY_GUIDER = {"target": "gm.modules.diffusionmodules.guiders.IdentityGuider"}


class BaseDiffusionSampler:
    """Common loop plumbing: sigmas from the discretization, guidance, progress bar.

    Args:
        discretization_config: ``{target, params}`` of a Discretization.
        num_steps: default number of steps.
        guider_config: ``{target, params}`` of a Guider (identity when None).
        verbose: show a tqdm bar over the steps.
    """

    def __init__(self, discretization_config: Mapping, num_steps: Optional[int] = None,
                 guider_config: Optional[Mapping] = None, verbose: bool = False):
        self.discretization = instantiate_from_config(discretization_config)
        self.guider = instantiate_from_config(guider_config or _IDENTITY_GUIDER)
        self.num_steps = num_steps
        self.verbose = verbose

    def prepare_sampling_loop(self, x: Tensor, num_steps: Optional[int]) -> Tuple[Tensor, np.ndarray]:
        num_steps = num_steps or self.num_steps
        if not num_steps or num_steps < 1:
            raise ValueError(f"number of sampling steps must be >= 1, got {num_steps}")
        sigmas = self.discretization(num_steps)  # (num_steps + 1,) descending, last 0
        return x * float(math.sqrt(1.0 + sigmas[0] ** 2)), sigmas

    def denoise(self, x: Tensor, denoise_fn: DenoiseFn, sigma: float, cond: Cond, uncond: Optional[Cond]) -> Tensor:
        sigma_batch = ops.full((x.shape[0],), sigma, dtype=x.dtype)
        x_in, sigma_in, cond_in = self.guider.prepare_inputs(x, sigma_batch, cond, uncond)
        return self.guider(denoise_fn(x_in, sigma_in, cond_in), sigma_batch)

    def steps(self, sigmas: np.ndarray):
        """Indices of the steps, with a progress bar when verbose."""
        indices = range(len(sigmas) - 1)
        return tqdm(indices, desc=f"sampling ({type(self).__name__})", disable=not self.verbose, leave=False)


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dsigma."""
    return (x - denoised) / sigma


class EulerEDMSampler(BaseDiffusionSampler):
    """Euler steps on the probability-flow ODE (SDXL's default sampler); ``s_churn`` > 0 adds
    Karras' stochastic churn and then needs a ``noise_fn``."""

    def __init__(self, *args, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    def __call__(self, denoise_fn: DenoiseFn, x: Tensor, cond: Cond, uncond: Optional[Cond] = None,
                 num_steps: Optional[int] = None, noise_fn: Optional[NoiseFn] = None) -> Tensor:
        x, sigmas = self.prepare_sampling_loop(x, num_steps)
        n = len(sigmas) - 1
        for i in self.steps(sigmas):
            sigma, next_sigma = float(sigmas[i]), float(sigmas[i + 1])
            gamma = min(self.s_churn / n, 2**0.5 - 1) if self.s_tmin <= sigma <= self.s_tmax else 0.0
            sigma_hat = sigma * (gamma + 1.0)
            if gamma > 0:
                x = x + _noise(noise_fn, x) * self.s_noise * math.sqrt(sigma_hat**2 - sigma**2)
            d = to_d(x, sigma_hat, self.denoise(x, denoise_fn, sigma_hat, cond, uncond))
            x = self.step_from(x, d, sigma_hat, next_sigma, denoise_fn, cond, uncond)
        return x

    def step_from(self, x: Tensor, d: Tensor, sigma_hat: float, next_sigma: float, denoise_fn: DenoiseFn,
                  cond: Cond, uncond: Optional[Cond]) -> Tensor:
        """The step from ``sigma_hat`` (slope ``d``) to ``next_sigma``: Euler."""
        return x + d * (next_sigma - sigma_hat)


class HeunEDMSampler(EulerEDMSampler):
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 2):
    an Euler step, then the average of the slopes at both ends; the last step, to sigma 0, stays
    Euler (the slope there is undefined). Two network calls per step but the last."""

    def step_from(self, x, d, sigma_hat, next_sigma, denoise_fn, cond, uncond):
        euler = x + d * (next_sigma - sigma_hat)
        if next_sigma == 0:
            return euler
        d_next = to_d(euler, next_sigma, self.denoise(euler, denoise_fn, next_sigma, cond, uncond))
        return x + (d + d_next) * (0.5 * (next_sigma - sigma_hat))


def linear_multistep_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node ``i - j``
    among the nodes sigma_i, ..., sigma_{i-order+1}: the weight of the j-th newest slope in an
    Adams-Bashforth step. Integrated exactly (a polynomial), not by quadrature."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    basis = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(float(sigmas[i + 1])) - antiderivative(float(sigmas[i])))


class LinearMultistepSampler(BaseDiffusionSampler):
    """Linear multistep (Adams-Bashforth in sigma) of up to ``order`` past slopes; one network call
    per step. The first steps use as many slopes as exist."""

    def __init__(self, *args, order: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        self.order = order

    def __call__(self, denoise_fn: DenoiseFn, x: Tensor, cond: Cond, uncond: Optional[Cond] = None,
                 num_steps: Optional[int] = None, noise_fn: Optional[NoiseFn] = None) -> Tensor:
        x, sigmas = self.prepare_sampling_loop(x, num_steps)
        slopes = []  # newest first
        for i in self.steps(sigmas):
            sigma = float(sigmas[i])
            slopes.insert(0, to_d(x, sigma, self.denoise(x, denoise_fn, sigma, cond, uncond)))
            del slopes[self.order:]
            order = len(slopes)
            for j, slope in enumerate(slopes):
                x = x + slope * linear_multistep_coefficient(sigmas, i, j, order)
        return x


class AncestralSampler(EulerEDMSampler):
    """The reference's (mindone's) ``AncestralSampler`` used on its own: the base of its ancestral
    samplers, whose step is a plain Euler step to the next sigma (no fresh noise), so it samples as
    ``EulerEDMSampler`` does; served for configs and commands that name it."""


class LCMSampler(BaseDiffusionSampler):
    """Latent consistency models (Luo et al. 2023): each step jumps to the denoised estimate and,
    except at the end, re-noises it to the next sigma with fresh noise. Pair it with
    ``LCMDiscretization`` (the distillation's timesteps), 2-8 steps, guidance <= 1."""

    def __call__(self, denoise_fn: DenoiseFn, x: Tensor, cond: Cond, uncond: Optional[Cond] = None,
                 num_steps: Optional[int] = None, noise_fn: Optional[NoiseFn] = None) -> Tensor:
        x, sigmas = self.prepare_sampling_loop(x, num_steps)
        for i in self.steps(sigmas):
            sigma, next_sigma = float(sigmas[i]), float(sigmas[i + 1])
            x = self.denoise(x, denoise_fn, sigma, cond, uncond)
            if next_sigma > 0:
                x = x + _noise(noise_fn, x) * next_sigma
        return x


def ancestral_step(sigma: float, next_sigma: float, eta: float = 1.0) -> Tuple[float, float]:
    """(sigma_down, sigma_up): deterministic part and fresh-noise part of a step to ``next_sigma``."""
    if eta == 0 or next_sigma == 0:
        return next_sigma, 0.0
    sigma_up = min(next_sigma, eta * math.sqrt(next_sigma**2 * (sigma**2 - next_sigma**2) / sigma**2))
    return math.sqrt(next_sigma**2 - sigma_up**2), sigma_up


class EulerAncestralSampler(BaseDiffusionSampler):
    """Euler step to ``sigma_down`` plus fresh noise of ``sigma_up`` (k-diffusion's euler_ancestral)."""

    def __init__(self, *args, eta: float = 1.0, s_noise: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.eta, self.s_noise = eta, s_noise

    def __call__(self, denoise_fn: DenoiseFn, x: Tensor, cond: Cond, uncond: Optional[Cond] = None,
                 num_steps: Optional[int] = None, noise_fn: Optional[NoiseFn] = None) -> Tensor:
        x, sigmas = self.prepare_sampling_loop(x, num_steps)
        for i in self.steps(sigmas):
            sigma, next_sigma = float(sigmas[i]), float(sigmas[i + 1])
            denoised = self.denoise(x, denoise_fn, sigma, cond, uncond)
            sigma_down, sigma_up = ancestral_step(sigma, next_sigma, self.eta)
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
            if sigma_up > 0:
                x = x + _noise(noise_fn, x) * (self.s_noise * sigma_up)
        return x


class DPMPP2SAncestralSampler(EulerAncestralSampler):
    """DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``): a second-order
    single step in log-sigma time to ``sigma_down`` (a midpoint evaluation), then fresh noise of
    ``sigma_up``; Euler on the last step to sigma 0."""

    def __call__(self, denoise_fn: DenoiseFn, x: Tensor, cond: Cond, uncond: Optional[Cond] = None,
                 num_steps: Optional[int] = None, noise_fn: Optional[NoiseFn] = None) -> Tensor:
        x, sigmas = self.prepare_sampling_loop(x, num_steps)
        for i in self.steps(sigmas):
            sigma, next_sigma = float(sigmas[i]), float(sigmas[i + 1])
            denoised = self.denoise(x, denoise_fn, sigma, cond, uncond)
            sigma_down, sigma_up = ancestral_step(sigma, next_sigma, self.eta)
            if sigma_down == 0:
                x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
            else:
                h = math.log(sigma) - math.log(sigma_down)  # time t = -log(sigma)
                sigma_mid = math.exp(-(-math.log(sigma) + 0.5 * h))
                x_mid = (sigma_mid / sigma) * x - math.expm1(-0.5 * h) * denoised
                denoised_mid = self.denoise(x_mid, denoise_fn, sigma_mid, cond, uncond)
                x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_mid
            if sigma_up > 0:
                x = x + _noise(noise_fn, x) * (self.s_noise * sigma_up)
        return x


class DPMPP2MSampler(BaseDiffusionSampler):
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep on the data prediction; first order
    on the first step and on the final step to sigma 0 (as diffusers' ``final_sigmas_type="zero"``)."""

    def __call__(self, denoise_fn: DenoiseFn, x: Tensor, cond: Cond, uncond: Optional[Cond] = None,
                 num_steps: Optional[int] = None, noise_fn: Optional[NoiseFn] = None) -> Tensor:
        x, sigmas = self.prepare_sampling_loop(x, num_steps)
        old_denoised, h_last = None, None
        for i in self.steps(sigmas):
            sigma, next_sigma = float(sigmas[i]), float(sigmas[i + 1])
            denoised = self.denoise(x, denoise_fn, sigma, cond, uncond)
            if next_sigma == 0:
                x = denoised
                break
            h = math.log(sigma) - math.log(next_sigma)  # lambda = -log(sigma)
            mult1, mult2 = next_sigma / sigma, -math.expm1(-h)
            if old_denoised is None:
                x = mult1 * x + mult2 * denoised
            else:
                r = h_last / h
                x = mult1 * x + mult2 * ((1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised)
            old_denoised, h_last = denoised, h
        return x


def _noise(noise_fn: Optional[NoiseFn], like: Tensor) -> Tensor:
    if noise_fn is None:
        raise ValueError("this sampler draws fresh noise each step: pass noise_fn (e.g. seeded_noise(seed))")
    return noise_fn(tuple(like.shape)).astype(like.dtype)


def seeded_noise(seed: int) -> NoiseFn:
    """A reproducible standard-normal source (numpy PCG64), independent of device and mode."""
    rng = np.random.default_rng(seed)

    def draw(shape: Tuple[int, ...]) -> Tensor:
        return Tensor(rng.standard_normal(shape).astype(np.float32))

    return draw
