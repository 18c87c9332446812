"""The single training-step cell: gradients, loss scaling, accumulation, clipping, overflow skip, update.

``TrainStep(loss_cell, optimizer, ...)(lrs, *inputs)`` runs one micro-batch:

1. ``(loss, loss_instance, loss_class)`` and the gradients of ``loss * loss_scale`` with respect to
   the optimizer's parameters (the trainable ones; nothing else gets a gradient);
2. data parallel: the mean over ranks (``nn.DistributedGradReducer``) of each micro-batch gradient;
3. accumulation over ``grad_accum_steps`` calls in buffers; on the k-th call the optimizer sees
   the mean gradient, unscaled (``/ (k * loss_scale)``) before the norm is taken;
4. the global L2 norm; a non-finite norm means overflow: the update is skipped (weights and
   optimizer state unchanged), the buffers are reset and, with dynamic scaling, the scale backs off;
5. clipping to ``max_grad_norm`` (torch's ``clip_grad_norm_``) and the AdamW update with the
   learning rates of the ``lrs`` input (one per parameter group, computed on the host per update).

Returns ``(loss, loss_instance, loss_class, grad_norm, overflow, updated)``: the micro-batch losses,
the norm of the mean gradient accumulated so far (before clipping), and two bools saying whether
this call found non-finite gradients at an update and whether it updated the weights.

Graph mode and PyNative run the same ``construct``. The step counts micro-batches itself
(``micro_step``), so the host calls it k times per update with the same ``lrs``::

    step = TrainStep(DreamBoothLoss(engine, ...), build_optimizer(parameter_groups(engine, ...)),
                     grad_accum_steps=k, max_grad_norm=1.0, loss_scale=loss_scale_config(precision))
    for update in range(max_train_steps):
        lrs = step.learning_rates(schedule(update))        # gm.optim.LRSchedule, per update
        for _ in range(k):
            loss, loss_instance, loss_class, grad_norm, overflow, updated = step(lrs, *batch_inputs)
        # overflow: log a warning, the update was skipped

``step.measure(*inputs)`` runs the same graph for its losses only (nothing updated or
accumulated): the progress probe uses it instead of compiling a forward-only graph.

Data parallel: build the step after ``gm.parallel.init_parallel`` has set the parallel mode.
Keep input shapes fixed (drop the last incomplete batch): a new shape recompiles the graph.
State (optimizer moments, accumulators, loss scale) lives in Parameters; to overwrite one after
the graph has run use ``ops.assign`` -- ``Parameter.set_data`` then detaches it from the graph
(measured on MindSpore 2.10: the graph keeps updating the old memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.context import ParallelMode

from gm.errors import ConfigError
from gm.step_cell import StepCell

_add = ops.MultitypeFuncGraph("add")
_flat_float32 = ops.MultitypeFuncGraph("flat_float32")
_keep_or_zero = ops.MultitypeFuncGraph("keep_or_zero")


@_add.register("Tensor", "Tensor")
def _add_tensors(a, b):
    return a + b


@_flat_float32.register("Tensor")
def _flat_float32_tensor(grad):
    return grad.reshape(-1).astype(ms.float32)


@_keep_or_zero.register("Tensor", "Tensor", "Tensor", "Tensor")
def _assign_keep_or_zero(measuring, keep, buffer, value):
    # select, not multiply: a buffer holding inf/nan must still come back as zeros
    return ops.assign(buffer, ops.where(measuring, buffer, ops.where(keep, value, ops.zeros_like(value))))


@dataclass(frozen=True)
class LossScaleConfig:
    """Loss scaling for fp16 training (torch GradScaler semantics for ``dynamic``).

    kind: ``none`` (fp32/bf16), ``static`` (fixed ``init_scale``) or ``dynamic`` (halve on overflow,
    double after ``growth_interval`` updates in a row without overflow).
    """

    kind: str = "none"
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self):
        if self.kind not in ("none", "static", "dynamic"):
            raise ConfigError(f"loss scale {self.kind!r}: expected none, static or dynamic")


def loss_scale_config(mixed_precision: str, loss_scale: str = "dynamic") -> LossScaleConfig:
    """fp16 needs loss scaling (``dynamic`` or ``static``); fp32 and bf16 (fp32's exponent range) do not."""
    return LossScaleConfig(kind=loss_scale if mixed_precision == "fp16" else "none")


class _ScaledLoss(nn.Cell):
    """``(scale, *inputs) -> (loss * scale, loss, loss_instance, loss_class)``; the first is differentiated."""

    def __init__(self, loss_cell: nn.Cell):
        super().__init__(auto_prefix=False)
        self.loss_cell = loss_cell

    def construct(self, scale: Tensor, *inputs):
        loss, loss_instance, loss_class = self.loss_cell(*inputs)
        return loss * scale, loss, loss_instance, loss_class


def _grad_reducer(weights) -> Optional[nn.Cell]:
    """Mean over data-parallel ranks, or None when not running data parallel."""
    mode = ms.get_auto_parallel_context("parallel_mode")
    if mode not in (ParallelMode.DATA_PARALLEL, ParallelMode.HYBRID_PARALLEL):
        return None
    from mindspore.communication import get_group_size

    return nn.DistributedGradReducer(weights, mean=True, degree=get_group_size())


class TrainStep(StepCell):
    """One compiled training step over the optimizer's parameters (see the module docstring).

    Args:
        loss_cell: ``(*inputs) -> (loss, loss_instance, loss_class)``, e.g. ``DreamBoothLoss``.
        optimizer: ``gm.optim.build_optimizer(...)`` (``FusedAdamW``); its parameters
            are the trainable ones.
        grad_accum_steps: k micro-batches per update.
        max_grad_norm: clip the global gradient norm to this; None or <= 0 disables clipping.
        loss_scale: ``LossScaleConfig``; default none (fp32).
    """

    def __init__(self, loss_cell: nn.Cell, optimizer: nn.Cell, *, grad_accum_steps: int = 1,
                 max_grad_norm: Optional[float] = 1.0, loss_scale: Optional[LossScaleConfig] = None):
        super().__init__(auto_prefix=False)
        if grad_accum_steps < 1:
            raise ConfigError(f"--gradient_accumulation_steps {grad_accum_steps}: must be >= 1")
        loss_scale = loss_scale or LossScaleConfig()
        self.scaled_loss = _ScaledLoss(loss_cell)
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad_fn = ms.value_and_grad(self.scaled_loss, None, self.weights, has_aux=True)
        self.hyper_map = ops.HyperMap()
        self.grad_accum_steps = int(grad_accum_steps)
        self.clip = max_grad_norm is not None and max_grad_norm > 0
        self.max_grad_norm = float(max_grad_norm) if self.clip else 0.0
        self.base_lrs = tuple(float(lr.asnumpy()) for lr in optimizer.lrs)
        self.grad_reducer = _grad_reducer(self.weights)
        self.reduce_grads = self.grad_reducer is not None
        self.accumulate = self.grad_accum_steps > 1
        if self.accumulate:
            self.accum_grads = self.weights.clone(prefix="accum_grad", init="zeros")
        self.micro_step = Parameter(Tensor(0, ms.int32), name="train_step.micro_step", requires_grad=False)
        self.dynamic_scale = loss_scale.kind == "dynamic"
        init_scale = 1.0 if loss_scale.kind == "none" else float(loss_scale.init_scale)
        self.loss_scale = Parameter(Tensor(init_scale, ms.float32), name="train_step.loss_scale", requires_grad=False)
        self.growth_tracker = Parameter(Tensor(0, ms.int32), name="train_step.growth_tracker", requires_grad=False)
        self.growth_factor = Tensor(loss_scale.growth_factor, ms.float32)
        self.backoff_factor = Tensor(loss_scale.backoff_factor, ms.float32)
        self.one = Tensor(1.0, ms.float32)
        self.growth_interval = int(loss_scale.growth_interval)
        # set by ``measure``: the same graph computes the losses but changes no state
        self.measuring = Parameter(Tensor(False, ms.bool_), name="train_step.measuring", requires_grad=False)

    def state_parameters(self) -> Dict[str, Parameter]:
        """Every Parameter an update changes, by name: the trained weights, the AdamW moments and
        update counter, the loss scale and its growth tracker. Between updates (``micro_step`` 0,
        accumulation buffers zero) this is the whole training state (``gm.train_state``)."""
        optimizer = self.optimizer
        params = [*optimizer.parameters, *optimizer.exp_avg, *optimizer.exp_avg_sq, optimizer.state_step,
                  self.loss_scale, self.growth_tracker]
        return {p.name: p for p in params}

    def state_arrays(self) -> Dict[str, np.ndarray]:
        """``state_parameters`` as numpy copies."""
        return {name: p.asnumpy() for name, p in self.state_parameters().items()}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray], where: str) -> None:
        """Restore ``state_arrays`` (before the first call: ``set_data`` detaches a Parameter from a
        graph that has already run). Names and shapes must match exactly."""
        params = self.state_parameters()
        missing, unexpected = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
        if missing or unexpected:
            raise ConfigError(f"{where}: the saved training state does not fit this model: missing "
                              f"{missing[:2]}, unexpected {unexpected[:2]} -- was it written with another config?")
        for name, param in params.items():
            if tuple(np.shape(arrays[name])) != tuple(param.shape):
                raise ConfigError(f"{where}: '{name}' is {np.shape(arrays[name])} in the saved state, "
                                  f"{tuple(param.shape)} in the model")
            param.set_data(Tensor(np.asarray(arrays[name]), dtype=param.dtype))

    def learning_rates(self, factor: float) -> Tensor:
        """The ``lrs`` input: each group's base learning rate times the schedule's ``factor``."""
        return Tensor(np.array(self.base_lrs, np.float32) * np.float32(factor))

    def measure(self, *inputs) -> Tuple[Tensor, Tensor, Tensor]:
        """``(loss, loss_instance, loss_class)`` of one micro-batch from this step's graph, changing
        nothing: no update, no accumulation, micro-step count and loss scale as they were (the
        gradients are computed and dropped). A measurement (the progress probe) that reuses the
        compiled step costs no compilation of a forward-only graph of its own. Runs in the cell's
        current train/eval mode (LoRA dropout on in train mode)."""
        ops.assign(self.measuring, Tensor(True, ms.bool_))
        try:
            loss, loss_instance, loss_class, *_ = self(self.learning_rates(0.0), *inputs)
        finally:
            ops.assign(self.measuring, Tensor(False, ms.bool_))
        return loss, loss_instance, loss_class

    def construct(self, lrs: Tensor, *inputs):
        """lrs: (num_groups,) float32 learning rates for an update made by this call; inputs: the
        loss cell's. Returns (loss, loss_instance, loss_class, grad_norm, overflow, updated)."""
        (_, loss, loss_instance, loss_class), grads = self.grad_fn(self.loss_scale, *inputs)
        if self.reduce_grads:
            grads = self.grad_reducer(grads)
        measuring = self.measuring
        micro_step = self.micro_step + 1
        is_last = micro_step >= self.grad_accum_steps
        keep = ops.logical_not(is_last)
        if self.accumulate:
            grads = self.hyper_map(_add, self.accum_grads, grads)  # the scaled sum so far
            # the buffers are reset after the k-th call, whether the update happens or is skipped
            self.hyper_map(ops.partial(_keep_or_zero, measuring, keep), self.accum_grads, grads)
        ops.assign(self.micro_step, ops.where(measuring, self.micro_step,
                                              ops.where(keep, micro_step, ops.zeros_like(micro_step))))
        unscale = 1.0 / (self.loss_scale * self.grad_accum_steps)
        # the norm of one concatenated vector: a few ops in all instead of four per parameter (an
        # eighth of the tiny LoRA step's ops, each ~20 us of launch time on the CPU target whatever
        # its size); unscaled before squaring: a loss-scaled fp16 gradient squared can overflow
        flat = ops.concat(self.hyper_map(_flat_float32, grads)) * unscale
        grad_norm = ops.sqrt(ops.reduce_sum(ops.square(flat)))
        finite = ops.isfinite(grad_norm)
        at_update = ops.logical_and(is_last, ops.logical_not(measuring))
        updated = ops.logical_and(at_update, finite)
        if self.optimizer.native is not None:
            # our one-kernel AdamW (CPU target) updates only when `updated` says so: no branch
            loss = ops.depend(loss, self.optimizer.update_flat(updated, self._clip_factor(grad_norm), lrs, flat))
        elif updated:
            loss = ops.depend(loss, self._update(lrs, grads, unscale, grad_norm))
        if self.dynamic_scale:
            self._adjust_loss_scale(at_update, finite)
        return loss, loss_instance, loss_class, grad_norm, ops.logical_and(at_update, ops.logical_not(finite)), updated

    def _clip_factor(self, grad_norm: Tensor) -> Tensor:
        """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), clamped to 1 (1 without clipping)."""
        if self.clip:
            return ops.minimum(self.max_grad_norm / (grad_norm + 1e-6), 1.0)
        return self.one

    def _update(self, lrs: Tensor, grads: Tuple[Tensor, ...], unscale: Tensor, grad_norm: Tensor):
        """One optimizer update with ``grads * unscale``, clipped: one scalar factor for all parameters."""
        for i in range(len(self.base_lrs)):
            ops.assign(self.optimizer.lrs[i], lrs[i])
        return self.optimizer(grads, unscale * self._clip_factor(grad_norm))

    def _adjust_loss_scale(self, is_last: Tensor, finite: Tensor) -> None:
        """torch GradScaler.update at each update call: back off on overflow, grow after a clean run."""
        overflow = ops.logical_and(is_last, ops.logical_not(finite))
        tracker = self.growth_tracker + ops.logical_and(is_last, finite).astype(ms.int32)
        tracker = ops.where(overflow, ops.zeros_like(tracker), tracker)
        grow = tracker >= self.growth_interval
        factor = ops.where(overflow, self.backoff_factor, ops.where(grow, self.growth_factor, self.one))
        ops.assign(self.loss_scale, self.loss_scale * factor)
        ops.assign(self.growth_tracker, ops.where(grow, ops.zeros_like(tracker), tracker))
