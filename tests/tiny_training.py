"""Shared set-up of the training tests: the tiny engine with reference weights, a few trainable
UNet weights, fixed batches, and a diffusers-style hand-written loss."""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from gm.checkpoint.load import load_weights
from gm.models.diffusion import build_engine
from gm.modules.diffusionmodules.loss import sample_noise_and_sigmas

TRAINABLE = [  # a few UNet weights of each kind, by official name
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.1.attn1.to_q.weight",
    "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.2.weight",
    "model.diffusion_model.output_blocks.8.0.out_layers.3.weight",
]
# late UNet weights only: the backward graph stops early, so a train step compiles ~35% faster;
# for the tests of the step's mechanics (the loss tests use TRAINABLE)
LATE_TRAINABLE = [
    "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.output_blocks.8.0.out_layers.3.weight",
]
TOKENS, CONTEXT, ADM = 77, 96, 1600  # the tiny config's conditioning widths


def build_tiny_engine(tiny_weights, trainable=TRAINABLE):
    """The tiny engine with the reference weights; only ``trainable`` parameters require grad."""
    engine = build_engine(tiny_weights.config)
    load_weights(engine, tiny_weights.single_file)
    params = dict(engine.parameters_and_names())
    for param in params.values():
        param.requires_grad = False
    for name in trainable:
        params[name].requires_grad = True
    return engine, [params[name] for name in trainable]


def make_batch(rng, n, engine, sigma_idx=None, noise_offset=0.1):
    """(latents, noise, sigmas, crossattn, vector) for n samples, float32 numpy, 8x8 latents.

    ``sigma_idx`` picks the sigmas from the training table, else they are drawn."""
    latents = rng.standard_normal((n, 4, 8, 8), dtype=np.float32)
    noise, sigmas = sample_noise_and_sigmas(rng, latents.shape, engine.denoiser, noise_offset=noise_offset)
    if sigma_idx is not None:
        sigmas = engine.denoiser.sigmas_np[np.asarray(sigma_idx)].astype(np.float32)
    crossattn = rng.standard_normal((n, TOKENS, CONTEXT), dtype=np.float32)
    vector = rng.standard_normal((n, ADM), dtype=np.float32)
    return latents, noise, sigmas, crossattn, vector


def to_tensors(arrays):
    return [ms.Tensor(a) for a in arrays]


def snr_weight(sigmas, gamma):
    """min(SNR, gamma) / SNR with SNR = 1 / sigma^2 (1 when gamma is None), float64."""
    snr = 1.0 / np.asarray(sigmas, np.float64) ** 2
    return np.ones_like(snr) if gamma is None else np.minimum(snr, gamma) / snr


class EpsMSE(nn.Cell):
    """Hand-written diffusers-style loss: ``mean((unet(x_noisy * c_in, t) - noise)^2)``, t = sigma's
    index in the training table (given), no weighting."""

    def __init__(self, engine):
        super().__init__(auto_prefix=False)
        self.unet = engine.model

    def construct(self, latents, noise, sigma, timestep, crossattn, vector):
        noised = latents + noise * sigma.reshape(-1, 1, 1, 1)
        c_in = 1.0 / ops.sqrt(sigma**2 + 1.0)
        eps = self.unet(noised * c_in.reshape(-1, 1, 1, 1), timestep, crossattn, vector)
        return ((eps - noise) ** 2).mean()


class ValueAndGrads(nn.Cell):
    """Compiled ``value_and_grad`` of a cell over ``weights`` (first output differentiated).

    A Cell rather than an ``ms.jit`` function: a jit function bakes the values of non-trainable
    Parameters (the loss's lambda and gamma) into the graph as constants (measured); a Cell reads
    them on every call.
    """

    def __init__(self, cell, weights, has_aux=False):
        super().__init__(auto_prefix=False)
        self.cell = cell
        self.grad_fn = ms.value_and_grad(cell, None, weights, has_aux=has_aux)

    def construct(self, *inputs):
        return self.grad_fn(*inputs)
