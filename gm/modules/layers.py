"""Basic layers whose parameters carry the official (torch) names: ``weight`` and ``bias``.

MindSpore's own ``nn`` layers name norm parameters ``gamma``/``beta`` and embeddings
``embedding_table``, use different epsilons and GELU forms, and its native CPU Conv2D runs at
about 1 GFLOP/s. These layers keep the official names, so a checkpoint's keys map onto our
parameter names with no hand-kept table, and route convolutions through im2col + matmul on the
CPU target (exact, >100x faster there) while keeping the native kernel on Ascend/GPU.
"""

from __future__ import annotations

import math
from typing import Optional

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import HeUniform, Normal, Uniform, initializer

from gm.modules import native_conv, native_norms
from gm.modules.cpu_kernels import weight_matmul

_MATMUL_WT = ops.MatMul(transpose_b=True)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x (..., in) @ weight.T + bias`` with weight (out, in), as torch.nn.functional.linear.

    One 2-D ``MatMul`` with the transpose as a flag, and ``BiasAdd``: ``ops.dense``'s backward
    inserts explicit ``Transpose`` ops (measured: ~950 per medium SDXL LoRA step, 5% of its time
    on the CPU target), the flagged MatMul's backward is two flagged MatMuls.
    """
    if x.ndim == 2:  # no reshapes: each would be a launched kernel in the graph
        out = _MATMUL_WT(x, weight)
        return out if bias is None else ops.bias_add(out, bias)
    lead = x.shape[:-1]
    out = _MATMUL_WT(x.reshape(-1, x.shape[-1]), weight)
    if bias is not None:
        out = ops.bias_add(out, bias)
    return out.reshape(*lead, weight.shape[0])


def on_cpu_target() -> bool:
    """Whether MindSpore's current device target is the CPU (decided when a layer is built)."""
    return ms.get_context("device_target") == "CPU"


def _native_norms() -> Optional[native_norms.NormKernels]:
    """Our compiled CPU norm kernels where they apply (CPU target, built), else None."""
    return native_norms.kernels() if on_cpu_target() else None


def _native_conv() -> Optional[native_conv.ConvKernels]:
    """Our compiled CPU convolution kernels where they apply (CPU target, built), else None."""
    return native_conv.kernels() if on_cpu_target() else None


def _weight(shape: tuple, fan_in: int, dtype=ms.float32) -> Parameter:
    # torch's default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return Parameter(initializer(HeUniform(math.sqrt(5)), shape, dtype), name="weight")


def _bias(size: int, fan_in: int, dtype=ms.float32) -> Parameter:
    return Parameter(initializer(Uniform(1.0 / math.sqrt(max(fan_in, 1))), (size,), dtype), name="bias")


class Linear(nn.Cell):
    """``y = x @ weight.T + bias`` with weight (out_features, in_features), as torch.nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=ms.float32):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _weight((out_features, in_features), in_features, dtype)
        self.bias = _bias(out_features, in_features, dtype) if bias else None

    def construct(self, x):
        return linear(x, self.weight, self.bias)


class Conv2d(nn.Cell):
    """2-D convolution with torch semantics (explicit zero padding, weight (out, in, kh, kw), bias).

    On the CPU target it runs as our compiled kernel (``native_conv``), or, without it, as im2col
    (``ops.unfold``) + one matmul; elsewhere the native kernel.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        dtype=ms.float32,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = _weight((out_channels, in_channels, kernel_size, kernel_size), fan_in, dtype)
        self.bias = _bias(out_channels, fan_in, dtype) if bias else None
        self.im2col = on_cpu_target()
        self.pointwise = kernel_size == 1 and stride == 1 and padding == 0
        kernels = _native_conv()
        self.native = kernels.conv2d(stride, padding, bias) if kernels is not None else None
        self.geometry = native_conv.geometry_tensor(stride, padding)

    def construct(self, x):
        if self.native is not None and x.dtype == ms.float32 and self.weight.dtype == ms.float32:
            if self.bias is None:
                return self.native(x, self.weight, self.geometry)
            return self.native(x, self.weight, self.geometry, self.bias)
        if self.im2col:
            return self._matmul_conv(x)
        out = ops.conv2d(x, self.weight, None, self.stride, "pad", self.padding)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        return out

    def _matmul_conv(self, x):
        b, _, h, w = x.shape
        weight = self.weight.reshape(self.out_channels, -1)  # (O, C*kh*kw)
        if self.pointwise:
            cols = x.reshape(b, self.in_channels, h * w)  # (B, C, H*W)
            h_out, w_out = h, w
        else:
            cols = ops.unfold(x, self.kernel_size, 1, self.padding, self.stride)  # (B, C*k*k, L)
            h_out = (h + 2 * self.padding - self.kernel_size) // self.stride + 1
            w_out = (w + 2 * self.padding - self.kernel_size) // self.stride + 1
        out = weight_matmul(weight, cols)  # (B, O, L)
        if self.bias is not None:
            # BiasAdd, not a broadcasting add: on the CPU backend that is ~2.5x slower and in graph
            # mode its output memory is never reused (measured: +4x the tensor size per call)
            out = ops.bias_add(out, self.bias)
        return out.reshape(b, self.out_channels, h_out, w_out)


class GroupNorm(nn.Cell):
    """Group normalisation over (B, C, ...) with affine ``weight``/``bias`` of size C."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, dtype=ms.float32):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = Parameter(initializer("ones", (num_channels,), dtype), name="weight")
        self.bias = Parameter(initializer("zeros", (num_channels,), dtype), name="bias")
        kernels = _native_norms()
        self.native = kernels.group_norm(num_groups) if kernels is not None else None
        self.native_silu = kernels.group_norm(num_groups, silu=True) if kernels is not None else None
        self.norm_params = native_norms.group_norm_params(eps, num_groups)

    def construct(self, x):
        if self.native is not None:  # float32 only: checked when the graph is built (native_norms)
            return self.native(x, self.weight, self.bias, self.norm_params)
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def with_silu(self, x):
        """``silu(self(x))``: on the CPU target one compiled op, where MindSpore's SiLU and its
        gradient are ~6 more launched kernels."""
        if self.native_silu is not None:
            return self.native_silu(x, self.weight, self.bias, self.norm_params)
        return ops.silu(self.construct(x))  # graph mode cannot call the cell itself from its method


class LayerNorm(nn.Cell):
    """Layer normalisation over the last axis; torch's default epsilon 1e-5 (MindSpore's is 1e-7)."""

    def __init__(self, dim: int, eps: float = 1e-5, dtype=ms.float32):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (dim,), dtype), name="weight")
        self.bias = Parameter(initializer("zeros", (dim,), dtype), name="bias")
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        kernels = _native_norms()
        self.native = kernels.layer_norm if kernels is not None else None
        self.norm_params = native_norms.layer_norm_params(eps)

    def construct(self, x):
        if self.native is not None:  # float32 only: checked when the graph is built (native_norms)
            return self.native(x, self.weight, self.bias, self.norm_params)
        return self.norm(x, self.weight, self.bias)[0]


class Embedding(nn.Cell):
    """Lookup table ``weight`` (num_embeddings, dim), as torch.nn.Embedding."""

    def __init__(self, num_embeddings: int, dim: int, dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer(Normal(0.02), (num_embeddings, dim), dtype), name="weight")

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


class SiLU(nn.Cell):
    """x * sigmoid(x); a parameter-free cell so SequentialCell indices match the official keys."""

    def construct(self, x):
        return ops.silu(x)


class Identity(nn.Cell):
    """Pass-through, used where the official model has a parameter-free slot (dropout at eval)."""

    def construct(self, x):
        return x


def gelu_exact(x):
    """GELU with erf, as torch's default (MindSpore's nn.GELU default is the tanh form)."""
    return ops.gelu(x, approximate="none")


def quick_gelu(x):
    """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""
    return x * ops.sigmoid(1.702 * x)


def optional(module: Optional[nn.Cell]) -> nn.Cell:
    """``module`` or an Identity, so call sites need no None checks inside ``construct``."""
    return module if module is not None else Identity()
