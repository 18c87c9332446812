"""LayerNorm and GroupNorm on the CPU target as compiled kernels of our own (``native_norms.cc``).

MindSpore 2.10's CPU norm kernels are the slowest per element of a training step: forward +
backward of a LayerNorm on (512, 256) costs ~5 ms in a graph-mode chain against ~1.5 ms for these
plain loops, and composing the norm from MindSpore ops instead (tried: a ``bprop`` cell of
reductions) made graph mode keep every intermediate buffer (+0.8 GB at medium@256). A MindSpore
``aot`` custom op runs a C++ function on the op's own buffers: the forward writes y alone, the
backward recomputes the per-row (per-group) mean and 1/std from x, nothing else is held.

The kernels are compiled on first use with the system C++ compiler (``$CXX``, else ``g++``) into
the user cache folder, keyed by the source's hash, and reused by every later process (compiling
takes ~1 s). Without a compiler, or with ``SDXL_MS_NATIVE_NORMS=0``, the layers keep MindSpore's
own kernels (same results to float32 rounding). Ascend and GPU always keep theirs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import mindspore as ms
from mindspore import Tensor, ops

from gm.modules import native_build
from gm.modules.native_build import CACHE_ROOT

SOURCE = Path(__file__).with_suffix(".cc")
ENV_SWITCH = "SDXL_MS_NATIVE_NORMS"


def build_library(cache_root: Path = CACHE_ROOT) -> Path:
    """Compile ``native_norms.cc`` into ``cache_root/<hash>/native_norms.so`` unless it is there."""
    return native_build.build_library(SOURCE, cache_root)


class NormKernels:
    """The custom ops of one built library: forward ops (one output) whose bprop calls the backward ops."""

    def __init__(self, library: Path):
        self.library = str(library)
        self.zeros_like = ops.ZerosLike()  # made here: a bprop cannot create primitives at call time
        self.layer_norm = self._differentiable("LayerNorm", lambda x, w, b, p: x)
        self._group_norm = {}

    def _op(self, name, shapes, outputs, bprop=None, variant=""):
        def dtypes(*inputs):  # float32 in and out; checked once, when a graph is built
            if any(dtype.element_type() != ms.float32 for dtype in inputs):
                raise TypeError(f"{name} (gm.modules.native_norms) takes float32 inputs, got {inputs}; "
                                f"on the CPU target use fp32, or set {ENV_SWITCH}=0")
            return (ms.float32,) * outputs if outputs > 1 else ms.float32

        return native_build.KernelOp(self.library, name, name + variant, out_shape=shapes, out_dtype=dtypes,
                                     bprop=bprop)

    def _differentiable(self, norm: str, forward_shape, variant: str = "", backward_reads_bias: bool = False):
        """``<norm>Forward`` (x, weight, bias, params -> y) with ``<norm>Backward`` as its bprop, which
        recomputes the statistics from x (a single-output forward: see ``native_norms.cc``);
        ``variant`` tells apart ops of other parameters; ``backward_reads_bias``: the backward takes
        the bias after the weight (to recompute the forward's output)."""
        if backward_reads_bias:
            backward = self._op(f"{norm}Backward", lambda dy, x, w, b, p: (dy, w, w), 3, variant=variant)

            def bprop(x, weight, bias, params, out, dout):
                dx, dweight, dbias = backward(dout, x, weight, bias, params)
                return dx, dweight, dbias, self.zeros_like(params)
        else:
            backward = self._op(f"{norm}Backward", lambda dy, x, w, p: (dy, w, w), 3, variant=variant)

            def bprop(x, weight, bias, params, out, dout):
                dx, dweight, dbias = backward(dout, x, weight, params)
                return dx, dweight, dbias, self.zeros_like(params)

        return self._op(f"{norm}Forward", forward_shape, 1, bprop, variant)

    def group_norm(self, groups: int, silu: bool = False):
        """The forward op of a GroupNorm (its group count comes in with ``group_norm_params``);
        ``silu``: the op returns silu(GroupNorm(x)) (one op for the ResNet blocks' norm -> SiLU)."""
        if silu not in self._group_norm:
            norm = "GroupNormSilu" if silu else "GroupNorm"
            self._group_norm[silu] = self._differentiable(norm, lambda x, w, b, p: x, backward_reads_bias=silu)
        return self._group_norm[silu]


@functools.cache
def kernels() -> Optional[NormKernels]:
    """The compiled kernels, or None where they are switched off or cannot be built (logged once)."""
    return native_build.load_or_fall_back(ENV_SWITCH, lambda: NormKernels(build_library()), "CPU norm kernels",
                                          "using MindSpore's own LayerNorm/GroupNorm, slower on the CPU target")


def layer_norm_params(eps: float) -> Tensor:
    """The LayerNorm kernels' fourth input (a graph constant): ``(eps,)``."""
    return Tensor([eps], ms.float32)


def group_norm_params(eps: float, groups: int) -> Tensor:
    """The GroupNorm kernels' fourth input (a graph constant): ``(eps, groups)``."""
    return Tensor([eps, groups], ms.float32)
