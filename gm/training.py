"""Training-run plumbing around the train step: the per-sample random draws, the frozen inputs
(VAE latents, text conditioning) computed outside the gradient, the fixed-noise progress probe, and
LoRA checkpoint writing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor, nn

from gm.checkpoint.lora import save_lora
from gm.modules.diffusionmodules.loss import sample_noise_and_sigmas

_logger = logging.getLogger(__name__)
# SeedSequence entropy word of the training draws (the dataset's order/class/augment streams are 0-2)
_DRAW_STREAM = 3


def per_sample_draws(seed: int, positions: Sequence[int], num_kinds: int, latent_shape: Tuple[int, int, int],
                     denoiser, noise_offset: float = 0.0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The random draws of one micro-batch, each sample's a function of its global stream position.

    Row order as ``gm.data.dreambooth.model_inputs``: every position's instance sample (kind 0),
    then, with prior preservation, every position's class sample (kind 1). Row ``(kind, p)`` draws
    from ``default_rng([seed, 3, p, kind])``: the VAE posterior noise, then sigma and noise as
    ``sample_noise_and_sigmas``. So a sample gets the same draws whichever rank trains it and
    whatever the batch size: W ranks x batch B see exactly what 1 process x batch W*B sees, and a
    resumed run continues the same stream.

    Args:
        positions: (B,) the batch's stream positions (``batch["positions"]``).
        num_kinds: 1 (instance only) or 2 (instance + class).
        latent_shape: (C, H/8, W/8).
    Returns:
        ``(posterior_noise, noise, sigmas)``: float32 (N, C, h, w), (N, C, h, w), (N,) with N = kinds x B.
    """
    posterior, noise, sigmas = [], [], []
    for kind in range(num_kinds):
        for position in positions:
            rng = np.random.default_rng([seed, _DRAW_STREAM, int(position), kind])
            posterior.append(rng.standard_normal((1, *latent_shape), dtype=np.float32))
            row_noise, row_sigma = sample_noise_and_sigmas(rng, (1, *latent_shape), denoiser, noise_offset)
            noise.append(row_noise)
            sigmas.append(row_sigma)
    return np.concatenate(posterior), np.concatenate(noise), np.concatenate(sigmas)


class EncodeStep(nn.Cell):
    """Images (N, 3, R, R) in [-1, 1] -> scaled latents, sampling the posterior with ``noise``."""

    def __init__(self, engine: nn.Cell):
        super().__init__(auto_prefix=False)
        self.engine = engine

    def construct(self, images: Tensor, noise: Tensor) -> Tensor:
        return self.engine.encode_first_stage(images, noise)


class FrozenInputs:
    """The work no gradient flows through, done once per micro-batch before the train step.

    Returns ``(latents, cond_inputs)``: latents (N, 4, R/8, R/8) sampled from the VAE posterior
    with the given unit noise (as diffusers' ``latent_dist.sample()``; the posterior mean when the
    noise is None) and either the precomputed ``(crossattn, vector)`` or, when the text encoders
    train, the conditioner's token-id and size inputs (the conditioning is then computed inside
    the gradient).
    """

    def __init__(self, engine: nn.Cell, train_text_encoder: bool = False):
        self.engine = engine
        self.encode_step = EncodeStep(engine)
        self.train_text_encoder = train_text_encoder

    @staticmethod
    def latent_shape(pixels: np.ndarray) -> Tuple[int, int, int]:
        """(C, H/8, W/8) of the latents of ``pixels`` (N, 3, H, W)."""
        return 4, pixels.shape[2] // 8, pixels.shape[3] // 8

    def latents(self, pixels: np.ndarray, noise: Optional[np.ndarray]) -> Tensor:
        """pixels (N, 3, H, W), noise (N, 4, H/8, W/8) float32 or None (posterior mean)."""
        if noise is None:
            noise = np.zeros((pixels.shape[0], *self.latent_shape(pixels)), np.float32)
        return self.encode_step(Tensor(pixels), Tensor(noise))

    def conditioning(self, cond_batch: Mapping) -> Tuple[Tensor, ...]:
        conditioner = self.engine.conditioner
        if self.train_text_encoder:
            return conditioner.prepare_inputs(cond_batch)
        cond = conditioner.encode(cond_batch)
        return cond["crossattn"], cond["vector"]

    def __call__(self, pixels: np.ndarray, cond_batch: Mapping,
                 posterior_noise: Optional[np.ndarray]) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        return self.latents(pixels, posterior_noise), self.conditioning(cond_batch)


class _PerSampleLoss(nn.Cell):
    def __init__(self, loss_cell: nn.Cell):
        super().__init__(auto_prefix=False)
        self.loss_cell = loss_cell

    def construct(self, latents, noise, sigmas, crossattn, vector):
        return self.loss_cell.per_sample_loss(latents, noise, sigmas, crossattn, vector)


def fixed_noise_instance_loss(loss_cell: nn.Cell, frozen: FrozenInputs, dataset, seed: int,
                              sigma_indices: Tuple[int, ...] = (99, 299, 499, 699, 899)) -> Callable[[], float]:
    """A progress probe: the mean denoising loss over every instance image at fixed noise levels
    and fixed noise (posterior means, the first crop of each image), recomputed with the current
    weights on each call. Unlike the training loss it does not move with the random draws."""
    views = [dataset.sample(i)["instance"] for i in range(len(dataset.instance_paths))]
    pixels = np.stack([v["pixels"] for v in views])
    batch = {"txt": [v["prompt"] for v in views]}
    for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"):
        batch[key] = np.stack([v[key] for v in views])
    n, k = len(views), len(sigma_indices)
    repeat = np.repeat(np.arange(n), k)  # image i at every noise level
    sigmas = np.tile(np.asarray(frozen.engine.denoiser.sigmas_np, np.float32)[list(sigma_indices)], n)
    latent_shape = (4, pixels.shape[2] // 8, pixels.shape[3] // 8)
    noise = np.random.default_rng([seed, 7919]).standard_normal((n * k, *latent_shape)).astype(np.float32)
    per_sample = _PerSampleLoss(loss_cell)

    def probe() -> float:
        latents = frozen.latents(pixels, None).asnumpy()[repeat]
        cond = frozen.engine.conditioner.encode(batch)
        losses = per_sample(Tensor(latents), Tensor(noise), Tensor(sigmas),
                            Tensor(cond["crossattn"].asnumpy()[repeat]), Tensor(cond["vector"].asnumpy()[repeat]))
        return float(losses.asnumpy().mean())

    return probe


class CheckpointWriter:
    """LoRA checkpoints every N steps as ``.safetensors`` and the seed's ``*_lora.ckpt``, keeping
    the newest ``keep`` (all when None). Only the main rank writes (``enabled``)."""

    def __init__(self, folder: Path, keep: Optional[int] = None, enabled: bool = True,
                 metadata: Optional[Dict[str, object]] = None):
        self.folder = Path(folder)
        self.keep = keep
        self.enabled = enabled
        self.metadata = dict(metadata or {})
        self.saved: List[Tuple[Path, Path]] = []
        self.latest: Optional[Path] = None

    def paths(self, step: int) -> Tuple[Path, Path]:
        stem = f"sdxl_lora_step{step:06d}"
        return self.folder / f"{stem}.safetensors", self.folder / f"{stem}_lora.ckpt"

    def save(self, engine: nn.Cell, step: int) -> None:
        if not self.enabled:
            return
        safetensors_path, ckpt_path = self.paths(step)
        metadata = {**self.metadata, "step": step}
        save_lora(engine, safetensors_path, metadata)
        save_lora(engine, ckpt_path, metadata)
        self.saved.append((safetensors_path, ckpt_path))
        self.latest = safetensors_path
        while self.keep is not None and len(self.saved) > self.keep:
            for old in self.saved.pop(0):
                old.unlink(missing_ok=True)
        _logger.info("step %d: LoRA saved to %s", step, safetensors_path)

