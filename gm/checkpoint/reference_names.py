"""The reference's (mindone ``examples/stable_diffusion_xl``) MindSpore names for SDXL weights.

Its converter copies the official single file tensor by tensor under MindSpore's own layer
conventions: a norm's affine pair is ``gamma``/``beta`` (``nn.LayerNorm``, ``nn.GroupNorm``) and
an embedding table is ``embedding_table`` (``nn.Embedding``); every other name, shape and layout
stays official (0-d ``logit_scale`` included). Our layers keep torch's ``weight``/``bias``, so the
map is derived from the model itself -- which cells are norms and which are embeddings -- not
from a list of names. Its published key list has one defect, kept here as an alias so converted
files load: CLIP-L's token embedding is written as
``conditioner.embedders.1.model.token_embedding..embedding_table``.
"""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np
from mindspore import nn

from gm.modules.layers import Embedding, GroupNorm, LayerNorm

_RENAMES = {GroupNorm: {"weight": "gamma", "bias": "beta"}, LayerNorm: {"weight": "gamma", "bias": "beta"},
            Embedding: {"weight": "embedding_table"}}
_CLIP_L_TOKENS = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
_MISNAMED_CLIP_L_TOKENS = "conditioner.embedders.1.model.token_embedding..embedding_table"


def reference_names(engine: nn.Cell) -> Dict[str, str]:
    """``official name -> reference name`` for every parameter of ``engine`` (identity where they agree)."""
    names = {name: name for name, _ in engine.parameters_and_names()}
    for prefix, cell in engine.cells_and_names():
        kind = next((k for k in _RENAMES if isinstance(cell, k)), None)
        for ours, theirs in _RENAMES.get(kind, {}).items():
            official = f"{prefix}.{ours}" if prefix else ours
            if official in names:
                names[official] = official[: -len(ours)] + theirs
    return names


def uses_reference_names(source: Mapping[str, np.ndarray]) -> bool:
    """True for a file written under the reference's names (any ``gamma``/``beta``/``embedding_table``)."""
    return any(key.endswith((".gamma", ".beta", ".embedding_table")) for key in source)


def to_official_names(engine: nn.Cell, source: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``source`` (reference names) renamed to official ones; keys the map does not know are kept
    as they are, so the loader's missing/unexpected-key report names them."""
    official = {theirs: ours for ours, theirs in reference_names(engine).items()}
    official.setdefault(_MISNAMED_CLIP_L_TOKENS, _CLIP_L_TOKENS)
    return {official.get(key, key): source[key] for key in source}


def to_reference_names(engine: nn.Cell, state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Official names -> the reference's (the properly named CLIP-L token embedding, not the alias)."""
    names = reference_names(engine)
    return {names.get(key, key): value for key, value in state.items()}
