"""2-D convolutions on the CPU target as compiled kernels of our own (``native_conv.cc``), computed
by oneDNN's convolution primitives.

MindSpore 2.10's CPU Conv2D runs at ~1 GFLOP/s, and the im2col + MatMul route this project used
instead at ~60-120 GFLOP/s on 2 cores; oneDNN's direct convolution (``libdnnl.so.3``, shipped
inside MindSpore's own wheel; torch's CPU convolutions use the same library) at ~180, layout
conversions included. The kernels split the work into a fixed number of parts on any machine, so
results do not depend on the core count.

Every gradient is its own op (input; weight; bias), so graph mode drops the ones nobody reads: the
frozen convolutions of LoRA training cost no weight-gradient convolution.

Built on first use like ``native_norms`` (``gm.modules.native_build``). Without a compiler, without
the library, or with ``SDXL_MS_NATIVE_CONV=0``, the layers keep the im2col route. Ascend and GPU
always keep their own kernels.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import mindspore as ms
from mindspore import Tensor

from gm.modules import native_build
from gm.modules.native_build import CACHE_ROOT

SOURCE = Path(__file__).with_suffix(".cc")
ENV_SWITCH = "SDXL_MS_NATIVE_CONV"
DNNL = "libdnnl.so.3"


def dnnl_dir() -> Path:
    """The folder of MindSpore's bundled oneDNN."""
    lib = Path(ms.__file__).parent / "lib"
    if not (lib / DNNL).is_file():
        raise RuntimeError(f"{DNNL} not found in {lib}")
    return lib


def build_library(cache_root: Path = CACHE_ROOT) -> Path:
    """Compile ``native_conv.cc`` against MindSpore's oneDNN into ``cache_root/<hash>/``."""
    lib = dnnl_dir()
    return native_build.build_library(SOURCE, cache_root, link=(f"-L{lib}", f"-l:{DNNL}", f"-Wl,-rpath,{lib}"))


def _float32_only(name: str):
    def dtypes(*inputs):  # checked once, when a graph is built
        if any(dtype.element_type() != ms.float32 for dtype in inputs):
            raise TypeError(f"{name} (gm.modules.native_conv) takes float32 inputs, got {inputs}; "
                            f"on the CPU target use fp32, or set {ENV_SWITCH}=0")
        return ms.float32
    return dtypes


class ConvKernels:
    """The custom ops of one built library."""

    def __init__(self, library: Path):
        self.library = str(library)
        self._zeros_like = ms.ops.ZerosLike()  # made here: a bprop cannot create primitives at call time
        self._conv = {}

    def _op(self, name: str, shape, bprop=None, variant: str = ""):
        """The kernel ``name``; ``variant`` tells apart ops of one kernel with other shapes or bprop."""
        return native_build.KernelOp(self.library, name, name + variant, out_shape=shape,
                                     out_dtype=_float32_only(name), bprop=bprop)

    def conv2d(self, stride: int, padding: int, bias: bool):
        """The forward op for one geometry: (x, weight, geometry[, bias]) -> y, ``geometry`` being
        ``geometry_tensor(stride, padding)``."""
        key = (stride, padding, bias)
        if key not in self._conv:
            self._conv[key] = self._make_conv(stride, padding, bias)
        return self._conv[key]

    def _make_conv(self, stride: int, padding: int, bias: bool):
        def out_shape(x, w, *rest):
            size = lambda n, k: (n + 2 * padding - k) // stride + 1  # noqa: E731
            return [x[0], w[0], size(x[2], w[2]), size(x[3], w[3])]

        grad_input = self._op("ConvGradInput", lambda dy, w, g, x: x)
        grad_weight = self._op("ConvGradWeight", lambda dy, x, g, w: w)
        grad_bias = self._op("ConvGradBias", lambda dy: [dy[1]])
        zeros_like = self._zeros_like
        if bias:
            def bprop(x, weight, geometry, b, out, dout):
                return (grad_input(dout, weight, geometry, x), grad_weight(dout, x, geometry, weight),
                        zeros_like(geometry), grad_bias(dout))
            return self._op("ConvForward", out_shape, bprop, variant=f"/s{stride}p{padding}+bias")

        def bprop_no_bias(x, weight, geometry, out, dout):
            return grad_input(dout, weight, geometry, x), grad_weight(dout, x, geometry, weight), zeros_like(geometry)
        return self._op("ConvForward", out_shape, bprop_no_bias, variant=f"/s{stride}p{padding}")


def geometry_tensor(stride: int, padding: int) -> Tensor:
    """A convolution's stride and padding as its kernel's third input (a graph constant)."""
    return Tensor([stride, padding], ms.float32)


@functools.cache
def kernels() -> Optional[ConvKernels]:
    """The compiled kernels, or None where they are switched off or cannot be built (logged once)."""
    return native_build.load_or_fall_back(ENV_SWITCH, lambda: ConvKernels(build_library()), "CPU convolution kernels",
                                          "using im2col + MatMul, slower")
