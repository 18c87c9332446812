"""Attention for SDXL: the shared scaled-dot-product kernel, cross-attention, transformer blocks."""

from __future__ import annotations

import math
from typing import Optional

import mindspore as ms
from mindspore import Tensor, nn, ops

from gm.modules import native_attention
from gm.modules.diffusionmodules.util import zero_module
from gm.modules.layers import Conv2d, GroupNorm, Identity, LayerNorm, Linear, gelu_exact, on_cpu_target
from gm.modules.pynative_jit import PyNativeCompilable

_BMM = ops.BatchMatMul()
_BMM_KT = ops.BatchMatMul(transpose_b=True)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v.

    Args:
        q: (B, heads, Lq, d); k, v: (B, heads, Lk, d).
        mask: additive mask broadcastable to (B, heads, Lq, Lk) (0 = keep, large negative = drop), or None.
    Returns:
        (B, heads, Lq, d), in q's dtype; softmax runs in float32 for stability under fp16/bf16.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    # transposes as BatchMatMul flags: a swapaxes (and its gradient) copies k
    scores = _BMM_KT(q * scale, k)  # (B, heads, Lq, Lk)
    if mask is not None:
        scores = scores + mask
    weights = ops.softmax(scores.astype("float32"), axis=-1).astype(q.dtype)
    return _BMM(weights, v)


def split_heads(x: Tensor, heads: int, batch: Optional[int] = None) -> Tensor:
    """(B, L, heads*d), or tokens (B*L, heads*d) of ``batch`` sequences -> (B, heads, L, d)."""
    if batch is None:
        batch = x.shape[0]
    width = x.shape[-1]
    return x.reshape(batch, -1, heads, width // heads).transpose(0, 2, 1, 3)


def merge_heads(x: Tensor, tokens: bool = False) -> Tensor:
    """(B, heads, L, d) -> (B, L, heads*d), or with ``tokens`` (B*L, heads*d)."""
    b, heads, length, d = x.shape
    x = x.transpose(0, 2, 1, 3)
    return x.reshape(b * length, heads * d) if tokens else x.reshape(b, length, heads * d)


class CrossAttention(nn.Cell):
    """Multi-head attention of ``x`` over ``context`` (self-attention when context is None).

    Parameter names follow sgm/diffusers: ``to_q``/``to_k``/``to_v`` (no bias), ``to_out.0`` (with
    bias; ``to_out.1`` is the parameter-free dropout slot).

    Args:
        query_dim: width of ``x``.
        context_dim: width of ``context``; None means self-attention (context width = query_dim).
        heads, dim_head: inner width is ``heads * dim_head``.
        dropout: dropout after the output projection (training only).
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.SequentialCell([Linear(inner, query_dim), dropout_cell(dropout)])
        # the layers are called one by one, the dropout slot only when it drops: MindSpore's front
        # end spends ~0.2 MB of compile memory per SequentialCell call (its loop) and per Identity
        self.out_dropout = dropout > 0
        kernels = native_attention.kernels() if on_cpu_target() else None
        # our compiled kernel on the CPU target (float32); MindSpore's ops elsewhere
        self.native = kernels.attention(heads) if kernels is not None else None
        self.head_count = native_attention.head_count(heads)

    def construct(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """x: (B, Lq, query_dim); context: (B, Lk, context_dim) or None -> (B, Lq, query_dim)."""
        b, length, width = x.shape
        return self.attend(x.reshape(b * length, width), b, context).reshape(b, length, -1)

    def attend(self, tokens: Tensor, batch: int, context: Optional[Tensor] = None) -> Tensor:
        """The same on the tokens (B*Lq, query_dim) of ``batch`` sequences -> (B*Lq, query_dim).

        The projections then run on 2-D inputs, where ``linear`` needs no reshapes: in a LoRA
        train step those were ~1500 of ~6800 graph nodes at tiny size (each a launched kernel).
        """
        source = tokens if context is None else context.reshape(-1, context.shape[-1])
        q, k, v = self.to_q(tokens), self.to_k(source), self.to_v(source)
        if self.native is not None and q.dtype == ms.float32:
            width = q.shape[-1]
            out = self.native(q.reshape(batch, -1, width), k.reshape(batch, -1, width), v.reshape(batch, -1, width),
                              self.head_count).reshape(-1, width)
        else:
            out = merge_heads(scaled_dot_product_attention(split_heads(q, self.heads, batch),
                                                           split_heads(k, self.heads, batch),
                                                           split_heads(v, self.heads, batch)), tokens=True)
        out = self.to_out[0](out)
        if self.out_dropout:
            out = self.to_out[1](out)
        return out


class GEGLU(nn.Cell):
    """``a * gelu(b)`` where ``[a, b] = proj(x)`` split in halves (Shazeer 2020); exact erf GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)
        kernels = native_attention.kernels() if on_cpu_target() else None
        # on the CPU target (float32) one compiled op per direction instead of ~20 launched
        # kernels (the split, the erf GELU's parts, the products and their gradients)
        self.native = kernels.geglu if kernels is not None else None

    def construct(self, x: Tensor) -> Tensor:
        """(..., dim_in) -> (..., dim_out)."""
        hidden = self.proj(x)
        if self.native is not None and hidden.dtype == ms.float32:
            return self.native(hidden)
        value, gate = ops.chunk(hidden, 2, -1)
        return value * gelu_exact(gate)


class FeedForward(nn.Cell):
    """GEGLU MLP: ``net.0`` = GEGLU(dim, mult*dim), ``net.1`` dropout slot, ``net.2`` = Linear(mult*dim, dim)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.SequentialCell([GEGLU(dim, inner), dropout_cell(dropout), Linear(inner, dim)])
        self.dropout = dropout > 0  # the slot called only when it drops (see CrossAttention)

    def construct(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim)."""
        hidden = self.net[0](x)
        if self.dropout:
            hidden = self.net[1](hidden)
        return self.net[2](hidden)


class BasicTransformerBlock(PyNativeCompilable, nn.Cell):
    """Pre-norm block: self-attention, cross-attention over ``context``, GEGLU MLP, each residual.

    Names: ``norm1``/``attn1``, ``norm2``/``attn2``, ``norm3``/``ff``; LayerNorms with eps 1e-5.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: Optional[int] = None,
                 dropout: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.norm3 = LayerNorm(dim, eps=1e-5)
        if use_checkpoint:
            self.recompute()  # activations are recomputed in the backward pass (sgm's `checkpoint`)

    def construct(self, x: Tensor, context: Tensor) -> Tensor:
        """x: (B, L, dim); context: (B, Lc, context_dim) -> (B, L, dim)."""
        # as (B*L, dim) tokens throughout: every projection a plain 2-D matmul
        b, length, width = x.shape
        x = x.reshape(b * length, width)
        x = self.attn1.attend(self.norm1(x), b) + x
        x = self.attn2.attend(self.norm2(x), b, context) + x
        x = self.ff(self.norm3(x)) + x
        return x.reshape(b, length, width)


class SpatialTransformer(nn.Cell):
    """Transformer over the pixels of an image feature map, conditioned on ``context``.

    GroupNorm(``norm_groups``, default 32; eps 1e-6) -> ``proj_in`` -> ``transformer_blocks.N`` -> ``proj_out``
    -> + input.
    With ``use_linear`` (SDXL) the projections are Linear layers applied to (B, H*W, C) tokens,
    otherwise 1x1 convolutions (SD 1.x); both keep the same parameter names.
    ``zero_init_output`` starts ``proj_out`` at zero (sgm), so a fresh transformer is the identity map.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1,
                 context_dim: Optional[int] = None, dropout: float = 0.0, use_linear: bool = False,
                 use_checkpoint: bool = False, zero_init_output: bool = True, norm_groups: int = 32):
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = GroupNorm(norm_groups, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = Linear(in_channels, inner)
            proj_out = Linear(inner, in_channels)
        else:
            self.proj_in = Conv2d(in_channels, inner, 1)
            proj_out = Conv2d(inner, in_channels, 1)
        self.proj_out = zero_module(proj_out) if zero_init_output else proj_out
        self.transformer_blocks = nn.CellList([
            BasicTransformerBlock(inner, n_heads, d_head, context_dim, dropout, use_checkpoint) for _ in range(depth)
        ])

    def construct(self, x: Tensor, context: Tensor) -> Tensor:
        """x: (B, C, H, W); context: (B, Lc, context_dim) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        hidden = self.norm(x)
        if not self.use_linear:
            hidden = self.proj_in(hidden)
        hidden = hidden.reshape(b, -1, h * w).swapaxes(1, 2)  # (B, H*W, C)
        if self.use_linear:
            hidden = self.proj_in(hidden)
        for block in self.transformer_blocks:
            hidden = block(hidden, context)
        if self.use_linear:
            hidden = self.proj_out(hidden)
        hidden = hidden.swapaxes(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            hidden = self.proj_out(hidden)
        return hidden + x


def dropout_cell(p: float) -> nn.Cell:
    """A dropout slot: Identity when ``p == 0`` (no op in the graph), else nn.Dropout."""
    return nn.Dropout(p=p) if p > 0 else Identity()
