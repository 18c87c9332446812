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
# instance sigma 0.34, class sigma 0.14 -> min-SNR weights 0.59 and 0.095 at gamma 5
SIGMA_IDX = np.array([100, 20])


def _assert_close(ours, theirs, what):
    diff = np.abs(np.asarray(ours, np.float64) - theirs).max()
    scale = np.abs(theirs).max()
    assert diff <= RTOL * scale, f"{what}: max diff {diff:.3g} vs max |reference| {scale:.3g}"


@pytest.fixture(scope="module")
def setup(tiny_weights):
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    return build_tiny_engine(tiny_weights)


@pytest.fixture(scope="module")
def hand_written(setup):
    """``sample arrays -> (loss, gradients)`` of the hand-written loss of one sample (compiled once)."""
    engine, weights = setup
    cell = ValueAndGrads(EpsMSE(engine), weights)

    def run(latents, noise, sigma, crossattn, vector):
        timestep = engine.denoiser.sigma_to_idx(ms.Tensor(sigma)).astype(ms.float32)
        value, grads = cell(*to_tensors((latents, noise, sigma)), timestep, *to_tensors((crossattn, vector)))
        return float(value.asnumpy()), [g.asnumpy().astype(np.float64) for g in grads]

    return run


@pytest.fixture(scope="module")
def reference(setup, hand_written):
    """A batch of B = 1 per half and the per-half hand-written losses and gradients."""
    engine, _ = setup
    batch = make_batch(np.random.default_rng(0), 2, engine, SIGMA_IDX)
    return batch, [hand_written(*(a[i:i + 1] for a in batch)) for i in range(2)]


@pytest.fixture(scope="module")
def compiled_loss(setup):
    engine, weights = setup
    loss_cell = DreamBoothLoss(engine, with_prior_preservation=True)
    return loss_cell, ValueAndGrads(loss_cell, weights, has_aux=True)


@pytest.mark.parametrize("prior_loss_weight,snr_gamma", [(0.0, None), (0.5, None), (1.0, None), (0.5, 5.0)])
def test_loss_and_gradients_match_hand_written(compiled_loss, reference, prior_loss_weight, snr_gamma):
    loss_cell, loss_and_grads = compiled_loss
    batch, ((value_i, grads_i), (value_c, grads_c)) = reference
    loss_cell.set_weights(prior_loss_weight, snr_gamma)  # no recompilation: held as Parameters
    (loss, loss_instance, loss_class), grads = loss_and_grads(*to_tensors(batch))

    w_i, w_c = snr_weight(batch[2], snr_gamma)
    expected_i, expected_c = w_i * value_i, w_c * value_c
    _assert_close(loss_instance.asnumpy(), expected_i, "loss_instance")
    _assert_close(loss_class.asnumpy(), expected_c, "loss_class")
    _assert_close(loss.asnumpy(), expected_i + prior_loss_weight * expected_c, "loss")
    for name, grad, g_i, g_c in zip(TRAINABLE, grads, grads_i, grads_c):
        _assert_close(grad.asnumpy(), w_i * g_i + prior_loss_weight * w_c * g_c, f"gradient of {name}")


def test_min_snr_weights_each_sample_of_both_halves(setup, hand_written):
    """B = 2 per half with four different sigmas: each sample gets its own weight, in both halves."""
    engine, _ = setup
    batch = make_batch(np.random.default_rng(1), 4, engine, [100, 700, 20, 400])
    per_sample = np.array([hand_written(*(a[i:i + 1] for a in batch))[0] for i in range(4)])
    weighted = snr_weight(batch[2], 5.0) * per_sample
    prior = DreamBoothLoss(engine, with_prior_preservation=True, prior_loss_weight=0.5, snr_gamma=5.0)
    single = DreamBoothLoss(engine, with_prior_preservation=False, snr_gamma=5.0)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # forward only: cheaper than compiling two more graphs
    try:
        loss, loss_instance, loss_class = prior(*to_tensors(batch))
        single = single(*to_tensors(batch))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    _assert_close(loss_instance.asnumpy(), weighted[:2].mean(), "loss_instance")
    _assert_close(loss_class.asnumpy(), weighted[2:].mean(), "loss_class")
    _assert_close(loss.asnumpy(), weighted[:2].mean() + 0.5 * weighted[2:].mean(), "loss")
    # without prior preservation all samples are instance samples
    _assert_close(single[0].asnumpy(), weighted.mean(), "loss without prior preservation")
    _assert_close(single[1].asnumpy(), weighted.mean(), "loss_instance without prior preservation")
    assert float(single[2].asnumpy()) == 0.0


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
    latents, noise, sigmas = make_batch(rng, 2, engine)[:3]
    cond_inputs = conditioner.prepare_inputs({
        "txt": ["a photo of sks dog", "a photo of dog"], "original_size_as_tuple": [64, 64],
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
