"""AdamW on the CPU target as one compiled kernel of our own (``native_adamw.cc``) for all parameters.

MindSpore's ``AdamWeightDecay`` is one kernel per parameter, and scaling each gradient first is
another: for the 272 LoRA tensors of the tiny SDXL that is ~550 launched kernels per training step,
each ~10-15 us of launch time on the CPU target whatever its size. This op takes the concatenated
gradient vector the train step already builds for the global norm, and updates every parameter,
both moments and the update count in place with torch's AdamW arithmetic, or nothing when its flag
says so (so the train step needs no branch around it).

Built on first use like ``native_norms`` (``gm.modules.native_build``). Without a compiler, with
``SDXL_MS_NATIVE_ADAMW=0``, on Ascend and GPU, or with a parameter that is not float32, the
optimizer keeps MindSpore's per-parameter kernels (``gm.optim.FusedAdamW``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import mindspore as ms

from gm.modules import native_build
from gm.modules.native_build import CACHE_ROOT

SOURCE = Path(__file__).with_suffix(".cc")
ENV_SWITCH = "SDXL_MS_NATIVE_ADAMW"
_FIXED_INPUTS = ("grads", "hyper", "step", "config", "group")
_FIXED_DTYPES = (ms.float32, ms.float32, ms.int32, ms.float64, ms.int32)


def build_library(cache_root: Path = CACHE_ROOT) -> Path:
    """Compile ``native_adamw.cc`` into ``cache_root/<hash>/native_adamw.so`` unless it is there."""
    return native_build.build_library(SOURCE, cache_root)


def _dtypes(*inputs):  # checked once, when a graph is built
    fixed, tensors = inputs[:len(_FIXED_DTYPES)], inputs[len(_FIXED_DTYPES):]
    wrong = [name for name, dtype, want in zip(_FIXED_INPUTS, fixed, _FIXED_DTYPES) if dtype.element_type() != want]
    if wrong or any(dtype.element_type() != ms.float32 for dtype in tensors):
        raise TypeError(f"AdamWUpdate (gm.modules.native_adamw): wrong input dtypes ({wrong or 'parameters'}): "
                        f"{inputs}; set {ENV_SWITCH}=0")
    return ms.float32


def update_op(library: Path) -> native_build.KernelOp:
    """``(grads, hyper, step, config, group, *params, *exp_avgs, *exp_avg_sqs) -> (1,)``: the update,
    in place (see ``native_adamw.cc`` for the inputs); the output is a dependency token."""
    return native_build.KernelOp(str(library), "AdamWUpdate", "AdamWUpdate", out_shape=lambda *shapes: [1],
                                 out_dtype=_dtypes)


@functools.cache
def kernel() -> Optional[native_build.KernelOp]:
    """The compiled op, or None where it is switched off or cannot be built (logged once)."""
    return native_build.load_or_fall_back(ENV_SWITCH, lambda: update_op(build_library()), "CPU AdamW kernel",
                                          "using MindSpore's AdamWeightDecay per parameter, slower")
