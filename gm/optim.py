"""Optimizer and learning-rate schedules for training: AdamW over the trainable parameters.

- ``parameter_groups(engine, ...)``: the trainable parameters (``requires_grad=True``) split into
  a UNet group and a text-encoder group, each with its own learning rate and weight decay.
- ``build_optimizer(groups, ...)``: :class:`FusedAdamW`, torch's AdamW (measured equal to
  ``torch.optim.AdamW`` in tests/unit/test_train_step.py): bias-corrected moments and *decoupled*
  weight decay ``param *= 1 - lr * weight_decay`` (Loshchilov & Hutter, arXiv 1711.05101), one
  fused in-place kernel per parameter (on the CPU target, float32: one kernel of our own for all of
  them, ``gm.modules.native_adamw``). Its per-group learning rates come from an input of the train
  step (written into the Parameters ``optimizer.lrs`` for the per-parameter kernels, handed to our
  kernel directly), so the schedule runs on the host and changing it never recompiles.
- ``LRSchedule``: the multiplier of each group's base learning rate after ``step`` optimizer
  updates, the same values as diffusers' ``get_scheduler`` (a ``LambdaLR`` stepped once per update).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

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


_adamw = ops.MultitypeFuncGraph("adamw")


@_adamw.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                 "Tensor", "Tensor")
def _adamw_update(kernel, beta1, beta2, grad_scale, lr, eps, decay, param, exp_avg, exp_avg_sq, grad):
    grad = grad * grad_scale.astype(grad.dtype)
    return kernel(param, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, decay, grad)[0]


class FusedAdamW(nn.Cell):
    """torch.optim.AdamW over parameter groups, one fused in-place kernel per parameter.

    MindSpore's ``AdamWeightDecay`` kernel computes ``p -= lr' * (m / (sqrt(v) + eps') + wd' * p)``
    without bias correction. torch's step ``t`` (bias corrections ``c1 = 1 - beta1^t``,
    ``c2 = 1 - beta2^t``) is the same update with ``lr' = lr * sqrt(c2) / c1``,
    ``eps' = eps * sqrt(c2)`` and ``wd' = lr * wd / lr'``: those three scalars are computed in the
    graph from ``state_step`` at each update. Why not ``mindspore.experimental.optim.AdamW``: its
    ~15 elementwise ops per parameter made the LoRA train step (272 parameters) take 3x longer to
    compile and hold 2.4 GB more memory (measured, tiny config, CPU).

    ``construct(grads, grad_scale)`` updates every parameter with ``grads * grad_scale`` (the
    train step folds loss-scale removal, accumulation averaging and clipping into that one scalar),
    one AdamWeightDecay per parameter. On the CPU target, when every parameter is float32,
    ``native`` is our compiled kernel and the train step calls ``update_flat`` instead: one kernel
    for all parameters (``gm.modules.native_adamw``: torch's arithmetic, ~550 fewer launched
    kernels per step for the tiny LoRA), reading the concatenated gradient vector the step builds
    for the global norm.
    State: ``exp_avg``, ``exp_avg_sq`` (one per parameter), ``state_step`` (updates done, int32),
    ``lrs`` (one per group).
    """

    def __init__(self, groups: Sequence[Dict], betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 native: bool = True):
        super().__init__(auto_prefix=False)
        params = [p for g in groups for p in g["params"]]
        if not params:
            raise ConfigError("the optimizer got no parameters")
        self.parameters = ParameterTuple(params)
        self.exp_avg = self.parameters.clone(prefix="exp_avg", init="zeros")
        self.exp_avg_sq = self.parameters.clone(prefix="exp_avg_sq", init="zeros")
        self.state_step = Parameter(Tensor(0, ms.int32), name="optimizer.state_step", requires_grad=False)
        self.lrs = ParameterTuple([Parameter(Tensor(float(g["lr"]), ms.float32), name=f"optimizer.lr_group{i}",
                                             requires_grad=False) for i, g in enumerate(groups)])
        self.weight_decays = tuple(Tensor(float(g.get("weight_decay", 0.0)), ms.float32) for g in groups)
        bounds = np.cumsum([0] + [len(g["params"]) for g in groups]).tolist()
        self.group_bounds = tuple(zip(bounds[:-1], bounds[1:]))
        self.beta1 = Tensor(float(betas[0]), ms.float32)
        self.beta2 = Tensor(float(betas[1]), ms.float32)
        self.eps = Tensor(float(eps), ms.float32)
        self.kernel = ops.AdamWeightDecay()
        self.hyper_map = ops.HyperMap()
        self.native = _native_update(params) if native else None
        if self.native is not None:
            self.native_config = Tensor(np.array([*betas, eps, *(g.get("weight_decay", 0.0) for g in groups)],
                                                 np.float64))
            self.native_group = Tensor(np.repeat(np.arange(len(groups), dtype=np.int32),
                                                 [len(g["params"]) for g in groups]))

    def construct(self, grads, grad_scale):
        step = self.state_step + 1
        ops.assign(self.state_step, step)
        t = step.astype(ms.float32)
        correction1 = 1.0 - ops.pow(self.beta1, t)
        sqrt_correction2 = ops.sqrt(1.0 - ops.pow(self.beta2, t))
        eps = self.eps * sqrt_correction2
        updated = ()
        for i in range(len(self.group_bounds)):
            start, end = self.group_bounds[i]
            lr = self.lrs[i] * sqrt_correction2 / correction1
            decay = self.weight_decays[i] * correction1 / sqrt_correction2  # lr * wd / kernel lr
            updated = updated + self.hyper_map(
                ops.partial(_adamw, self.kernel, self.beta1, self.beta2, grad_scale, lr, eps, decay),
                self.parameters[start:end], self.exp_avg[start:end], self.exp_avg_sq[start:end], grads[start:end])
        return updated

    def update_flat(self, update: Tensor, clip: Tensor, lrs: Tensor, flat: Tensor) -> Tensor:
        """Our one-kernel update (``self.native``, CPU target) from ``flat`` (the gradients
        concatenated in parameter order, unscaled) times ``clip``, with the per-group learning
        rates ``lrs``, when the bool ``update`` is true, and nothing otherwise: no branch in the
        graph. Returns a dependency token."""
        hyper = ops.concat((update.astype(ms.float32).reshape(1), clip.astype(ms.float32).reshape(1), lrs))
        return self.native(flat, hyper, self.state_step, self.native_config, self.native_group,
                           *self.parameters, *self.exp_avg, *self.exp_avg_sq)


def _native_update(params: Sequence[Parameter]):
    """Our one-kernel AdamW where it applies (CPU target, every parameter float32), else None."""
    if ms.get_context("device_target") != "CPU" or any(p.dtype != ms.float32 for p in params):
        return None
    from gm.modules import native_adamw

    return native_adamw.kernel()


def build_optimizer(groups: Sequence[Dict], betas: Tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, native: bool = True) -> FusedAdamW:
    """torch-semantics AdamW over ``groups`` (``{"params", "lr", "weight_decay"}`` dicts); ``native``:
    our one-kernel update where it applies (``native=False``: MindSpore's kernel per parameter)."""
    return FusedAdamW([dict(g) for g in groups], betas=tuple(float(b) for b in betas), eps=float(eps),
                      native=native)
