"""PyNative mode with the UNet's levels run as compiled graphs (``--pynative_jit``).

PyNative launches every op from Python, ~0.7 ms each on the CPU target whatever its size (measured:
a tiny-SDXL LoRA step is ~5000 forward op launches plus MindSpore's backward over them). Running
each UNet level (a ``TimestepEmbedSequential``: a ResBlock, a SpatialTransformer, a resampler) as
one ``mindspore.jit`` graph launches ~19 graphs per forward instead, while everything around them
(the loss, the train step, the samplers, the text encoders, the VAE) stays eager and debuggable.
Gradients flow through the graphs (MindSpore differentiates a jit graph called in PyNative).

MindSpore keys a compiled jit graph by the cell and its inputs, not by what the cell holds: after
a LoRA is injected, a dtype is cast or ``set_train`` flips dropout, it would hand back the graph
of the old structure (measured: no error, the old output). So each call first computes a stamp of
the level's sub-cells (identity, type, dropout's training flag) and parameters (identity, shape, dtype,
requires_grad) and compiles anew when it changed.

Graph mode (``--ms_mode 0``) is untouched: the switch lives in ``__call__``, which graph mode
never runs (it parses ``construct``), and only in PyNative does a level take the compiled path.
"""

from __future__ import annotations

import hashlib

import mindspore as ms
from mindspore import nn


def structure_signature(cell: nn.Cell, by_identity: bool) -> tuple:
    """What a compiled graph of ``cell`` depends on besides its inputs: its sub-cells (type, and the
    train/eval flag of those that read it: dropout; ``set_train`` flipped alone does not recompile)
    and its parameters (shape, dtype, requires_grad). ``by_identity`` names them by ``id`` (the graph
    is this cell's own); otherwise by their names relative to ``cell`` (a graph shared by every
    cell of the same structure)."""
    cells = tuple((id(c) if by_identity else name, type(c).__name__,
                   c.training if isinstance(c, nn.Dropout) else None) for name, c in cell.cells_and_names())
    params = tuple((id(p) if by_identity else name, tuple(p.shape), str(p.dtype), p.requires_grad)
                   for name, p in cell.parameters_and_names())
    return type(cell).__name__, cells, params


def structure_stamp(cell: nn.Cell) -> str:
    """A short digest of ``cell``'s own ``structure_signature``, for a graph's phase name."""
    return hashlib.sha1(repr(structure_signature(cell, by_identity=True)).encode()).hexdigest()[:16]


class _CompiledConstruct:
    """The cell's ``construct`` as a jit graph, recompiled when the cell's structure stamp changes."""

    def __init__(self, cell: nn.Cell):
        self.cell = cell
        self.graph = ms.jit(cell.construct)
        self.base_phase = cell.phase

    def __call__(self, *args):
        # MindSpore's jit key includes the cell's phase: a new structure gets a graph of its own
        self.cell.phase = f"{self.base_phase}.pynative_jit.{structure_stamp(self.cell)}"
        return self.graph(*args)


class PyNativeCompilable:
    """Mixin for an ``nn.Cell``: after ``compile_in_pynative(cell)`` its calls in PyNative mode run
    ``construct`` as one compiled graph. Put it before ``nn.Cell`` (or a subclass) in the bases."""

    def __call__(self, *args, **kwargs):
        compiled = self.__dict__.get("_pynative_graph")
        if compiled is None or kwargs or ms.get_context("mode") != ms.PYNATIVE_MODE:
            return super().__call__(*args, **kwargs)
        return compiled(*args)


def compile_in_pynative(root: nn.Cell, shared: bool = False) -> int:
    """Make the UNet levels (``TimestepEmbedSequential``) under ``root`` (itself included) run as
    compiled graphs in PyNative mode, or with ``shared`` its ResBlocks and transformer blocks
    through one compiled graph per block structure (``gm.modules.shared_graphs``). Returns how many
    cells were switched."""
    from gm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential
    from gm.modules.shared_graphs import SharedBlockCall, shared_block_types

    run_eagerly(root)
    kinds = shared_block_types() if shared else (TimestepEmbedSequential,)
    templates: dict = {}
    count = 0
    for _, cell in root.cells_and_names():
        if isinstance(cell, PyNativeCompilable) and isinstance(cell, kinds):
            call = SharedBlockCall(cell, templates) if shared else _CompiledConstruct(cell)
            object.__setattr__(cell, "_pynative_graph", call)
            count += 1
    return count


def is_compiled_in_pynative(root: nn.Cell) -> bool:
    """Whether ``compile_in_pynative`` switched any cell under ``root``."""
    return any("_pynative_graph" in cell.__dict__ for _, cell in root.cells_and_names())


def run_eagerly(root: nn.Cell) -> None:
    """Undo ``compile_in_pynative``: every op of ``root`` launched from Python again."""
    for _, cell in root.cells_and_names():
        cell.__dict__.pop("_pynative_graph", None)


def use_pynative_jit(setting: str, ms_mode: int, device_target: str, model: nn.Cell) -> str:
    """What ``--pynative_jit`` compiles: ``"levels"``, ``"shared"`` or ``"off"``. ``on`` means
    levels; ``shared`` one graph per block structure (``gm.modules.shared_graphs``); ``auto``, in
    PyNative on the CPU target (where both were measured): levels for a ``model`` (the built
    engine) small beside the free memory (``gm.memory.is_small_model``: the compiled levels hold
    ~1-5x the fp32 weights at tiny and medium size, and at full SDXL size outgrew 24 GB), else
    shared (full size: 20.5 s per step at 13.7 GB against all-eager's 113 s at 16.2 GB)."""
    if ms_mode != 1 or setting == "off":
        return "off"
    if setting in ("on", "shared"):
        return "levels" if setting == "on" else "shared"
    from gm.memory import available_memory, fp32_weight_bytes, is_small_model

    if device_target != "CPU":
        return "off"
    return "levels" if is_small_model(fp32_weight_bytes(model), available_memory()) else "shared"


def apply_pynative_jit(setting: str, ms_mode: int, device_target: str, engine: nn.Cell) -> str:
    """``use_pynative_jit`` applied to the engine's UNet; returns what it chose."""
    chosen = use_pynative_jit(setting, ms_mode, device_target, engine)
    if chosen != "off":
        compile_in_pynative(engine.model.diffusion_model, shared=chosen == "shared")
    return chosen
