"""Training-run plumbing around the train step: the per-sample random draws, the fixed-noise
progress probe, and LoRA checkpoint writing (the frozen inputs are in ``gm.frozen_inputs``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor, nn

from gm.checkpoint.lora import save_lora
from gm.data.dreambooth import collate, model_inputs
from gm.frozen_inputs import FrozenInputs, eager, sample_latents
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


class _PerSampleLoss(nn.Cell):
    def __init__(self, loss_cell: nn.Cell):
        super().__init__(auto_prefix=False)
        self.loss_cell = loss_cell

    def construct(self, latents, noise, sigmas, crossattn, vector):
        return self.loss_cell.per_sample_loss(latents, noise, sigmas, crossattn, vector)


def fixed_noise_instance_loss(train_step, frozen: FrozenInputs, dataset, seed: int, batch_size: int,
                              reuse_train_step: bool,
                              sigma_indices: Tuple[int, ...] = (99, 299, 499, 699, 899)) -> Callable[[], float]:
    """A progress probe: the mean denoising loss over the instance samples at the first
    :func:`probe_positions` (posterior means) at fixed noise levels and fixed noise, recomputed
    with the current weights on each call. Unlike the training loss it does not move with the
    random draws. Row j is image ``j % n`` at level ``j % k`` for ``max(n, k)`` rows: every
    image and every level appears, at 1/k of the cost of every image at every level (each call
    costs a train step below). The latents (and, with frozen text encoders, the conditioning)
    are computed once.

    ``reuse_train_step`` (graph mode or PyNative with compiled UNet levels, no LoRA dropout): the
    rows go through the compiled train step itself (``TrainStep.measure``: its losses, no update),
    so the probe compiles nothing of its own (a forward-only graph cost ~25 s of the tiny run's
    first step, and ~7 GB and 4 minutes at full size); each call's instance (and class) half holds
    ``batch_size`` distinct probe rows, a half mean counting for its rows, and rows left over fill
    a half alone, repeated. Otherwise (all-eager PyNative, where nothing is compiled; LoRA dropout,
    which the train mode applies) the loss cell's per-sample loss runs in eval mode on chunks of
    the micro-batch's row count."""
    samples = [dataset.sample(p) for p in probe_positions(dataset)]
    batch = {k: v for k, v in collate(samples).items() if not k.startswith("class_")}
    _, cond_batch = model_inputs(batch)
    with eager():
        mean, _ = frozen.batch_moments(batch)
        fixed_cond = None if frozen.train_text_encoder else frozen.batch_conditioning(cond_batch)
    n, k = len(samples), len(sigma_indices)
    count = max(n, k)
    repeat = np.arange(count) % n  # the image of each row
    latents = sample_latents(mean, None, None, frozen.engine.scale_factor)[repeat]
    levels = np.asarray(frozen.engine.denoiser.sigmas_np, np.float32)[list(sigma_indices)]
    sigmas = levels[np.arange(count) % k]
    noise = np.random.default_rng([seed, 7919]).standard_normal((count, *mean.shape[1:])).astype(np.float32)
    loss_cell = train_step.scaled_loss.loss_cell
    slots = 2 if loss_cell.with_prior_preservation else 1  # micro-batch halves: instance (, class)
    if reuse_train_step:
        step_cond = fixed_cond or tuple(t.asnumpy() for t in frozen.engine.conditioner.prepare_inputs(cond_batch))
        rows = (latents, noise, sigmas, *(a[repeat] for a in step_cond))
        halves = _probe_halves(count, batch_size)
        halves += [(halves[0][0], 0)] * (-len(halves) % slots)  # whole calls; the filler counts for nothing

        def probe() -> float:
            train_step.set_train(True)  # the compiled (train-mode) graph; no dropout, so deterministic
            total = 0.0
            for start in range(0, len(halves), slots):
                call = halves[start:start + slots]
                idx = np.concatenate([half for half, _ in call])
                _, loss_instance, loss_class = train_step.measure(*(Tensor(a[idx]) for a in rows))
                means = (loss_instance, loss_class)[:slots]
                total += sum(rows_in_half * float(m.asnumpy()) for (_, rows_in_half), m in zip(call, means))
            return total / count

        return probe

    per_sample = _PerSampleLoss(loss_cell)
    chunk = batch_size * slots
    all_rows = np.arange(count)
    chunks = [np.resize(all_rows[i:i + chunk], chunk) for i in range(0, count, chunk)]  # last padded by repeats

    def probe() -> float:
        crossattn, vector = fixed_cond or frozen.encode_conditioning(cond_batch)
        crossattn, vector = crossattn[repeat], vector[repeat]
        per_sample.set_train(False)  # no LoRA dropout in a measurement
        losses = np.zeros(count, np.float64)
        for idx in chunks:
            out = per_sample(*(Tensor(a[idx]) for a in (latents, noise, sigmas, crossattn, vector)))
            losses[idx] = out.asnumpy()
        return float(losses.mean())

    return probe


def _probe_halves(count: int, batch_size: int) -> List[Tuple[np.ndarray, int]]:
    """Row indices of one micro-batch half each, with the number of probe rows its mean stands for:
    whole groups of ``batch_size`` distinct rows, then each leftover row repeated to fill a half."""
    whole = count - count % batch_size
    halves = [(np.arange(i, i + batch_size), batch_size) for i in range(0, whole, batch_size)]
    return halves + [(np.full(batch_size, r), 1) for r in range(whole, count)]


def probe_positions(dataset) -> range:
    """Stream positions of the progress probe's samples: the first epoch's first pass over the photos."""
    return range(len(dataset.instance_paths))


class CheckpointWriter:
    """LoRA checkpoints every N steps as ``.safetensors`` (in ``lora_format``: kohya, diffusers or
    gm) and a MindSpore ``*_lora.ckpt`` (ours, as the seed's scripts name it), keeping the newest
    ``keep`` (all when None). The ``.safetensors`` is stored in ``precision`` (fp32, fp16, bf16),
    the ``.ckpt`` (exact continuation) in fp32. Only the main rank writes (``enabled``)."""

    def __init__(self, folder: Path, keep: Optional[int] = None, enabled: bool = True,
                 metadata: Optional[Dict[str, object]] = None, lora_format: str = "kohya",
                 precision: str = "fp32"):
        self.folder = Path(folder)
        self.lora_format = lora_format
        self.precision = precision
        self.keep = keep
        self.enabled = enabled
        self.metadata = dict(metadata or {})
        self.saved: List[Tuple[Path, Path]] = []
        self.latest: Optional[Path] = None

    def paths(self, step: int) -> Tuple[Path, Path]:
        stem = f"sdxl_lora_step{step:06d}"
        return self.folder / f"{stem}.safetensors", self.folder / f"{stem}_lora.ckpt"

    def adopt_existing(self) -> None:
        """Count checkpoints already in the folder (a resumed run's) as saved, oldest first, so
        ``keep`` prunes across the interruption."""
        found = sorted(self.folder.glob("sdxl_lora_step*.safetensors")) if self.folder.is_dir() else []
        self.saved = [(p, p.with_name(p.stem + "_lora.ckpt")) for p in found]
        self.latest = found[-1] if found else None

    def save(self, engine: nn.Cell, step: int) -> None:
        if not self.enabled:
            return
        safetensors_path, ckpt_path = self.paths(step)
        metadata = {**self.metadata, "step": step}
        save_lora(engine, safetensors_path, metadata, lora_format=self.lora_format, dtype=self.precision)
        save_lora(engine, ckpt_path, metadata)
        if (safetensors_path, ckpt_path) not in self.saved:
            self.saved.append((safetensors_path, ckpt_path))
        self.latest = safetensors_path
        while self.keep is not None and len(self.saved) > self.keep:
            for old in self.saved.pop(0):
                old.unlink(missing_ok=True)
        _logger.info("step %d: LoRA saved to %s", step, safetensors_path)

    def save_as(self, engine: nn.Cell, path: Path, step: int) -> None:
        """The current LoRA to ``path`` (in ``lora_format``, outside the rotation), e.g. the best one."""
        if self.enabled:
            save_lora(engine, path, {**self.metadata, "step": step}, lora_format=self.lora_format,
                      dtype=self.precision)

