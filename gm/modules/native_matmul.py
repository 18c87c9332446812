"""Linear layers and convolutions on the CPU target as compiled kernels of our own
(``native_matmul.cc``), their products computed by oneDNN's sgemm.

MindSpore 2.10's CPU MatMul runs a convolution's im2col product at ~97 GFLOP/s on 2 cores where
torch runs ~148; oneDNN's single-threaded sgemm (``libdnnl.so.3``, shipped inside MindSpore's own
wheel) runs at torch's speed per core. Each kernel splits its product into fixed blocks of output,
one single-threaded sgemm per core, so results do not depend on timing and resume stays
bit-exact. A convolution's column matrix lives inside the kernel (forward: im2col + product;
input gradient: product + col2im), not in the graph.

Every gradient is its own op (input; weight; bias), so graph mode drops the ones nobody reads: the
frozen base weights of LoRA training cost no weight-gradient product.

Built on first use like ``native_norms`` (``gm.modules.native_build``). Without a compiler, without
the library, or with ``SDXL_MS_NATIVE_MATMUL=0``, the layers keep MindSpore's MatMul (and the
convolutions ``ops.unfold``). Ascend and GPU always keep their own kernels.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional

import mindspore as ms
from mindspore import Tensor

from gm.modules import native_build
from gm.modules.native_build import CACHE_ROOT

_logger = logging.getLogger(__name__)
SOURCE = Path(__file__).with_suffix(".cc")
ENV_SWITCH = "SDXL_MS_NATIVE_MATMUL"
DNNL = "libdnnl.so.3"


def _dnnl_dir() -> Path:
    """The folder of MindSpore's bundled oneDNN."""
    lib = Path(ms.__file__).parent / "lib"
    if not (lib / DNNL).is_file():
        raise RuntimeError(f"{DNNL} not found in {lib}")
    return lib


def build_library(cache_root: Path = CACHE_ROOT) -> Path:
    """Compile ``native_matmul.cc`` against MindSpore's oneDNN into ``cache_root/<hash>/``."""
    lib = _dnnl_dir()
    return native_build.build_library(SOURCE, cache_root, link=(f"-L{lib}", f"-l:{DNNL}", f"-Wl,-rpath,{lib}"))


def _float32_only(name: str):
    def dtypes(*inputs):  # checked once, when a graph is built
        if any(dtype.element_type() != ms.float32 for dtype in inputs):
            raise TypeError(f"{name} (gm.modules.native_matmul) takes float32 inputs, got {inputs}; "
                            f"on the CPU target use fp32, or set {ENV_SWITCH}=0")
        return ms.float32
    return dtypes


class MatmulKernels:
    """The custom ops of one built library."""

    def __init__(self, library: Path):
        self.library = str(library)
        self._zeros_like = ms.ops.ZerosLike()  # made here: a bprop cannot create primitives at call time
        self.linear = self._linear(bias=True)
        self.linear_no_bias = self._linear(bias=False)
        self.lora_linear = self._lora_linear(bias=True)
        self.lora_linear_no_bias = self._lora_linear(bias=False)
        self._conv = {}

    def _op(self, name: str, shape, bprop=None, outputs: int = 1, variant: str = ""):
        """The kernel ``name``; ``variant`` tells apart ops of one kernel with other shapes or bprop."""
        check = _float32_only(name)
        dtypes = check if outputs == 1 else lambda *inputs: (check(*inputs),) * outputs
        return native_build.KernelOp(self.library, name, name + variant, out_shape=shape, out_dtype=dtypes,
                                     bprop=bprop)

    def _linear(self, bias: bool):
        grad_input = self._op("LinearGradInput", lambda dy, w: dy[:-1] + [w[1]])
        grad_weight = self._op("LinearGradWeight", lambda dy, x: [dy[-1], x[-1]])
        grad_bias = self._op("LinearGradBias", lambda dy: [dy[-1]])
        if bias:
            def bprop(x, weight, b, out, dout):
                return grad_input(dout, weight), grad_weight(dout, x), grad_bias(dout)
            return self._op("LinearForward", lambda x, w, b: x[:-1] + [w[0]], bprop, variant="+bias")

        def bprop_no_bias(x, weight, out, dout):
            return grad_input(dout, weight), grad_weight(dout, x)
        return self._op("LinearForward", lambda x, w: x[:-1] + [w[0]], bprop_no_bias)

    def _lora_linear(self, bias: bool):
        """(x, weight, down, up, scale[, bias]) -> (y, h): a linear layer plus its LoRA update
        ``scale * up(down(x))``; ``h = down(x)`` is kept for the gradients."""
        grad_input = self._op("LoRALinearGradInput", lambda dy, w, d, u, s: (dy[:-1] + [w[1]], dy[:-1] + [d[0]]),
                              outputs=2)
        grad_factors = self._op("LoRALinearGradFactors", lambda dy, x, h, g, s: ([h[-1], x[-1]], [dy[-1], h[-1]]),
                                outputs=2)
        grad_weight = self._op("LinearGradWeight", lambda dy, x: [dy[-1], x[-1]])
        grad_bias = self._op("LinearGradBias", lambda dy: [dy[-1]])
        zeros_like = self._zeros_like

        def shapes(x, w, d, u, s, *b):
            return x[:-1] + [w[0]], x[:-1] + [d[0]]

        def gradients(x, weight, down, up, scale, out, dout):
            dy = dout[0]  # h is an auxiliary output: nothing outside the bprop reads it
            dx, g = grad_input(dy, weight, down, up, scale)
            ddown, dup = grad_factors(dy, x, out[1], g, scale)
            return dx, grad_weight(dy, x), ddown, dup, zeros_like(scale)

        if bias:
            def bprop(x, weight, down, up, scale, b, out, dout):
                return gradients(x, weight, down, up, scale, out, dout) + (grad_bias(dout[0]),)
            return self._op("LoRALinearForward", shapes, bprop, outputs=2, variant="+bias")

        def bprop_no_bias(x, weight, down, up, scale, out, dout):
            return gradients(x, weight, down, up, scale, out, dout)
        return self._op("LoRALinearForward", shapes, bprop_no_bias, outputs=2)

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


def scale_tensor(scale: float) -> Tensor:
    """A LoRA scale as its kernel's fifth input (a graph constant)."""
    return Tensor([scale], ms.float32)


def geometry_tensor(stride: int, padding: int) -> Tensor:
    """A convolution's stride and padding as its kernel's third input (a graph constant)."""
    return Tensor([stride, padding], ms.float32)


@functools.cache
def kernels() -> Optional[MatmulKernels]:
    """The compiled kernels, or None where they are switched off or cannot be built (logged once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        return MatmulKernels(build_library())
    except (OSError, RuntimeError) as err:
        _logger.warning("CPU matmul kernels unavailable (%s); using MindSpore's MatMul, slower on the CPU target", err)
        return None
