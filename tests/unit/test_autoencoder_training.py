"""Training the VAE from scratch (the toy-world base model): its loss against numpy, and the exact
latent rescale that gives a fresh VAE the latent scale its config expects."""

import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from gm.models.autoencoder import AutoencoderKL, AutoencoderLoss, rescale_latent_space

DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope="module")
def vae():
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    ms.set_seed(0)
    model = AutoencoderKL(4, DDCONFIG)
    yield model
    ms.set_context(mode=ms.GRAPH_MODE)


def _images(seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)


def test_loss_is_l1_reconstruction_plus_weighted_kl(vae):
    images = _images()
    noise = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    loss, reconstruction, kl = (float(t.asnumpy()) for t in AutoencoderLoss(vae, 0.25)(Tensor(images), Tensor(noise)))
    mean, logvar = (t.asnumpy().astype(np.float64) for t in vae.encode(Tensor(images)))
    decoded = vae.decode(Tensor((mean + np.exp(0.5 * logvar) * noise).astype(np.float32))).asnumpy()
    expected_rec = np.abs(decoded - images).mean()
    expected_kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1.0 - logvar).mean()
    assert reconstruction == pytest.approx(expected_rec, rel=1e-5)
    assert kl == pytest.approx(expected_kl, rel=1e-5)
    assert loss == pytest.approx(expected_rec + 0.25 * expected_kl, rel=1e-5)


def test_rescaling_the_latent_space_scales_the_posterior_and_keeps_every_decoded_image(vae):
    images = Tensor(_images(2))
    mean, logvar = (t.asnumpy() for t in vae.encode(images))
    latent = np.random.default_rng(3).standard_normal(mean.shape).astype(np.float32)
    decoded = vae.decode(Tensor(latent)).asnumpy()
    rescale_latent_space(vae, 3.0)
    mean3, logvar3 = (t.asnumpy() for t in vae.encode(images))
    np.testing.assert_allclose(mean3, 3.0 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logvar3, logvar + 2 * math.log(3.0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vae.decode(Tensor(3.0 * latent)).asnumpy(), decoded, rtol=1e-4, atol=1e-5)
    rescale_latent_space(vae, 1 / 3.0)  # back, for the other tests of the module
