"""Optimizer and learning-rate schedules for training: AdamW over the trainable parameters.

- ``parameter_groups(engine, ...)``: the trainable parameters (``requires_grad=True``) split into
  a UNet group and a text-encoder group, each with its own learning rate and weight decay.
- ``build_optimizer(groups, ...)``: ``mindspore.experimental.optim.AdamW``. It is torch's AdamW
  (measured equal to ``torch.optim.AdamW`` in tests/unit/test_train_step.py): bias-corrected
  moments and *decoupled* weight decay ``param *= 1 - lr * weight_decay`` (Loshchilov & Hutter,
  arXiv 1711.05101). ``mindspore.nn.AdamWeightDecay`` is not used: it has no bias correction.
  Its per-group learning rates are Parameters (``optimizer.lrs``) that the train step overwrites
  from an input, so the schedule runs on the host and changing it never recompiles.
- ``LRSchedule``: the multiplier of each group's base learning rate after ``step`` optimizer
  updates, the same values as diffusers' ``get_scheduler`` (a ``LambdaLR`` stepped once per update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from mindspore import nn
from mindspore.experimental.optim import AdamW

from gm.errors import ConfigError

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
UNET_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIX = "conditioner."


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate multiplier per optimizer update (diffusers.optimization semantics).

    Args:
        name: constant | constant_with_warmup | linear | cosine.
        warmup_steps: linear ramp 0 -> 1 over this many updates (ignored by ``constant``, as diffusers).
        total_steps: number of updates; ``linear`` decays to 0 and ``cosine`` follows half a cosine
            from the end of warmup to ``total_steps``.
        num_cycles: cosine waves after warmup (0.5 = decay from 1 to 0 once, diffusers' default).
    """

    name: str = "constant"
    warmup_steps: int = 0
    total_steps: Optional[int] = None
    num_cycles: float = 0.5

    def __post_init__(self):
        if self.name not in LR_SCHEDULERS:
            raise ConfigError(f"--lr_scheduler {self.name}: expected one of {', '.join(LR_SCHEDULERS)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--lr_warmup_steps {self.warmup_steps}: must be >= 0")
        if self.name in ("linear", "cosine") and self.total_steps is None:
            raise ConfigError(f"--lr_scheduler {self.name} needs the number of training steps")

    def __call__(self, step: int) -> float:
        """Multiplier for the update that follows ``step`` earlier updates (0 for the first update)."""
        if self.name == "constant":
            return 1.0
        if step < self.warmup_steps:
            return step / max(1.0, self.warmup_steps)
        if self.name == "constant_with_warmup":
            return 1.0
        after_warmup = max(1, self.total_steps - self.warmup_steps)
        if self.name == "linear":
            return max(0.0, (self.total_steps - step) / after_warmup)
        progress = (step - self.warmup_steps) / after_warmup
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * self.num_cycles * 2.0 * progress)))


def parameter_groups(engine: nn.Cell, *, learning_rate: float, text_encoder_lr: Optional[float] = None,
                     weight_decay: float = 0.0, text_encoder_weight_decay: Optional[float] = None) -> List[Dict]:
    """The engine's trainable parameters as AdamW groups: UNet first, then text encoders.

    A group with no trainable parameter is left out. ``text_encoder_lr`` / ``..._weight_decay``
    default to the UNet's values. Raises ConfigError if nothing is trainable or if a parameter
    outside the UNet and text encoders (the VAE) is trainable.
    """
    unet, text = [], []
    for name, param in engine.parameters_and_names():
        if not param.requires_grad:
            continue
        if name.startswith(UNET_PREFIX):
            unet.append(param)
        elif name.startswith(TEXT_ENCODER_PREFIX):
            text.append(param)
        else:
            raise ConfigError(f"parameter {name} is trainable, but only the UNet and the text encoders are trained; "
                              "the VAE stays frozen")
    if not unet and not text:
        raise ConfigError("no trainable parameters: add LoRA layers (or mark parameters trainable) first")
    groups = []
    if unet:
        groups.append({"params": unet, "lr": float(learning_rate), "weight_decay": float(weight_decay)})
    if text:
        lr = learning_rate if text_encoder_lr is None else text_encoder_lr
        decay = weight_decay if text_encoder_weight_decay is None else text_encoder_weight_decay
        groups.append({"params": text, "lr": float(lr), "weight_decay": float(decay)})
    return groups


def build_optimizer(groups: Sequence[Dict], betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> AdamW:
    """torch-semantics AdamW over ``groups`` (``{"params", "lr", "weight_decay"}`` dicts)."""
    return AdamW([dict(g) for g in groups], lr=float(groups[0]["lr"]), betas=tuple(float(b) for b in betas),
                 eps=float(eps), weight_decay=0.0)
