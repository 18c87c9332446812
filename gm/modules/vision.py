"""The image towers of the evaluation models, with transformers' parameter names.

- ``CLIPVisionModelWithProjection``: CLIP's ViT image tower (``vision_model.embeddings.*``,
  ``vision_model.pre_layrnorm`` (sic), ``vision_model.encoder.layers.N.*`` as the CLIP text
  tower's blocks, ``vision_model.post_layernorm``, ``visual_projection``); the image embedding is
  ``visual_projection(post_layernorm(hidden[:, 0]))``.
- ``CLIPTextModelWithProjection``: the CLIP text tower of :mod:`gm.modules.embedders.clip` plus
  ``text_projection``, pooled at the first end-of-text token (the largest id).
- ``DinoViTModel``: transformers' ``ViTModel`` (DINO ViT-S/16: ``embeddings.cls_token``,
  ``embeddings.patch_embeddings.projection``, ``encoder.layer.N.attention.attention.query`` ...,
  ``layernorm``); the DreamBooth paper's DINO embedding is ``layernorm(hidden)[:, 0]``.

The patch embedding is a convolution with stride = kernel, computed as a patch reshape and one
matmul (exact, and fast on the CPU target where MindSpore's Conv2D is slow).
Sources: transformers ``models/clip/modeling_clip.py`` and ``models/vit/modeling_vit.py``.
"""

from __future__ import annotations

from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from gm.modules.attention import merge_heads, scaled_dot_product_attention, split_heads
from gm.modules.embedders.clip import CLIPEncoder, CLIPTextModel
from gm.modules.layers import LayerNorm, Linear, gelu_exact, linear


def patchify(pixels: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p), rows in raster order, columns in a conv
    weight's (C, p, p) order."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


class PatchProjection(nn.Cell):
    """A Conv2d(C, D, kernel=stride=patch) by its torch parameter names (``weight`` (D, C, p, p), ``bias``)."""

    def __init__(self, channels: int, width: int, patch: int, bias: bool):
        super().__init__()
        self.patch = patch
        self.weight = Parameter(initializer(Normal(0.02), (width, channels, patch, patch)), name="weight")
        self.bias = Parameter(initializer("zeros", (width,)), name="bias") if bias else None

    def construct(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, D)."""
        weight = self.weight.reshape(self.weight.shape[0], -1)
        return linear(patchify(pixels, self.patch), weight, self.bias)


# -- CLIP -------------------------------------------------------------------------------------


class CLIPVisionEmbeddings(nn.Cell):
    def __init__(self, width: int, image_size: int, patch: int):
        super().__init__()
        self.class_embedding = Parameter(initializer(Normal(0.02), (width,)), name="class_embedding")
        self.patch_embedding = PatchProjection(3, width, patch, bias=False)
        self.num_positions = (image_size // patch) ** 2 + 1
        self.position_embedding = _Table(self.num_positions, width)

    def construct(self, pixels: Tensor) -> Tensor:
        patches = self.patch_embedding(pixels)
        cls = ops.broadcast_to(self.class_embedding.reshape(1, 1, -1), (patches.shape[0], 1, patches.shape[2]))
        return ops.concat([cls, patches], axis=1) + self.position_embedding.weight


class _Table(nn.Cell):
    """A learned table used whole (torch's Embedding weight, by name)."""

    def __init__(self, rows: int, width: int):
        super().__init__()
        self.weight = Parameter(initializer(Normal(0.02), (rows, width)), name="weight")


class CLIPVisionTransformer(nn.Cell):
    def __init__(self, width: int, layers: int, heads: int, intermediate_size: int, image_size: int, patch: int,
                 eps: float):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(width, image_size, patch)
        self.pre_layrnorm = LayerNorm(width, eps=eps)
        self.encoder = CLIPEncoder(width, layers, heads, intermediate_size)
        self.post_layernorm = LayerNorm(width, eps=eps)

    def construct(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) -> pooled (B, W): post_layernorm of the class token's last hidden state."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x, None)
        return self.post_layernorm(x[:, 0])


class CLIPVisionModelWithProjection(nn.Cell):
    """Args: width, layers, heads, intermediate_size, image_size, patch, projection_dim (1024, 24,
    16, 4096, 224, 14, 768 for clip-vit-large-patch14), eps (1e-5)."""

    def __init__(self, width: int, layers: int, heads: int, intermediate_size: int, image_size: int, patch: int,
                 projection_dim: int, eps: float = 1e-5):
        super().__init__()
        self.image_size = image_size
        self.vision_model = CLIPVisionTransformer(width, layers, heads, intermediate_size, image_size, patch, eps)
        self.visual_projection = Linear(width, projection_dim, bias=False)

    def construct(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixels (B, 3, S, S) -> image embeddings (B, projection_dim), not normalised."""
        return self.visual_projection(self.vision_model(pixels))


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIP's text tower (``text_model.*``) and ``text_projection``; pooled at the first EOT token."""

    def __init__(self, width: int, layers: int, heads: int, intermediate_size: int, projection_dim: int,
                 vocab_size: int = 49408, max_length: int = 77):
        super().__init__(width, layers, heads, intermediate_size, vocab_size, max_length)
        self.text_projection = Linear(width, projection_dim, bias=False)

    def construct(self, ids: Tensor) -> Tensor:
        """(B, 77) int32 ids -> text embeddings (B, projection_dim), not normalised."""
        tm = self.text_model
        hidden = tm.final_layer_norm(self.hidden_state(ids, tm.num_layers))
        eot = ops.argmax(ids, dim=-1)  # the end-of-text id is the vocabulary's largest; argmax takes the first
        index = ops.broadcast_to(eot.reshape(-1, 1, 1).astype("int32"), (hidden.shape[0], 1, hidden.shape[2]))
        return self.text_projection(ops.gather_elements(hidden, 1, index)[:, 0])


# -- DINO ViT (transformers ViTModel) ----------------------------------------------------------


class _ViTSelfAttention(nn.Cell):
    def __init__(self, width: int):
        super().__init__()
        self.query = Linear(width, width)
        self.key = Linear(width, width)
        self.value = Linear(width, width)


class _ViTOutput(nn.Cell):
    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.dense = Linear(width_in, width_out)


class _ViTAttention(nn.Cell):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention = _ViTSelfAttention(width)
        self.output = _ViTOutput(width, width)

    def construct(self, x: Tensor) -> Tensor:
        a = self.attention
        q, k, v = (split_heads(proj(x), self.heads) for proj in (a.query, a.key, a.value))
        return self.output.dense(merge_heads(scaled_dot_product_attention(q, k, v)))


class ViTLayer(nn.Cell):
    """Pre-LN block: x + attention(layernorm_before(x)); x + output(gelu(intermediate(layernorm_after(x))))."""

    def __init__(self, width: int, heads: int, intermediate_size: int, eps: float):
        super().__init__()
        self.attention = _ViTAttention(width, heads)
        self.intermediate = _ViTOutput(width, intermediate_size)
        self.output = _ViTOutput(intermediate_size, width)
        self.layernorm_before = LayerNorm(width, eps=eps)
        self.layernorm_after = LayerNorm(width, eps=eps)

    def construct(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(gelu_exact(self.intermediate.dense(self.layernorm_after(x))))


class _ViTPatchEmbeddings(nn.Cell):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.projection = PatchProjection(3, width, patch, bias=True)


class _ViTEmbeddings(nn.Cell):
    def __init__(self, width: int, image_size: int, patch: int):
        super().__init__()
        self.cls_token = Parameter(initializer(Normal(0.02), (1, 1, width)), name="cls_token")
        self.position_embeddings = Parameter(initializer(Normal(0.02), (1, (image_size // patch) ** 2 + 1, width)),
                                             name="position_embeddings")
        self.patch_embeddings = _ViTPatchEmbeddings(width, patch)

    def construct(self, pixels: Tensor) -> Tensor:
        patches = self.patch_embeddings.projection(pixels)
        cls = ops.broadcast_to(self.cls_token, (patches.shape[0], 1, patches.shape[2]))
        return ops.concat([cls, patches], axis=1) + self.position_embeddings


class _ViTEncoder(nn.Cell):
    def __init__(self, width: int, layers: int, heads: int, intermediate_size: int, eps: float):
        super().__init__()
        self.layer = nn.CellList([ViTLayer(width, heads, intermediate_size, eps) for _ in range(layers)])


class DinoViTModel(nn.Cell):
    """Args: width, layers, heads, intermediate_size, image_size, patch (384, 12, 6, 1536, 224, 16
    for dino-vits16), eps (1e-12, ViTConfig's default)."""

    def __init__(self, width: int, layers: int, heads: int, intermediate_size: int, image_size: int, patch: int,
                 eps: float = 1e-12):
        super().__init__()
        self.image_size = image_size
        self.embeddings = _ViTEmbeddings(width, image_size, patch)
        self.encoder = _ViTEncoder(width, layers, heads, intermediate_size, eps)
        self.layernorm = LayerNorm(width, eps=eps)

    def construct(self, pixels: Tensor) -> Tensor:
        """Preprocessed pixels (B, 3, S, S) -> the class token after the final LayerNorm (B, width)."""
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)[:, 0]


__all__ = ["CLIPVisionModelWithProjection", "CLIPTextModelWithProjection", "DinoViTModel", "patchify"]
