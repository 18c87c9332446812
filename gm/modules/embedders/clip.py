"""SDXL's two text transformers, with the parameter names of their official checkpoints.

- ``CLIPTextModel``: OpenAI CLIP ViT-L/14 text tower in Hugging Face transformers' layout
  (``text_model.embeddings.token_embedding``, ``text_model.encoder.layers.N.self_attn.q_proj``,
  ...), which is how SDXL's single file stores encoder 1 (``conditioner.embedders.0.transformer.*``).
  Pre-LN blocks, quick_gelu MLP, causal self-attention.
- ``OpenCLIPTextModel``: OpenCLIP ViT-bigG/14 text tower in OpenCLIP's layout
  (``token_embedding``, ``positional_embedding``, ``transformer.resblocks.N.attn.in_proj_weight``,
  ``ln_final``, ``text_projection``, ``logit_scale``), as SDXL stores encoder 2
  (``conditioner.embedders.1.model.*``). Pre-LN blocks, exact (erf) GELU MLP, causal attention
  with packed q/k/v projections, and ``pooled = ln_final(x)[EOT] @ text_projection``.

Both return hidden states after any number of blocks, so the embedders can stop at the
penultimate block (SDXL's conditioning) without running the last one for nothing.
Sources: transformers ``models/clip/modeling_clip.py``; open_clip ``transformer.py``
(``TextTransformer``); Stability's ``sgm/modules/encoders/modules.py``.
"""

from __future__ import annotations

import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, Uniform, initializer

from gm.modules.attention import merge_heads, scaled_dot_product_attention, split_heads
from gm.modules.layers import Embedding, LayerNorm, Linear, gelu_exact, linear, quick_gelu

LN_EPS = 1e-5  # both towers use torch's LayerNorm default


def causal_mask(length: int) -> Tensor:
    """Additive (length, length) float32 mask: 0 on and below the diagonal, -inf above."""
    return Tensor(np.triu(np.full((length, length), -np.inf, dtype=np.float32), k=1))


# ----------------------------------------------------------------------------------------------
# OpenAI CLIP ViT-L/14 text tower, transformers names


class CLIPAttention(nn.Cell):
    """Multi-head self-attention with separate q/k/v/out projections (transformers' CLIPAttention)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"CLIP text width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, L, W), additive mask (L, L) -> (B, L, W)."""
        q = split_heads(self.q_proj(x), self.heads)
        k = split_heads(self.k_proj(x), self.heads)
        v = split_heads(self.v_proj(x), self.heads)
        return self.out_proj(merge_heads(scaled_dot_product_attention(q, k, v, mask)))


class CLIPMLP(nn.Cell):
    """fc1 -> quick_gelu -> fc2."""

    def __init__(self, width: int, intermediate_size: int):
        super().__init__()
        self.fc1 = Linear(width, intermediate_size)
        self.fc2 = Linear(intermediate_size, width)

    def construct(self, x: Tensor) -> Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    """Pre-LN block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, intermediate_size: int):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = LayerNorm(width, eps=LN_EPS)
        self.mlp = CLIPMLP(width, intermediate_size)
        self.layer_norm2 = LayerNorm(width, eps=LN_EPS)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    """The stack of blocks (``layers.N``)."""

    def __init__(self, width: int, layers: int, heads: int, intermediate_size: int):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(width, heads, intermediate_size) for _ in range(layers)])


class CLIPTextEmbeddings(nn.Cell):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, vocab_size: int, width: int, max_length: int):
        super().__init__()
        self.token_embedding = Embedding(vocab_size, width)
        self.position_embedding = Embedding(max_length, width)
        self.max_length = max_length

    def construct(self, ids: Tensor) -> Tensor:
        """(B, L) int ids, L == max_length -> (B, L, W)."""
        return self.token_embedding(ids) + self.position_embedding.weight


class CLIPTextTransformer(nn.Cell):
    """Embeddings, encoder, final LayerNorm (transformers' ``text_model``)."""

    def __init__(self, width: int, layers: int, heads: int, intermediate_size: int, vocab_size: int,
                 max_length: int):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, width, max_length)
        self.encoder = CLIPEncoder(width, layers, heads, intermediate_size)
        self.final_layer_norm = LayerNorm(width, eps=LN_EPS)
        self.num_layers = layers
        self.mask = causal_mask(max_length)


class CLIPTextModel(nn.Cell):
    """CLIP text tower holding ``text_model`` (so names read ``text_model.encoder.layers.0...``).

    Args:
        width, layers, heads, intermediate_size: 768, 12, 12, 3072 for SDXL's CLIP ViT-L/14.
        vocab_size, max_length: 49408 and 77.
    """

    def __init__(self, width: int, layers: int, heads: int, intermediate_size: int, vocab_size: int = 49408,
                 max_length: int = 77):
        super().__init__()
        self.text_model = CLIPTextTransformer(width, layers, heads, intermediate_size, vocab_size, max_length)

    def hidden_state(self, ids: Tensor, num_layers: int) -> Tensor:
        """Hidden states after the first ``num_layers`` blocks (transformers' ``hidden_states[num_layers]``).

        Args:
            ids: (B, 77) int32 token ids.
            num_layers: static int, 0..layers.
        Returns:
            (B, 77, W) float32, without the final LayerNorm.
        """
        tm = self.text_model
        x = tm.embeddings(ids)
        for i in range(num_layers):
            x = tm.encoder.layers[i](x, tm.mask)
        return x

    def construct(self, ids: Tensor) -> Tensor:
        """(B, 77) ids -> last hidden state after the final LayerNorm (B, 77, W)."""
        return self.text_model.final_layer_norm(self.hidden_state(ids, self.text_model.num_layers))


# ----------------------------------------------------------------------------------------------
# OpenCLIP ViT-bigG/14 text tower, OpenCLIP names


class PackedSelfAttention(nn.Cell):
    """torch.nn.MultiheadAttention's layout: ``in_proj_weight`` (3W, W) = [q; k; v], ``out_proj``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"OpenCLIP text width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.width = width
        bound = math.sqrt(6.0 / (width + 3 * width))  # torch's xavier_uniform on (3W, W)
        self.in_proj_weight = Parameter(initializer(Uniform(bound), (3 * width, width)), name="in_proj_weight")
        self.in_proj_bias = Parameter(initializer("zeros", (3 * width,)), name="in_proj_bias")
        self.out_proj = Linear(width, width)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        """(B, L, W), additive mask (L, L) -> (B, L, W)."""
        qkv = linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3W)
        q, k, v = ops.split(qkv, self.width, axis=-1)
        q, k, v = split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads)
        return self.out_proj(merge_heads(scaled_dot_product_attention(q, k, v, mask)))


class OpenCLIPMLP(nn.Cell):
    """c_fc -> exact GELU -> c_proj."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = Linear(width, hidden)
        self.c_proj = Linear(hidden, width)

    def construct(self, x: Tensor) -> Tensor:
        return self.c_proj(gelu_exact(self.c_fc(x)))


class ResidualAttentionBlock(nn.Cell):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)). (OpenCLIP's layer-scale slots are identities.)"""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=LN_EPS)
        self.attn = PackedSelfAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps=LN_EPS)
        self.mlp = OpenCLIPMLP(width, int(width * mlp_ratio))

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Cell):
    """The stack of blocks (``resblocks.N``)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.CellList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])


class OpenCLIPTextModel(nn.Cell):
    """OpenCLIP text tower with OpenCLIP's parameter names.

    Args:
        width, layers, heads: 1280, 32, 20 for SDXL's ViT-bigG/14.
        embed_dim: projection width of ``text_projection`` (W, E); 1280 for SDXL.
        mlp_ratio: MLP hidden = width * mlp_ratio (4).
        vocab_size, max_length: 49408 and 77.
    ``logit_scale`` is part of the checkpoint (CLIP's contrastive temperature) and unused here.
    """

    def __init__(self, width: int, layers: int, heads: int, embed_dim: int, mlp_ratio: float = 4.0,
                 vocab_size: int = 49408, max_length: int = 77):
        super().__init__()
        self.token_embedding = Embedding(vocab_size, width)
        self.positional_embedding = Parameter(initializer(Normal(0.01), (max_length, width)),
                                              name="positional_embedding")
        self.transformer = OpenCLIPTransformer(width, layers, heads, mlp_ratio)
        self.ln_final = LayerNorm(width, eps=LN_EPS)
        self.text_projection = Parameter(initializer(Normal(width ** -0.5), (width, embed_dim)), name="text_projection")
        self.logit_scale = Parameter(Tensor(np.float32(np.log(1 / 0.07))), name="logit_scale", requires_grad=False)
        self.num_layers = layers
        self.max_length = max_length
        self.mask = causal_mask(max_length)

    def hidden_state(self, ids: Tensor, num_layers: int) -> Tensor:
        """(B, 77) int32 ids -> (B, 77, W) output of the first ``num_layers`` blocks (static int)."""
        x = self.token_embedding(ids) + self.positional_embedding
        for i in range(num_layers):
            x = self.transformer.resblocks[i](x, self.mask)
        return x

    def pool(self, last: Tensor, ids: Tensor) -> Tensor:
        """ln_final(last)[EOT] @ text_projection -> (B, E); the EOT is each row's largest id."""
        b, length, width = last.shape
        eot = ops.argmax(ids, dim=-1).astype(ms.int32)  # (B,)
        rows = ops.arange(0, b, dtype=ms.int32) * length + eot
        picked = ops.gather(self.ln_final(last).reshape(b * length, width), rows, 0)  # (B, W)
        return ops.matmul(picked, self.text_projection)

    def construct(self, ids: Tensor) -> Tensor:
        """(B, 77) ids -> pooled projection (B, E)."""
        return self.pool(self.hidden_state(ids, self.num_layers), ids)
