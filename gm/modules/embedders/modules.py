"""SDXL's conditioning embedders, with the YAML interface and parameter names of Stability's ``sgm``.

Each embedder has a host half and a graph half:
- ``prepare(values) -> np.ndarray``: the host turns the batch entry (prompts, sizes) into an
  array (token ids are made here, never in graph);
- ``construct(array)``: the graph embeds it.
and declares which conditioning slots its outputs fill (``output_keys``) and how wide they are
(``output_widths``), which the GeneralConditioner uses to concatenate and to zero outputs.

Source: ``sgm/modules/encoders/modules.py`` (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2,
ConcatTimestepEmbedderND) of Stability-AI/generative-models.
"""

from __future__ import annotations

import os
from abc import ABCMeta, abstractmethod
from typing import Optional, Sequence, Tuple

import numpy as np
from mindspore import Tensor, nn

from gm.modules.diffusionmodules.util import timestep_embedding
from gm.modules.embedders.clip import CLIPTextModel, OpenCLIPTextModel
from gm.modules.embedders.tokenizer import EOT_TOKEN, MAX_LENGTH, OPEN_CLIP_PAD_TOKEN, CLIPTextTokenizer


class AbstractEmbedder(nn.Cell, metaclass=ABCMeta):
    """Base of the conditioner's embedders.

    Attributes (class defaults, set per instance by the conditioner from the YAML entry):
        input_key: batch key this embedder reads (``txt``, ``original_size_as_tuple``, ...).
        is_trainable: False freezes the embedder's parameters.
        output_keys: conditioning slot of each output: ``crossattn`` (B, L, C) or ``vector`` (B, C).
    """

    input_key: str = ""
    is_trainable: bool = False
    output_keys: Tuple[str, ...] = ()

    @abstractmethod
    def prepare(self, values) -> np.ndarray:
        """Host side: the batch entry -> the array ``construct`` takes."""

    @abstractmethod
    def output_widths(self, prepared: np.ndarray) -> Tuple[int, ...]:
        """Last-axis width of each output for the host array ``prepared`` (one per ``output_keys``)."""

    def prepared_shape(self, values) -> Tuple[int, ...]:
        """The shape of ``prepare(values)``."""
        return np.shape(self.prepare(values))


class TextEmbedder(AbstractEmbedder):
    """An embedder of prompts through ``self.tokenizer`` (a ``CLIPTextTokenizer``, set by the subclass)."""

    def prepare(self, values: Sequence[str]) -> np.ndarray:
        """Prompts (B strings) -> (B, 77) int32 ids, padded as the tokenizer pads."""
        return self.tokenizer(values)

    def prepared_shape(self, values: Sequence[str]) -> Tuple[int, ...]:
        # without loading the tokenizer (0.7 s): every row is padded to max_length
        return (1 if isinstance(values, str) else len(values), self.tokenizer.max_length)


class FrozenCLIPEmbedder(TextEmbedder):
    """CLIP ViT-L/14 text encoder (SDXL's encoder 1): prompts -> hidden states (B, 77, width).

    Args:
        layer: ``"hidden"``: the hidden state after ``layer_idx`` blocks, without the final
            LayerNorm (SDXL: layer_idx = layers - 1, the penultimate); ``"last"``: the last
            hidden state after the final LayerNorm.
        layer_idx: block count for ``layer="hidden"`` (transformers' ``hidden_states[layer_idx]``).
        width, layers, heads, intermediate_size: 768, 12, 12, 3072 for SDXL.
        vocab_size, max_length: 49408, 77.
        tokenizer_path: a diffusers ``tokenizer/`` folder, or None for the shipped vocabulary.
    Parameters are ``transformer.text_model.*`` (official: ``conditioner.embedders.0.transformer.*``).
    """

    LAYERS = ("last", "hidden")

    def __init__(self, layer: str = "last", layer_idx: Optional[int] = None, *, width: int = 768, layers: int = 12,
                 heads: int = 12, intermediate_size: int = 3072, vocab_size: int = 49408,
                 max_length: int = MAX_LENGTH, tokenizer_path: Optional[str | os.PathLike] = None):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"FrozenCLIPEmbedder: layer='{layer}' is not supported; use one of {self.LAYERS}")
        if layer == "hidden" and (layer_idx is None or not 0 <= layer_idx <= layers):
            raise ValueError(f"FrozenCLIPEmbedder: layer='hidden' needs 0 <= layer_idx <= {layers}, got {layer_idx}")
        self.layer = layer
        self.num_blocks = layer_idx if layer == "hidden" else layers
        self.final_norm = layer == "last"
        self.transformer = CLIPTextModel(width, layers, heads, intermediate_size, vocab_size, max_length)
        self.tokenizer = CLIPTextTokenizer(EOT_TOKEN, max_length, tokenizer_path)
        self.width = width
        self.output_keys = ("crossattn",)

    def output_widths(self, prepared: np.ndarray) -> Tuple[int, ...]:
        return (self.width,)

    def construct(self, ids: Tensor) -> Tensor:
        """(B, 77) int32 ids -> (B, 77, width)."""
        x = self.transformer.hidden_state(ids, self.num_blocks)
        if self.final_norm:
            x = self.transformer.text_model.final_layer_norm(x)
        return x


class FrozenOpenCLIPEmbedder2(TextEmbedder):
    """OpenCLIP ViT-bigG/14 text encoder (SDXL's encoder 2): prompts -> (hidden states, pooled).

    Args:
        layer: ``"penultimate"`` (SDXL: the input of the last block) or ``"last"`` (its output);
            neither gets ``ln_final``, as in sgm with ``legacy=False``.
        always_return_pooled: also return ``pooled = ln_final(last)[EOT] @ text_projection``.
        legacy: must be False (sgm's legacy mode returned pre-SDXL outputs; SDXL never uses it).
        width, layers, heads, embed_dim, mlp_ratio: 1280, 32, 20, 1280, 4 for SDXL.
        vocab_size, max_length: 49408, 77.
        tokenizer_path: a diffusers ``tokenizer_2/`` folder, or None for the shipped vocabulary.
    Parameters are ``model.*`` (official: ``conditioner.embedders.1.model.*``).
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, layer: str = "penultimate", always_return_pooled: bool = True, legacy: bool = False, *,
                 width: int = 1280, layers: int = 32, heads: int = 20, embed_dim: int = 1280, mlp_ratio: float = 4.0,
                 vocab_size: int = 49408, max_length: int = MAX_LENGTH,
                 tokenizer_path: Optional[str | os.PathLike] = None):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"FrozenOpenCLIPEmbedder2: layer='{layer}' is not supported; use one of {self.LAYERS}")
        if legacy:
            raise ValueError("FrozenOpenCLIPEmbedder2: legacy=True is not supported (SDXL configs use legacy: False)")
        self.layer = layer
        self.return_pooled = always_return_pooled
        self.model = OpenCLIPTextModel(width, layers, heads, embed_dim, mlp_ratio, vocab_size, max_length)
        self.tokenizer = CLIPTextTokenizer(OPEN_CLIP_PAD_TOKEN, max_length, tokenizer_path)
        self.num_layers = layers
        self.width = width
        self.embed_dim = embed_dim
        self.output_keys = ("crossattn", "vector") if always_return_pooled else ("crossattn",)

    def output_widths(self, prepared: np.ndarray) -> Tuple[int, ...]:
        return (self.width, self.embed_dim) if self.return_pooled else (self.width,)

    def construct(self, ids: Tensor):
        """(B, 77) int32 ids -> (B, 77, width) [and pooled (B, embed_dim) if always_return_pooled]."""
        penultimate = self.model.hidden_state(ids, self.num_layers - 1)
        if not self.return_pooled and self.layer == "penultimate":
            return penultimate
        last = self.model.transformer.resblocks[self.num_layers - 1](penultimate, self.model.mask)
        hidden = penultimate if self.layer == "penultimate" else last
        if self.return_pooled:
            return hidden, self.model.pool(last, ids)
        return hidden


class ConcatTimestepEmbedderND(AbstractEmbedder):
    """Each of n numbers per sample -> a sinusoidal embedding of width ``outdim``, concatenated.

    SDXL's micro-conditioning: (h, w) original size, (top, left) crop, (h, w) target size, each
    (B, 2) -> (B, 2 * outdim) = [emb(first), emb(second)], in sgm's cat[cos, sin] form. Equal to
    diffusers' ``add_time_proj`` applied to the flattened ``add_time_ids``.
    """

    def __init__(self, outdim: int = 256):
        super().__init__()
        self.outdim = outdim
        self.output_keys = ("vector",)

    def output_widths(self, prepared: np.ndarray) -> Tuple[int, ...]:
        return (prepared.shape[-1] * self.outdim,)

    def prepare(self, values) -> np.ndarray:
        """(B, n) numbers (array, tensor or list of tuples) -> (B, n) float32."""
        if isinstance(values, Tensor):
            values = values.asnumpy()
        array = np.asarray(values, dtype=np.float32)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2:
            raise ValueError(f"ConcatTimestepEmbedderND expects (B, n) numbers, got shape {array.shape}")
        return array

    def construct(self, x: Tensor) -> Tensor:
        """(B, n) float32 -> (B, n * outdim)."""
        b, n = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, n * self.outdim)
