"""DreamBoothLoss on the tiny SDXL with real (reference) weights against a hand-written loss.

The hand-written loss is diffusers' form, one forward pass per sample:
``mean((unet(x_noisy * c_in, t, ...) - noise)^2)`` with t the sigma's index in the training table;
the min-SNR weights min(SNR, gamma) / SNR and lambda are applied in numpy. Its gradients come from
its own compiled ``value_and_grad``. The loss cell runs as one batch of 2B. Graph mode.
Tolerance: 1e-5 relative (loss: of its value; gradients: of the largest reference entry).
"""

import mindspore as ms
import numpy as np
import pytest
from tiny_training import (
    TRAINABLE,
    EpsMSE,
    ValueAndGrads,
    build_tiny_engine,
    make_batch,
    snr_weight,
    to_tensors,
)

from gm.errors import ConfigError
from gm.modules.diffusionmodules.loss import DreamBoothLoss, sample_noise_and_sigmas

RTOL = 1e-5
# B = 2 per half (instance first): sigmas 0.34, 3.33 | 0.14, 1.16 -> min-SNR weights at gamma 5:
# 0.59, 1 | 0.095, 1, so each sample of both halves gets its own weight
SIGMA_IDX = np.array([100, 700, 20, 400])


def _assert_close(ours, theirs, what):
    diff = np.abs(np.asarray(ours, np.float64) - theirs).max()
    scale = np.abs(theirs).max()
    assert diff <= RTOL * scale, f"{what}: max diff {diff:.3g} vs max |reference| {scale:.3g}"


@pytest.fixture(scope="module")
def setup(tiny_weights):
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    return build_tiny_engine(tiny_weights)


@pytest.fixture(scope="module")
def reference(setup):
    """A batch of 2 instance + 2 class samples and, per sample, the hand-written loss and its
    gradients (one compiled graph, called once per sample)."""
    engine, weights = setup
    cell = ValueAndGrads(EpsMSE(engine), weights)
    batch = make_batch(np.random.default_rng(0), 4, engine, SIGMA_IDX)
    timesteps = SIGMA_IDX.astype(np.float32)  # the sigmas' indices in the training table
    values, grads = [], []
    for i in range(4):
        latents, noise, sigma, crossattn, vector = to_tensors(a[i:i + 1] for a in batch)
        value, sample_grads = cell(latents, noise, sigma, ms.Tensor(timesteps[i:i + 1]), crossattn, vector)
        values.append(float(value.asnumpy()))
        grads.append([g.asnumpy().astype(np.float64) for g in sample_grads])
    return batch, np.array(values), grads


@pytest.fixture(scope="module")
def compiled_loss(setup):
    engine, weights = setup
    loss_cell = DreamBoothLoss(engine, with_prior_preservation=True)
    return loss_cell, ValueAndGrads(loss_cell, weights, has_aux=True)


@pytest.mark.parametrize("prior_loss_weight,snr_gamma", [(0.0, None), (0.5, None), (1.0, None), (0.5, 5.0)])
def test_loss_and_gradients_match_hand_written(compiled_loss, reference, prior_loss_weight, snr_gamma):
    loss_cell, loss_and_grads = compiled_loss
    batch, values, sample_grads = reference
    loss_cell.set_weights(prior_loss_weight, snr_gamma)  # no recompilation: held as Parameters
    (loss, loss_instance, loss_class), grads = loss_and_grads(*to_tensors(batch))

    # per-half means of the weighted per-sample losses; the same combination of their gradients
    coef = snr_weight(batch[2], snr_gamma) * np.array([0.5, 0.5, 0.5 * prior_loss_weight, 0.5 * prior_loss_weight])
    weighted = snr_weight(batch[2], snr_gamma) * values
    _assert_close(loss_instance.asnumpy(), weighted[:2].mean(), "loss_instance")
    _assert_close(loss_class.asnumpy(), weighted[2:].mean(), "loss_class")
    _assert_close(loss.asnumpy(), (coef * values).sum(), "loss")
    for k, (name, grad) in enumerate(zip(TRAINABLE, grads)):
        expected = sum(c * g[k] for c, g in zip(coef, sample_grads))
        _assert_close(grad.asnumpy(), expected, f"gradient of {name}")


def test_sample_noise_and_sigmas_is_seeded_and_offsets_per_channel(setup):
    engine, _ = setup
    shape = (64, 4, 8, 8)
    noise, sigmas = sample_noise_and_sigmas(np.random.default_rng(3), shape, engine.denoiser)
    again, sigmas_again = sample_noise_and_sigmas(np.random.default_rng(3), shape, engine.denoiser)
    np.testing.assert_array_equal(noise, again)
    np.testing.assert_array_equal(sigmas, sigmas_again)
    assert noise.dtype == sigmas.dtype == np.float32 and sigmas.shape == (64,)
    assert set(sigmas.tolist()) <= set(engine.denoiser.sigmas_np.astype(np.float32).tolist())
    assert len(set(sigmas.tolist())) > 50  # uniform over 1000 levels: few repeats in 64 draws
    offset, _ = sample_noise_and_sigmas(np.random.default_rng(3), shape, engine.denoiser, noise_offset=0.5)
    shift = offset - noise  # the same draws come first, then one offset per (sample, channel)
    np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :, :1, :1], shape), atol=1e-6)
    assert 0.3 < shift[:, :, 0, 0].std() < 0.7


def test_text_encoder_variant_computes_conditioning_in_graph(tiny_weights, compiled_loss):
    """train_text_encoder=True: from token ids, the same loss as from the precomputed conditioning,
    and the text-encoder weight gets a gradient (PyNative, one forward and backward)."""
    name = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    engine, weights = build_tiny_engine(tiny_weights, TRAINABLE + [name])
    with pytest.raises(ConfigError, match="text-encoder parameters are trainable"):
        DreamBoothLoss(engine, with_prior_preservation=True)
    conditioner = engine.conditioner
    with pytest.raises(ConfigError, match="embedders.0 have trainable parameters but are frozen"):
        DreamBoothLoss(engine, with_prior_preservation=True, train_text_encoder=True)
    conditioner.embedders[0].is_trainable = True
    conditioner.frozen = (False,) + conditioner.frozen[1:]
    loss_cell = DreamBoothLoss(engine, with_prior_preservation=True, train_text_encoder=True)

    rng = np.random.default_rng(2)
    latents, noise, sigmas = make_batch(rng, 4, engine)[:3]
    cond_inputs = conditioner.prepare_inputs({
        "txt": ["a photo of sks dog"] * 2 + ["a photo of dog"] * 2, "original_size_as_tuple": [64, 64],
        "crop_coords_top_left": [0, 0], "target_size_as_tuple": [64, 64]})
    args = to_tensors((latents, noise, sigmas))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        crossattn, vector = conditioner(*cond_inputs)
        (loss, _, _), grads = ms.value_and_grad(loss_cell, None, weights, has_aux=True)(*args, *cond_inputs)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    # the module's compiled loss has the same weights (same file) and takes the conditioning as input
    reference_cell, reference_fn = compiled_loss
    reference_cell.set_weights(1.0, None)
    (expected, _, _), expected_grads = reference_fn(*args, crossattn, vector)
    _assert_close(loss.asnumpy(), float(expected.asnumpy()), "loss from token ids")
    _assert_close(grads[0].asnumpy(), expected_grads[0].asnumpy().astype(np.float64), "UNet gradient")
    text_grad = grads[-1].asnumpy()
    assert np.isfinite(text_grad).all() and np.abs(text_grad).max() > 0


def test_without_prior_preservation_every_sample_is_an_instance_sample(setup, reference):
    """Without prior preservation: the mean over all samples of the weighted per-sample losses
    (PyNative forward: cheaper than compiling another graph)."""
    engine, _ = setup
    batch, values, _ = reference
    loss_cell = DreamBoothLoss(engine, with_prior_preservation=False, snr_gamma=5.0)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        loss, loss_instance, loss_class = loss_cell(*to_tensors(batch))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    expected = (snr_weight(batch[2], 5.0) * values).mean()
    _assert_close(loss.asnumpy(), expected, "loss")
    _assert_close(loss_instance.asnumpy(), expected, "loss_instance")
    assert float(loss_class.asnumpy()) == 0.0
