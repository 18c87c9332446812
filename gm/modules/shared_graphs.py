"""PyNative with one compiled graph per block structure, shared by every block of that structure
(``--pynative_jit shared``).

Compiling each UNet level (``gm.modules.pynative_jit``) makes PyNative fast, but MindSpore keeps
every compiled graph's memory, and that grows with the total graph: at full SDXL size the process
outgrew 24 GB. SDXL repeats a few block structures many times (ten identical transformer blocks per
1280-channel SpatialTransformer), so here each ``ResBlock`` and ``BasicTransformerBlock`` runs
through a *template*: a copy of the first block of its structure, whose compiled forward and backward
take the calling block's weights as inputs and assign them into the copy first. One forward and one
backward graph per structure, whatever the depth.

Two MindSpore 2.10 behaviours shape this (measured on toy networks): a jit graph is keyed by the
identity of ``Parameter`` arguments (so the weights go in as plain tensors, ``Parameter.value()``:
no copy), and differentiating through a shared graph fed such tensors returned zero weight
gradients from the second gradient call on. So the call is a ``Cell`` with a custom ``bprop``: its
backward is the template's own compiled vector-Jacobian product, which recomputes the block's
forward (as gradient checkpointing does) instead of keeping its activations. Dropout would draw
new masks there, so a block with active dropout is refused.
"""

from __future__ import annotations

import copy
from typing import Dict, Tuple

import mindspore as ms
from mindspore import Tensor, nn, ops

from gm.errors import ConfigError
from gm.modules.pynative_jit import structure_signature


def _structure_key(block: nn.Cell, *inputs: Tensor) -> Tuple:
    """What a template's graph depends on: the block's structure by relative names (any block of
    the same structure shares it) and its inputs' shapes and dtypes."""
    return structure_signature(block, by_identity=False), tuple((tuple(t.shape), str(t.dtype)) for t in inputs)


class _BlockTemplate(nn.Cell):
    """A copy of one block, run by compiled graphs that first load a calling block's weights."""

    def __init__(self, block: nn.Cell):
        super().__init__(auto_prefix=False)
        # without the block's own SharedBlockCall: it holds every template made so far
        call = block.__dict__.pop("_pynative_graph", None)
        try:
            self.block = copy.deepcopy(block)
        finally:
            if call is not None:
                object.__setattr__(block, "_pynative_graph", call)
        for param in self.block.get_parameters():  # MindSpore wants parameter names unique
            param.name = f"shared_template.{id(self)}.{param.name}"
        self.weights = ms.ParameterTuple(list(self.block.get_parameters()))
        self.trainable = tuple(i for i, p in enumerate(self.weights) if p.requires_grad)
        self.trainable_weights = ms.ParameterTuple([self.weights[i] for i in self.trainable])

    def _load(self, x: Tensor, weights: tuple) -> Tensor:
        # the assignments must precede the block's reads: tie them to its input
        loads = ()
        for param, value in zip(self.weights, weights):
            loads = loads + (ops.assign(param, value),)
        return ops.depend(x, loads)

    @ms.jit
    def forward(self, x: Tensor, cond: Tensor, *weights: Tensor) -> Tensor:
        return self.block(self._load(x, weights), cond)

    @ms.jit
    def backward(self, x: Tensor, cond: Tensor, dout: Tensor, *weights: Tensor):
        x = self._load(x, weights)
        return ms.grad(self._weighted_output, (0, 1), self.trainable_weights)(x, cond, dout)

    def _weighted_output(self, x: Tensor, cond: Tensor, dout: Tensor) -> Tensor:
        # its gradient is the block's vector-Jacobian product with dout
        return (self.block(x, cond) * dout).sum()


class _SharedCall(nn.Cell):
    """One block's call through its template; the custom ``bprop`` routes the template's gradients
    to the block's own parameters (zeros for frozen ones, which nothing reads)."""

    def __init__(self, template: _BlockTemplate):
        super().__init__(auto_prefix=False)
        object.__setattr__(self, "template", template)  # not a sub-cell: its copies stay out of the model

    def construct(self, x, cond, *weights):
        return self.template.forward(x, cond, *[w.value() for w in weights])

    def bprop(self, x, cond, *rest):
        weights, dout = rest[:-2], rest[-1]
        (dx, dcond), dtrainable = self.template.backward(x, cond, dout, *[w.value() for w in weights])
        grads = [ops.zeros((), w.dtype) for w in weights]
        for i, g in zip(self.template.trainable, dtrainable):
            grads[i] = g
        return (dx, dcond, *grads)


def shared_block_types() -> tuple:
    from gm.modules.attention import BasicTransformerBlock
    from gm.modules.diffusionmodules.openaimodel import ResBlock

    return ResBlock, BasicTransformerBlock


class SharedBlockCall:
    """``block(x, cond)`` in PyNative through the template of its structure (made on first use)."""

    def __init__(self, block: nn.Cell, templates: Dict[Tuple, _SharedCall]):
        self.block = block
        self.templates = templates

    def __call__(self, x: Tensor, cond: Tensor) -> Tensor:
        key = _structure_key(self.block, x, cond)
        call = self.templates.get(key)
        if call is None:
            if any(isinstance(c, nn.Dropout) and c.training for _, c in self.block.cells_and_names()):
                raise ConfigError("--pynative_jit shared recomputes each block in the backward pass, which would "
                                  "draw new dropout masks: train with dropout 0 (--lora_dropout 0) or use "
                                  "--pynative_jit on")
            call = self.templates[key] = _SharedCall(_BlockTemplate(self.block))
        return call(x, cond, *self.block.get_parameters())
