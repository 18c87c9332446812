"""Multi-head attention on the CPU target as compiled kernels of our own (``native_attention.cc``),
its products on oneDNN's ``dnnl_sgemm`` (``libdnnl.so.3``, shipped inside MindSpore's wheel).

Written with MindSpore ops, one attention layer of a LoRA train step launches ~18 kernels on the
CPU target (head split/merge transposes, the score and value BatchMatMuls, the scale, the softmax,
and their gradients), each ~10 us of launch time whatever its size, which is most of what they
cost at small sizes. These kernels read each head out of the (batch, tokens, heads * d)
projections directly: one forward op (output and the softmax probabilities, which the backward
reads back as MindSpore's own softmax gradient does) and one backward op.

Built on first use like ``native_conv`` (``gm.modules.native_build``). Without a compiler, without
the library, or with ``SDXL_MS_NATIVE_ATTENTION=0``, attention keeps MindSpore's ops. Ascend and
GPU always do; so do masked attention (the text encoders) and fp16/bf16 inputs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import mindspore as ms
from mindspore import Tensor, ops

from gm.modules import native_build
from gm.modules.native_build import CACHE_ROOT
from gm.modules.native_conv import DNNL, dnnl_dir

SOURCE = Path(__file__).with_suffix(".cc")
ENV_SWITCH = "SDXL_MS_NATIVE_ATTENTION"


def build_library(cache_root: Path = CACHE_ROOT) -> Path:
    """Compile ``native_attention.cc`` against MindSpore's oneDNN into ``cache_root/<hash>/``."""
    lib = dnnl_dir()
    return native_build.build_library(SOURCE, cache_root, link=(f"-L{lib}", f"-l:{DNNL}", f"-Wl,-rpath,{lib}"))


def _float32_only(name: str, outputs: int):
    def dtypes(*inputs):  # checked once, when a graph is built
        if any(dtype.element_type() != ms.float32 for dtype in inputs):
            raise TypeError(f"{name} (gm.modules.native_attention) takes float32 inputs, got {inputs}; "
                            f"on the CPU target use fp32, or set {ENV_SWITCH}=0")
        return ms.float32 if outputs == 1 else (ms.float32,) * outputs
    return dtypes


class AttentionKernels:
    """The custom ops of one built library: one forward op per head count."""

    def __init__(self, library: Path):
        self.library = str(library)
        self._forward = {}
        self.geglu = self._make_geglu()

    def attention(self, heads: int):
        """``(q (B, Lq, heads*d), k (B, Lk, heads*d), v, head_count(heads)) -> out (B, Lq, heads*d)``,
        ``out = softmax(q k^T / sqrt(d)) v`` per sample and head; differentiable in q, k and v (the
        backward recomputes the probabilities: see ``native_attention.cc``)."""
        if heads not in self._forward:
            self._forward[heads] = self._make(heads)
        return self._forward[heads]

    def _make(self, heads: int):
        backward = native_build.KernelOp(self.library, "AttentionBackward", f"AttentionBackward/h{heads}",
                                         out_shape=lambda dout, q, k, v, h: (q, k, v),
                                         out_dtype=_float32_only("AttentionBackward", 3))
        zeros_like = ops.ZerosLike()  # made here: a bprop cannot create primitives at call time

        def bprop(q, k, v, head_count, out, dout):
            dq, dk, dv = backward(dout, q, k, v, head_count)
            return dq, dk, dv, zeros_like(head_count)

        return native_build.KernelOp(
            self.library, "AttentionForward", f"AttentionForward/h{heads}",
            out_shape=lambda q, k, v, h: q, out_dtype=_float32_only("AttentionForward", 1), bprop=bprop)

    def _make_geglu(self):
        """``h (..., 2n) -> a * gelu(b) (..., n)`` with ``[a, b]`` the halves of h (exact erf GELU)."""
        backward = native_build.KernelOp(self.library, "GegluBackward", "GegluBackward",
                                         out_shape=lambda dout, h: h, out_dtype=_float32_only("GegluBackward", 1))

        def bprop(h, out, dout):
            return (backward(dout, h),)

        return native_build.KernelOp(self.library, "GegluForward", "GegluForward",
                                     out_shape=lambda h: [*h[:-1], h[-1] // 2],
                                     out_dtype=_float32_only("GegluForward", 1), bprop=bprop)


def head_count(heads: int) -> Tensor:
    """The attention kernels' fourth input (a graph constant): ``(heads,)``."""
    return Tensor([heads], ms.float32)


@functools.cache
def kernels() -> Optional[AttentionKernels]:
    """The compiled kernels, or None where they are switched off or cannot be built (logged once)."""
    return native_build.load_or_fall_back(ENV_SWITCH, lambda: AttentionKernels(build_library()),
                                          "CPU attention kernels", "using MindSpore's ops, slower")
