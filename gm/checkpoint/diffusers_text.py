"""Key maps between our text embedders and diffusers' ``text_encoder/`` and ``text_encoder_2/``.

Both diffusers folders hold transformers CLIP text models (``CLIPTextModel``,
``CLIPTextModelWithProjection``). Derived from each embedder's own parameter names:

- encoder 1 (``FrozenCLIPEmbedder``): our ``transformer.X`` is transformers' ``X`` unchanged
  (SDXL's single file keeps the transformers layout for CLIP-L).
- encoder 2 (``FrozenOpenCLIPEmbedder2``): our OpenCLIP names ``model.*`` from transformers' names:
  ``token_embedding`` <- ``text_model.embeddings.token_embedding``,
  ``positional_embedding`` <- ``text_model.embeddings.position_embedding.weight``,
  ``transformer.resblocks.N.{ln_1, ln_2, attn.out_proj, mlp.c_fc, mlp.c_proj}`` <-
  ``text_model.encoder.layers.N.{layer_norm1, layer_norm2, self_attn.out_proj, mlp.fc1, mlp.fc2}``,
  ``attn.in_proj_{weight,bias}`` <- concat(q_proj, k_proj, v_proj) on axis 0,
  ``ln_final`` <- ``text_model.final_layer_norm``,
  ``text_projection`` (W, E), used as ``x @ P`` <- ``text_projection.weight`` (E, W) transposed,
  ``logit_scale``: no counterpart (optional; only the single file has it).

The rules expect transformers 4's layout (``text_model.*``, as in the SDXL repositories on the
hub); ``adapt_source`` adds that prefix to a ``CLIPTextModel`` saved by transformers >= 5, which
drops it. ``RULES``, ``IGNORED_SOURCE_KEYS`` and ``OPTIONAL_TARGETS`` are keyed by component name
for ``gm.checkpoint.load``.
"""

from __future__ import annotations

import re
from typing import Iterator, List, Mapping, Tuple

import numpy as np
from mindspore import nn

from gm.checkpoint.keymap import KeyRule
from gm.modules.lora import is_lora_parameter

# a buffer that transformers < 4.31 saved with the weights
_POSITION_IDS = "text_model.embeddings.position_ids"
IGNORED_SOURCE_KEYS = {"text_encoder": (_POSITION_IDS,), "text_encoder_2": (_POSITION_IDS,)}
OPTIONAL_TARGETS = {"text_encoder": (), "text_encoder_2": ("model.logit_scale",)}

_TEXT_MODEL = "text_model."
_CLIP_L_PREFIX = "transformer."
_OPEN_CLIP_PREFIX = "model."
_BLOCK_PARTS = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _param_names(cell: nn.Cell) -> List[str]:
    # LoRA factors are no part of a base checkpoint (gm.checkpoint.lora handles them)
    return [name for name, _ in cell.parameters_and_names() if not is_lora_parameter(name)]


def rules_clip_l(cell: nn.Cell) -> List[KeyRule]:
    """Rules for a ``FrozenCLIPEmbedder`` ``cell`` from a transformers ``CLIPTextModel`` state dict.

    Every parameter ``transformer.<name>`` comes from ``<name>`` (one copy per parameter).
    """
    out = []
    for name in _param_names(cell):
        if not name.startswith(_CLIP_L_PREFIX):
            raise ValueError(f"CLIP-L parameter '{name}' is not under '{_CLIP_L_PREFIX}'; "
                             "is this a FrozenCLIPEmbedder?")
        out.append(KeyRule(name, (name[len(_CLIP_L_PREFIX):],)))
    return out


def _open_clip_rule(name: str) -> KeyRule:
    """The rule making our OpenCLIP parameter ``name`` (``model.*``) from transformers' names."""
    rest = name[len(_OPEN_CLIP_PREFIX):]
    if rest == "token_embedding.weight":
        return KeyRule(name, ("text_model.embeddings.token_embedding.weight",))
    if rest == "positional_embedding":
        return KeyRule(name, ("text_model.embeddings.position_embedding.weight",))
    if rest == "text_projection":
        return KeyRule(name, ("text_projection.weight",), "transpose")
    if rest == "logit_scale":
        return KeyRule(name, ("logit_scale",))  # absent from transformers files: OPTIONAL_TARGETS
    if m := re.fullmatch(r"ln_final\.(weight|bias)", rest):
        return KeyRule(name, (f"text_model.final_layer_norm.{m.group(1)}",))
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", rest)
    m_packed = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", rest)
    if m_packed:
        layer, leaf = m_packed.groups()
        base = f"text_model.encoder.layers.{layer}.self_attn"
        return KeyRule(name, tuple(f"{base}.{p}_proj.{leaf}" for p in "qkv"), "cat0")
    if m and m.group(2) in _BLOCK_PARTS:
        layer, part, leaf = m.groups()
        return KeyRule(name, (f"text_model.encoder.layers.{layer}.{_BLOCK_PARTS[part]}.{leaf}",))
    raise ValueError(f"OpenCLIP parameter '{name}' has no transformers CLIPTextModelWithProjection counterpart")


def rules_open_clip_g(cell: nn.Cell) -> List[KeyRule]:
    """Rules for a ``FrozenOpenCLIPEmbedder2`` ``cell`` from a ``CLIPTextModelWithProjection`` state dict.

    Reads only parameter names, so a model built under ``no_init_parameters`` works.
    """
    out = []
    for name in _param_names(cell):
        if not name.startswith(_OPEN_CLIP_PREFIX):
            raise ValueError(f"OpenCLIP parameter '{name}' is not under '{_OPEN_CLIP_PREFIX}'; "
                             "is this a FrozenOpenCLIPEmbedder2?")
        out.append(_open_clip_rule(name))
    return out


RULES = {"text_encoder": rules_clip_l, "text_encoder_2": rules_open_clip_g}


class _PrefixedKeys(Mapping[str, np.ndarray]):
    """``source`` with ``prefix`` put in front of every key (arrays read on access)."""

    def __init__(self, source: Mapping[str, np.ndarray], prefix: str):
        self._source, self._prefix = source, prefix

    def __getitem__(self, key: str) -> np.ndarray:
        if not key.startswith(self._prefix):
            raise KeyError(key)
        return self._source[key[len(self._prefix):]]

    def __iter__(self) -> Iterator[str]:
        return (self._prefix + k for k in self._source)

    def __len__(self) -> int:
        return len(self._source)

    def shape(self, key: str) -> Tuple[int, ...]:
        inner = key[len(self._prefix):]
        shape = getattr(self._source, "shape", None)
        return tuple(shape(inner)) if callable(shape) else tuple(np.shape(self._source[inner]))


def adapt_source(component: str, source: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """A transformers state dict in the layout the rules expect (``text_model.*``).

    transformers >= 5 saves ``CLIPTextModel`` as ``embeddings.*``, ``encoder.*``,
    ``final_layer_norm.*``; transformers 4 (and the SDXL hub folders) as ``text_model.*``.
    ``CLIPTextModelWithProjection`` keeps ``text_model.*`` in both.
    """
    if component == "text_encoder" and len(source) and not any(k.startswith(_TEXT_MODEL) for k in source):
        return _PrefixedKeys(source, _TEXT_MODEL)
    return source
