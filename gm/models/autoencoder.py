"""SDXL's KL autoencoder (the "first stage"): image <-> latent.

Parameter names are the official single-file ones under ``first_stage_model.``: ``encoder.*``,
``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``. The latent scale factor (0.13025 for SDXL)
is applied by the diffusion engine, not here, as in sgm.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Tuple

import numpy as np
from mindspore import Tensor, nn, ops

from gm.modules.diffusionmodules.model import Decoder, Encoder
from gm.modules.distributions import DiagonalGaussianDistribution, gaussian_sample, split_moments
from gm.modules.layers import Conv2d


class AutoencoderKL(nn.Cell):
    """Encoder -> quant_conv -> N(mean, var) posterior; post_quant_conv -> Decoder.

    Args:
        embed_dim: latent channels after ``quant_conv`` (4 for SDXL; the encoder's own are
            ``ddconfig['z_channels']``).
        ddconfig: the encoder/decoder config (``ch``, ``ch_mult``, ``num_res_blocks``,
            ``z_channels``, ``double_z`` (must be True), ``in_channels``, ``out_ch``, ``resolution``,
            ``attn_resolutions``, ``dropout``), shared by both halves as in sgm.
    """

    def __init__(self, embed_dim: int, ddconfig: Mapping[str, Any]):
        super().__init__()
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: True (the encoder outputs mean and logvar)")
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = Conv2d(embed_dim, z_channels, 1)

    def moments(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> posterior moments (B, 2*embed_dim, H/8, W/8): mean; logvar."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, embed_dim, H/8, W/8), logvar clamped.

        Graph-safe. Sample a latent with ``gaussian_sample(mean, logvar, noise)``, then scale it.
        """
        return split_moments(self.moments(x))

    def posterior(self, x: Tensor) -> DiagonalGaussianDistribution:
        """The latent distribution of images ``x`` (B, 3, H, W), for host-side (PyNative) use."""
        return DiagonalGaussianDistribution(self.moments(x))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents (B, embed_dim, h, w) -> images (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def construct(self, x: Tensor) -> Tensor:
        """Deterministic reconstruction: decode the posterior mean of ``x`` (B, 3, H, W)."""
        mean, _ = self.encode(x)
        return self.decode(mean)


class AutoencoderLoss(nn.Cell):
    """``(images, noise) -> (loss, reconstruction, kl)`` for training the autoencoder from scratch.

    The reconstruction of a posterior sample (``mean + std * noise``) against the input, as the
    mean absolute error per pixel, plus ``kl_weight`` times the KL divergence of the posterior from
    N(0, 1), averaged per latent element (sgm's ``LPIPSWithDiscriminator`` without the perceptual
    and adversarial terms, with means instead of per-image sums). ``noise`` is drawn on the host.
    """

    def __init__(self, vae: AutoencoderKL, kl_weight: float):
        super().__init__(auto_prefix=False)
        self.vae = vae
        self.kl_weight = float(kl_weight)

    def construct(self, images: Tensor, noise: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self.vae.encode(images)
        decoded = self.vae.decode(gaussian_sample(mean, logvar, noise))
        reconstruction = ops.abs(decoded - images).mean()
        kl = 0.5 * (mean * mean + ops.exp(logvar) - 1.0 - logvar).mean()
        return reconstruction + self.kl_weight * kl, reconstruction, kl


def rescale_latent_space(vae: AutoencoderKL, factor: float) -> None:
    """Make the posterior's latents ``factor`` times larger without changing any decoded image.

    ``quant_conv``'s mean rows (weight and bias) are multiplied by ``factor``, its log-variance
    bias grows by ``2 ln factor``, and ``post_quant_conv``'s weight is divided by ``factor`` (it is
    linear in the latent). Used to give a freshly trained VAE the latent scale its model config's
    ``scale_factor`` expects (scaled latents of unit standard deviation).
    """
    z = vae.embed_dim
    weight = vae.quant_conv.weight.asnumpy().copy()
    bias = vae.quant_conv.bias.asnumpy().copy()
    weight[:z] *= factor
    bias[:z] *= factor
    bias[z:] += 2.0 * math.log(factor)
    vae.quant_conv.weight.set_data(Tensor(weight.astype(np.float32)))
    vae.quant_conv.bias.set_data(Tensor(bias.astype(np.float32)))
    post = vae.post_quant_conv.weight.asnumpy() / factor
    vae.post_quant_conv.weight.set_data(Tensor(post.astype(np.float32)))
