"""The DreamBooth denoising loss: the only place the diffusion and prior-preservation loss is computed.

SDXL's training objective (sgm ``StandardDiffusionLoss`` with ``DiscreteSampling``): for clean
latents ``x``, a noise level ``sigma`` drawn uniformly from the 1000 training sigmas and noise ``n``,

    loss(x) = w(sigma) * mean_{C,H,W} (D(x + sigma * n, sigma) - x)^2,

where ``D`` is the engine's denoiser and ``w`` its scaling's ``loss_weight``, which makes this the
MSE on the network's own target: eps scaling (SDXL base), ``w = sigma^-2`` (sgm's ``EpsWeighting``)
and ``mean (eps_pred - n)^2``; v scaling, ``w = (sigma^2 + 1) / sigma^2`` (``VWeighting``) and
``mean (v_pred - v)^2`` with diffusers' ``get_velocity`` target. Optional min-SNR-gamma weighting
(Hang et al. 2023, arXiv 2303.09556) multiplies by ``min(w, gamma) / w``: ``w`` is the SNR for eps
and SNR + 1 for v, the forms diffusers' DreamBooth scripts use with ``--snr_gamma``.

DreamBooth prior preservation (Ruiz et al. 2022, arXiv 2208.12242): instance and class samples run
through the UNet as one batch of 2B (instance first) and
``loss = mean(instance half) + prior_loss_weight * mean(class half)``; the weighting above is
applied per sample, to both halves.

Randomness is an input: ``sample_noise_and_sigmas`` draws noise and sigmas on the host from a
seeded numpy Generator, so a fixed batch and fixed draws give a deterministic loss and each
data-parallel rank can draw its own.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from gm.errors import ConfigError


def sample_noise_and_sigmas(rng: np.random.Generator, shape: Tuple[int, ...], denoiser,
                            noise_offset: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
    """Host-side draws for one training batch.

    Args:
        rng: the seeded generator (one per data-parallel rank).
        shape: latent shape (N, C, H, W); N = 2B with prior preservation (every sample, instance or
            class, gets its own sigma, as diffusers' scripts draw timesteps for the whole batch).
        denoiser: a ``DiscreteDenoiser`` (its ``sigmas_np``: the training sigmas, ascending).
        noise_offset: adds ``noise_offset * N(0, 1)`` of shape (N, C, 1, 1) to the noise (a per
            channel shift that lets the model learn very dark/bright images; 0 disables).
    Returns:
        ``(noise, sigmas)``: float32 (N, C, H, W) and float32 (N,). Draw order: sigma indices
        (uniform over the table, sgm's ``DiscreteSampling``), noise, then the offset noise.
    """
    sigma_table = np.asarray(denoiser.sigmas_np)
    idx = rng.integers(0, len(sigma_table), size=shape[0])
    noise = rng.standard_normal(shape, dtype=np.float32)
    if noise_offset:
        noise += np.float32(noise_offset) * rng.standard_normal((shape[0], shape[1], 1, 1), dtype=np.float32)
    return noise, sigma_table[idx].astype(np.float32)


class PrecomputedConditioning(nn.Cell):
    """The conditioning sub-cell for frozen text encoders: ``(crossattn, vector)`` pass through.

    The other variant is the engine's ``GeneralConditioner`` itself (token ids and sizes in,
    ``(crossattn, vector)`` out), used when text-encoder parameters are trained.
    """

    def construct(self, crossattn: Tensor, vector: Tensor) -> Tuple[Tensor, Tensor]:
        """crossattn (N, 77, D), vector (N, adm) -> the same two tensors."""
        return crossattn, vector


class CaptionDropConditioning(nn.Cell):
    """The conditioner in the graph, with the text of chosen samples zeroed (classifier-free guidance
    training: sampling's unconditional branch zeroes the text part of crossattn and the pooled
    columns of vector, ``get_unconditional_conditioning``).

    ``construct(*conditioner_inputs, drop)``; drop: (N,) float32, 1 where the caption is dropped.
    ``text_columns``: (crossattn columns, vector columns) float32 rows, 1 where the text encoders write.
    """

    def __init__(self, conditioner: nn.Cell, text_columns: Tuple[np.ndarray, np.ndarray]):
        super().__init__(auto_prefix=False)  # parameter names stay the engine's conditioner.*
        self.conditioner = conditioner
        self.text_crossattn = Tensor(text_columns[0])
        self.text_vector = Tensor(text_columns[1])

    def construct(self, *inputs) -> Tuple[Tensor, Tensor]:
        """The conditioner's inputs, then drop -> (crossattn, vector)."""
        crossattn, vector = self.conditioner(*inputs[:-1])
        drop = inputs[-1]
        crossattn = crossattn * (1.0 - drop.reshape(-1, 1, 1) * self.text_crossattn)
        vector = vector * (1.0 - drop.reshape(-1, 1) * self.text_vector)
        return crossattn, vector


class DreamBoothLoss(nn.Cell):
    """``(latents, noise, sigmas, *conditioning inputs) -> (loss, loss_instance, loss_class)``.

    Args:
        engine: the ``DiffusionEngine`` (its ``denoise`` and, when training text encoders, its
            ``conditioner``). Held with ``auto_prefix=False``: parameter names stay the engine's.
        with_prior_preservation: inputs hold 2B samples, instance first, class second.
        prior_loss_weight: lambda in ``loss_instance + lambda * loss_class``.
        snr_gamma: min-SNR-gamma weighting; None disables it.
        train_text_encoder: compute the conditioning in the graph from the conditioner's inputs
            (token ids, sizes) instead of taking precomputed ``(crossattn, vector)``. Text-encoder
            parameters must be marked trainable (and their embedders not frozen) before this cell
            is built; with precomputed conditioning no conditioner parameter may be trainable.

    ``prior_loss_weight`` and ``snr_gamma`` are held as non-trainable Parameters, so changing
    them does not recompile the graph (gamma = +inf is "off": min(1, inf * sigma^2) = 1).
    """

    def __init__(self, engine: nn.Cell, *, with_prior_preservation: bool, prior_loss_weight: float = 1.0,
                 snr_gamma: Optional[float] = None, train_text_encoder: bool = False):
        super().__init__(auto_prefix=False)
        _check_conditioner(engine.conditioner, train_text_encoder)
        if prior_loss_weight < 0:
            raise ConfigError(f"prior_loss_weight {prior_loss_weight}: must be >= 0")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ConfigError(f"snr_gamma {snr_gamma}: must be > 0 (or None to disable min-SNR weighting)")
        self.engine = engine
        self.conditioning = engine.conditioner if train_text_encoder else PrecomputedConditioning()
        self.with_prior_preservation = with_prior_preservation
        self.prior_loss_weight = Parameter(Tensor(float(prior_loss_weight), ms.float32),
                                           name="loss.prior_loss_weight", requires_grad=False)
        self.snr_gamma = Parameter(Tensor(float("inf") if snr_gamma is None else float(snr_gamma), ms.float32),
                                   name="loss.snr_gamma", requires_grad=False)

    def set_weights(self, prior_loss_weight: float, snr_gamma: Optional[float]) -> None:
        """Change lambda and gamma (None: off) without recompiling.

        ``ops.assign`` writes into the Parameter's memory; ``Parameter.set_data`` after a graph has
        run can detach the Parameter from that graph (measured on MindSpore 2.10, graph mode).
        """
        ops.assign(self.prior_loss_weight, Tensor(float(prior_loss_weight), ms.float32))
        ops.assign(self.snr_gamma, Tensor(float("inf") if snr_gamma is None else float(snr_gamma), ms.float32))

    def per_sample_loss(self, latents: Tensor, noise: Tensor, sigmas: Tensor, crossattn: Tensor,
                        vector: Tensor) -> Tensor:
        """Weighted denoising loss of each sample, (N,) float32.

        latents, noise: (N, C, H, W); sigmas: (N,); crossattn: (N, 77, D); vector: (N, adm).
        """
        noised = latents + noise * sigmas.reshape(-1, 1, 1, 1)
        denoised = self.engine.denoise(noised, sigmas, crossattn, vector).astype(ms.float32)
        mse = ((denoised - latents) ** 2).mean(axis=(1, 2, 3))  # (N,)
        # The target's weight w (eps: SNR = sigma^-2; v: SNR + 1) times min-SNR's min(w, gamma) / w,
        # as diffusers' DreamBooth scripts weight each prediction type: min(w, gamma).
        weight = ops.minimum(self.engine.denoiser.scaling.loss_weight(sigmas), self.snr_gamma)
        return mse * weight

    def construct(self, latents: Tensor, noise: Tensor, sigmas: Tensor, *cond_inputs) -> Tuple[Tensor, Tensor, Tensor]:
        """Args:
            latents: (N, 4, h, w) scaled VAE latents (N = 2B with prior preservation, instance first).
            noise: (N, 4, h, w) and sigmas: (N,) from ``sample_noise_and_sigmas``.
            cond_inputs: ``crossattn (N, 77, D), vector (N, adm)``, or with ``train_text_encoder``
                the conditioner's inputs (``GeneralConditioner.prepare_inputs``).
        Returns:
            ``(loss, loss_instance, loss_class)`` float32 scalars; loss_class is 0 without prior
            preservation.
        """
        crossattn, vector = self.conditioning(*cond_inputs)
        losses = self.per_sample_loss(latents, noise, sigmas, crossattn, vector)
        if self.with_prior_preservation:
            half = losses.shape[0] // 2
            loss_instance = losses[:half].mean()
            loss_class = losses[half:].mean()
            return loss_instance + self.prior_loss_weight * loss_class, loss_instance, loss_class
        loss_instance = losses.mean()
        return loss_instance, loss_instance, ops.zeros_like(loss_instance)


def _check_conditioner(conditioner: nn.Cell, train_text_encoder: bool) -> None:
    """Trainable text-encoder parameters need the in-graph conditioner, and it must not cut their gradient."""
    trainable = [name for name, p in conditioner.parameters_and_names() if p.requires_grad]
    if not train_text_encoder:
        if trainable:
            raise ConfigError(f"{len(trainable)} text-encoder parameters are trainable (first: conditioner."
                              f"{trainable[0]}) but the loss takes precomputed conditioning; build it with "
                              "train_text_encoder=True (--train_text_encoder) or freeze them")
        return
    if not trainable:
        raise ConfigError("train_text_encoder=True but no conditioner parameter is trainable; add the "
                          "text-encoder LoRA (or mark parameters trainable) before building the loss")
    frozen = [f"embedders.{i}" for i, (emb, is_frozen) in enumerate(zip(conditioner.embedders, conditioner.frozen))
              if is_frozen and any(p.requires_grad for p in emb.get_parameters())]
    if frozen:
        raise ConfigError(f"{', '.join(frozen)} have trainable parameters but are frozen (their outputs are "
                          "wrapped in stop_gradient); set is_trainable and update conditioner.frozen first")
