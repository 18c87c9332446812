"""``StepCell``: the base of a top-level graph-mode cell that is called many times (a training step,
a sampler's denoising step), without MindSpore's per-call walk over every sub-cell."""

from __future__ import annotations

from mindspore import nn


class StepCell(nn.Cell):
    """An ``nn.Cell`` whose phase reaches its sub-cells only when it changes.

    MindSpore 2.10 compiles-or-looks-up at every call of a graph-mode cell and assigns the call's
    phase to every sub-cell, recursively, each time: ~1200 cells for the tiny UNet with LoRA, a
    few ms of Python per call (measured: most of the tiny train step's 0.067 -> 0.050 s together
    with the compile-cache guard taken once). A sub-cell's phase is read only when a graph is
    parsed, which happens only for a phase not compiled before, i.e. a new value, which is still
    passed down; cells shared with another top cell (the UNet of a train step and of a sampler)
    may keep the other's phase in between, which nothing reads.
    """

    @property
    def compile_phase(self) -> str:
        return self._compile_phase

    @compile_phase.setter
    def compile_phase(self, value: str) -> None:
        if value != self._compile_phase:
            nn.Cell.compile_phase.fset(self, value)
