"""Our samplers against diffusers' schedulers (noise-prediction models, and Euler and DPM++ 2M for a
v-prediction one) (k-diffusion's formulas, written here in torch, where
diffusers has none): same model function, same initial (and per-step) noise, trajectories within 1e-4.

The model is a fixed nonlinear noise predictor of (input, timestep) written twice (MindSpore and
torch), so the test isolates the sampler arithmetic, the discretization, the input scaling and the
sigma -> timestep mapping.
"""

import math

import mindspore as ms
import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
)
from mindspore import Tensor, nn, ops

from gm.modules.diffusionmodules.denoiser import DiscreteDenoiser
from gm.modules.diffusionmodules.sampling import (
    AncestralSampler,
    DPMPP2MSampler,
    DPMPP2SAncestralSampler,
    EulerAncestralSampler,
    EulerEDMSampler,
    HeunEDMSampler,
    LCMSampler,
    LinearMultistepSampler,
)

SHAPE = (2, 4, 8, 8)
DDPM = {"target": "gm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing")
rng = np.random.default_rng(0)
A = rng.standard_normal(SHAPE[1:]).astype(np.float32)
B = rng.standard_normal(SHAPE[1:]).astype(np.float32)


def eps_numpy_like(x, t, lib):
    return lib.tanh(x * A_[lib] + B_[lib] * (t / 1000.0)) * 0.8


A_ = {ops: Tensor(A), torch: torch.from_numpy(A)}
B_ = {ops: Tensor(B), torch: torch.from_numpy(B)}


class ToyEps(nn.Cell):
    def construct(self, x, t, context, vector):
        return eps_numpy_like(x, t.reshape(-1, 1, 1, 1), ops)


def _traced_denoiser(scaling: str):
    """The toy network read as ``scaling`` prescribes (a noise or a velocity prediction), recording
    every model input and sigma."""
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    denoiser = DiscreteDenoiser(
        scaling_config={"target": f"gm.modules.diffusionmodules.denoiser_scaling.{scaling}"},
        num_idx=1000, discretization_config=DDPM)
    network = ToyEps()
    trace = []

    def denoise_fn(x, sigma, cond):
        trace.append((x.asnumpy().copy(), float(sigma.asnumpy()[0])))
        return denoiser(network, x, sigma, cond["crossattn"], cond["vector"])

    return denoise_fn, trace


@pytest.fixture(scope="module")
def denoise_and_trace():
    return _traced_denoiser("EpsScaling")


@pytest.fixture(scope="module")
def v_denoise_and_trace():
    """The same network as a v-prediction model; diffusers' schedulers get ``prediction_type="v_prediction"``."""
    return _traced_denoiser("VScaling")


COND = {"crossattn": Tensor(np.zeros((2, 1, 1), np.float32)), "vector": Tensor(np.zeros((2, 1), np.float32))}


def _reference_run(scheduler, noise, steps, to_ve, variance_exploding=True):
    """Run a diffusers scheduler; returns the states (converted by ``to_ve``) and the final sample.

    The first sample is ``noise * sqrt(1 + sigma_max^2)`` (SGM's, the exact marginal at sigma_max)
    for the variance-exploding Euler schedulers: diffusers' own ``init_noise_sigma`` is sigma_max
    for "trailing" spacing, so it is bypassed to give both the same initial latents.
    """
    scheduler.set_timesteps(steps)
    sigma_max = float(scheduler.sigmas[0])
    x = torch.from_numpy(noise) * (math.sqrt(1 + sigma_max**2) if variance_exploding else 1.0)
    states = []
    for t in scheduler.timesteps:
        states.append(x.numpy().copy())
        eps = eps_numpy_like(scheduler.scale_model_input(x, t), t.float(), torch)
        x = scheduler.step(eps, t, x).prev_sample
    return [to_ve(s, i) for i, s in enumerate(states)], x.numpy()


def _assert_close(ours, ref, what):
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(ours - ref).max())
    assert diff <= tol, f"{what}: max diff {diff:.3g} > {tol:.3g}"


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("sampler_class", [EulerEDMSampler, AncestralSampler])  # the reference's takes Euler steps
def test_euler_matches_euler_discrete_trailing(denoise_and_trace, steps, sampler_class):
    denoise_fn, trace = denoise_and_trace
    trace.clear()
    noise = np.random.default_rng(steps).standard_normal(SHAPE).astype(np.float32)
    sampler = sampler_class(discretization_config=DDPM, num_steps=steps)
    final = sampler(denoise_fn, Tensor(noise), COND).asnumpy()
    scheduler = EulerDiscreteScheduler(**SCHEDULE)
    states, ref_final = _reference_run(scheduler, noise, steps, lambda s, i: s)
    assert len(trace) == len(states) == steps
    for i, ((ours, sigma), ref) in enumerate(zip(trace, states)):
        assert math.isclose(sigma, float(scheduler.sigmas[i]), rel_tol=1e-5)
        _assert_close(ours, ref, f"step {i}")
    _assert_close(final, ref_final, "final")


def test_euler_ancestral_matches_given_the_same_noise(denoise_and_trace, monkeypatch):
    denoise_fn, trace = denoise_and_trace
    trace.clear()
    steps = 8
    noise = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    step_noises = [np.random.default_rng(100 + i).standard_normal(SHAPE).astype(np.float32) for i in range(steps)]
    ours_iter = iter(step_noises)
    sampler = EulerAncestralSampler(discretization_config=DDPM, num_steps=steps)
    final = sampler(denoise_fn, Tensor(noise), COND, noise_fn=lambda shape: Tensor(next(ours_iter))).asnumpy()

    import diffusers.schedulers.scheduling_euler_ancestral_discrete as module

    ref_iter = iter(step_noises)
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(next(ref_iter)))
    states, ref_final = _reference_run(EulerAncestralDiscreteScheduler(**SCHEDULE), noise, steps, lambda s, i: s)
    for i, ((ours, _), ref) in enumerate(zip(trace, states)):
        _assert_close(ours, ref, f"step {i}")
    _assert_close(final, ref_final, "final")


def _check_dpmpp_2m(denoise_and_trace, steps: int, **prediction):
    """DPMPP2MSampler against diffusers' 2nd-order DPM-Solver++ (``prediction``: the scheduler's
    prediction_type, when not epsilon), step by step."""
    denoise_fn, trace = denoise_and_trace
    trace.clear()
    noise = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    sampler = DPMPP2MSampler(discretization_config=DDPM, num_steps=steps)
    final = sampler(denoise_fn, Tensor(noise), COND).asnumpy()
    scheduler = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2, **prediction)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.numpy()
    # diffusers' DPM-Solver works on variance-preserving samples x_vp = x / sqrt(1 + sigma^2)
    states, ref_final = _reference_run(scheduler, noise, steps,
                                       lambda s, i: s * math.sqrt(1 + float(sigmas[i]) ** 2), variance_exploding=False)
    for i, ((ours, _), ref) in enumerate(zip(trace, states)):
        _assert_close(ours, ref, f"step {i}")
    _assert_close(final, ref_final, "final")


@pytest.mark.parametrize("steps", [5, 20])
def test_dpmpp_2m_matches_dpm_solver_multistep(denoise_and_trace, steps):
    _check_dpmpp_2m(denoise_and_trace, steps)


# step counts that divide 1000: otherwise diffusers' "trailing" rounds 1000 - k * 1000/n before
# subtracting 1 (n = 3: 999, 666, 332) where sgm truncates linspace(999, 0, n) (999, 666, 333)
@pytest.mark.parametrize("steps", [4, 8])
def test_heun_matches_heun_discrete(denoise_and_trace, steps):
    denoise_fn, trace = denoise_and_trace
    trace.clear()
    noise = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    final = HeunEDMSampler(discretization_config=DDPM, num_steps=steps)(denoise_fn, Tensor(noise), COND).asnumpy()
    scheduler = HeunDiscreteScheduler(**SCHEDULE)
    states, ref_final = _reference_run(scheduler, noise, steps, lambda s, i: s)
    # two network calls per step but the last, each at diffusers' (interleaved) sigma
    assert len(trace) == len(states) == 2 * steps - 1
    for i, ((ours, sigma), ref) in enumerate(zip(trace, states)):
        assert math.isclose(sigma, float(scheduler.sigmas[i]), rel_tol=1e-5), i
        _assert_close(ours, ref, f"call {i}")
    _assert_close(final, ref_final, "final")


@pytest.mark.parametrize("steps", [4, 10])
def test_v_prediction_euler_matches_euler_discrete(v_denoise_and_trace, steps):
    denoise_fn, trace = v_denoise_and_trace
    trace.clear()
    noise = np.random.default_rng(steps).standard_normal(SHAPE).astype(np.float32)
    final = EulerEDMSampler(discretization_config=DDPM, num_steps=steps)(denoise_fn, Tensor(noise), COND).asnumpy()
    scheduler = EulerDiscreteScheduler(**SCHEDULE, prediction_type="v_prediction")
    states, ref_final = _reference_run(scheduler, noise, steps, lambda s, i: s)
    assert len(trace) == len(states) == steps
    for i, ((ours, _), ref) in enumerate(zip(trace, states)):
        _assert_close(ours, ref, f"step {i}")
    _assert_close(final, ref_final, "final")


def test_v_prediction_dpmpp_2m_matches_dpm_solver_multistep(v_denoise_and_trace):
    _check_dpmpp_2m(v_denoise_and_trace, 8, prediction_type="v_prediction")


@pytest.mark.parametrize("steps", [4, 20])
def test_linear_multistep_matches_lms_discrete(denoise_and_trace, steps):
    denoise_fn, trace = denoise_and_trace
    trace.clear()
    noise = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32)
    sampler = LinearMultistepSampler(discretization_config=DDPM, num_steps=steps)
    final = sampler(denoise_fn, Tensor(noise), COND).asnumpy()
    states, ref_final = _reference_run(LMSDiscreteScheduler(**SCHEDULE), noise, steps, lambda s, i: s)
    assert len(trace) == len(states) == steps
    for i, ((ours, _), ref) in enumerate(zip(trace, states)):
        _assert_close(ours, ref, f"step {i}")
    _assert_close(final, ref_final, "final")


def _k_denoised(x, sigma):
    """The test's denoiser as k-diffusion sees it: eps-prediction at the training timestep nearest
    to sigma (sgm's quantized c_noise; a midpoint sigma lies between table entries), scalings from
    the exact sigma."""
    t = float(np.abs(np.exp(LOG_SIGMAS) - sigma).argmin())
    return x - sigma * eps_numpy_like(x / math.sqrt(sigma**2 + 1), torch.tensor(t), torch)


def _ancestral_step(sigma, sigma_next, eta):
    """k-diffusion's ``get_ancestral_step``: (sigma_up, sigma_down)."""
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return up, (sigma_next**2 - up**2) ** 0.5


def _check_against_k_diffusion(denoise_and_trace, sampler_class, reference, eta, seed, calls_per_step):
    """Our sampler and a k-diffusion reference from the same noise and per-step draws: every model
    input and the result."""
    denoise_fn, trace = denoise_and_trace
    trace.clear()
    steps = 6
    noise = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
    step_noises = [np.random.default_rng(seed * 50 + i).standard_normal(SHAPE).astype(np.float32)
                   for i in range(steps)]
    draws = iter(step_noises)
    sampler = sampler_class(discretization_config=DDPM, num_steps=steps, eta=eta)
    final = sampler(denoise_fn, Tensor(noise), COND, noise_fn=lambda shape: Tensor(next(draws))).asnumpy()
    # the reference's sigmas: sgm's timesteps (linspace(999, 0, n) truncated) looked up in the DDPM table
    sigmas = [*np.exp(LOG_SIGMAS[np.linspace(999, 0, steps, endpoint=False).astype(int)]), 0.0]
    inputs, ref_final = reference(noise, [float(v) for v in sigmas], step_noises, eta)
    assert len(trace) == len(inputs) == calls_per_step * steps - (calls_per_step - 1)
    for i, ((ours, _), ref) in enumerate(zip(trace, inputs)):
        _assert_close(ours, ref, f"call {i}")
    _assert_close(final, ref_final, "final")


def _dpmpp_2s_ancestral_reference(noise, sigmas, step_noises, eta=1.0):
    """k-diffusion's ``sample_dpmpp_2s_ancestral`` (Katherine Crowson, MIT), from its published
    formulas, in torch on the test's noise predictor; returns the model inputs and the result."""
    x = torch.from_numpy(noise).double() * math.sqrt(1 + sigmas[0] ** 2)
    inputs = []
    for i in range(len(sigmas) - 1):
        inputs.append(x.numpy().copy())
        d0 = _k_denoised(x, sigmas[i])
        up, down = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + (x - d0) / sigmas[i] * (down - sigmas[i])
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(down)
            h = t_next - t
            s = t + 0.5 * h
            x2 = (math.exp(-s) / math.exp(-t)) * x - math.expm1(-0.5 * h) * d0
            inputs.append(x2.numpy().copy())
            x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * _k_denoised(x2, math.exp(-s))
        if up > 0:
            x = x + torch.from_numpy(step_noises[i]).double() * up
    return inputs, x.numpy()


_BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
_ABAR = np.cumprod(1 - _BETAS)
LOG_SIGMAS = np.log(np.sqrt((1 - _ABAR) / _ABAR))


# eta 1 puts the midpoint exactly on the next sigma (sigma_down = next^2 / sigma); eta 0.5 off the table
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_dpmpp_2s_ancestral_matches_k_diffusion_formulas(denoise_and_trace, eta):
    _check_against_k_diffusion(denoise_and_trace, DPMPP2SAncestralSampler, _dpmpp_2s_ancestral_reference, eta,
                               seed=5, calls_per_step=2)  # the last step (to sigma 0) makes one call


def _euler_ancestral_reference(noise, sigmas, step_noises, eta):
    """k-diffusion's ``sample_euler_ancestral`` (Katherine Crowson, MIT) from its published
    formulas: an Euler step to sigma_down, then fresh noise of std sigma_up."""
    x = torch.from_numpy(noise).double() * math.sqrt(1 + sigmas[0] ** 2)
    inputs = []
    for i in range(len(sigmas) - 1):
        inputs.append(x.numpy().copy())
        denoised = _k_denoised(x, sigmas[i])
        up, down = _ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
        if up > 0:
            x = x + torch.from_numpy(step_noises[i]).double() * up
    return inputs, x.numpy()


# diffusers' EulerAncestralDiscreteScheduler has no eta: eta != 1 against k-diffusion's formulas
@pytest.mark.parametrize("eta", [0.5, 0.0])
def test_euler_ancestral_with_eta_matches_k_diffusion_formulas(denoise_and_trace, eta):
    _check_against_k_diffusion(denoise_and_trace, EulerAncestralSampler, _euler_ancestral_reference, eta,
                               seed=6, calls_per_step=1)


LEADING = {"target": "gm.modules.diffusionmodules.discretizer.DiffusersDDPMDiscretization"}


@pytest.mark.parametrize("steps", [5, 7])
def test_diffusers_ddpm_discretization_matches_the_official_sdxl_scheduler(denoise_and_trace, steps):
    """SDXL base ships EulerDiscreteScheduler with "leading" spacing and steps_offset 1."""
    denoise_fn, trace = denoise_and_trace
    trace.clear()
    noise = np.random.default_rng(6).standard_normal(SHAPE).astype(np.float32)
    final = EulerEDMSampler(discretization_config=LEADING, num_steps=steps)(denoise_fn, Tensor(noise), COND).asnumpy()
    scheduler = EulerDiscreteScheduler(**{**SCHEDULE, "timestep_spacing": "leading", "steps_offset": 1})
    states, ref_final = _reference_run(scheduler, noise, steps, lambda s, i: s)
    assert len(trace) == len(states) == steps
    for i, ((ours, sigma), ref) in enumerate(zip(trace, states)):
        assert math.isclose(sigma, float(scheduler.sigmas[i]), rel_tol=1e-5), i
        _assert_close(ours, ref, f"step {i}")
    _assert_close(final, ref_final, "final")


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_diffusers_ddpm_timesteps_are_diffusers_timesteps(spacing):
    from gm.modules.diffusionmodules.discretizer import DiffusersDDPMDiscretization

    ours = DiffusersDDPMDiscretization(timestep_spacing=spacing)
    for n in (1, 3, 7, 25, 40, 333):  # (n = 1000 "leading": diffusers feeds timestep 1000, past its table)
        scheduler = EulerDiscreteScheduler(**{**SCHEDULE, "timestep_spacing": spacing, "steps_offset": 1})
        scheduler.set_timesteps(n)
        np.testing.assert_array_equal(ours.timesteps(n), scheduler.timesteps.numpy().astype(int), err_msg=f"n={n}")
        np.testing.assert_allclose(ours(n), scheduler.sigmas.numpy(), rtol=1e-5, err_msg=f"n={n}")  # theirs float32



@pytest.mark.parametrize("steps", [1, 4, 6])
def test_lcm_matches_lcm_scheduler(denoise_and_trace, monkeypatch, steps):
    """diffusers' LCMScheduler works on variance-preserving samples and adds its boundary condition
    (c_skip <= 3e-4 at timestep 19, the smallest it uses), within the tolerance."""
    denoise_fn, trace = denoise_and_trace
    trace.clear()
    noise = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    step_noises = [np.random.default_rng(300 + i).standard_normal(SHAPE).astype(np.float32) for i in range(steps)]
    draws = iter(step_noises)
    sampler = LCMSampler(discretization_config={"target": "gm.modules.diffusionmodules.discretizer.LCMDiscretization"},
                         num_steps=steps)
    final = sampler(denoise_fn, Tensor(noise), COND, noise_fn=lambda shape: Tensor(next(draws))).asnumpy()

    import diffusers.schedulers.scheduling_lcm as module

    ref_draws = iter(step_noises)
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(next(ref_draws)))
    scheduler = LCMScheduler(**{**SCHEDULE, "timestep_spacing": "leading"})
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.numpy().astype(np.float64)
    timesteps = scheduler.timesteps.numpy().astype(int)
    x = torch.from_numpy(noise)  # init_noise_sigma 1: the variance-preserving start
    states = []
    for t in scheduler.timesteps:
        states.append(x.numpy() / math.sqrt(abar[int(t)]))  # to the variance-exploding form
        x, denoised = scheduler.step(eps_numpy_like(x, t.float(), torch), t, x, return_dict=False)
    assert len(trace) == len(states) == steps
    for i, ((ours, sigma), ref) in enumerate(zip(trace, states)):
        assert math.isclose(sigma, math.sqrt((1 - abar[timesteps[i]]) / abar[timesteps[i]]), rel_tol=1e-5), i
        _assert_close(ours, ref, f"step {i}")
    _assert_close(final, denoised.numpy(), "final")
