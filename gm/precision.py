"""Mixed precision for training: fp16/bf16 compute in the UNet and text encoders on Ascend/GPU.

The parameters stay float32 (the optimizer updates fp32 master weights); ``Cell.to_float`` makes
each cell compute in the low precision. Normalisation layers keep float32 (their statistics
overflow/lose precision in fp16), attention softmax already runs in float32
(``gm.modules.attention``), and the VAE is left in float32 (it runs outside the gradient). The
loss casts the denoiser output to float32 (``DreamBoothLoss``). fp16 also needs loss scaling:
``gm.train_step.loss_scale_config``.

On the CPU target MindSpore has no fast fp16/bf16 kernels for these ops, so asking for them is a
configuration error there.
"""

from __future__ import annotations

import logging

import mindspore as ms
from mindspore import nn

from gm.errors import ConfigError
from gm.modules.layers import GroupNorm, LayerNorm

_logger = logging.getLogger(__name__)
PRECISIONS = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}


def _compute_in(cell: nn.Cell, dtype) -> None:
    cell.to_float(dtype)
    for _, sub in cell.cells_and_names():
        if isinstance(sub, (GroupNorm, LayerNorm)):
            sub.to_float(ms.float32)


def apply_mixed_precision(engine: nn.Cell, precision: str, flag: str = "--mixed_precision") -> None:
    """Make the UNet and the text encoders of ``engine`` (LoRA cells included) compute in
    ``precision``; calling it again switches (class images in one precision, training in another).

    Raises ConfigError, naming ``flag``, for an unknown precision or fp16/bf16 on the CPU target.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"{flag} {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision == getattr(engine, "compute_precision", "fp32") == "fp32":
        return
    target = ms.get_context("device_target")
    if target == "CPU" and precision != "fp32":
        raise ConfigError(f"{flag} {precision} needs --device_target Ascend or GPU; on CPU use {flag} fp32")
    dtype = PRECISIONS[precision]
    _compute_in(engine.model.diffusion_model, dtype)
    for embedder in engine.conditioner.embedders:
        # only the text encoders: the size embedders' sinusoids of values up to ~2048 need float32
        if any(True for _ in embedder.get_parameters()):
            _compute_in(embedder, dtype)
    engine.compute_precision = precision
    _logger.info("UNet and text encoders compute in %s on %s, VAE in float32", precision, target)
