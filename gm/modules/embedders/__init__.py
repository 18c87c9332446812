"""SDXL's conditioning: the two text encoders, their tokenizers, the size embedder, the conditioner."""

from gm.modules.embedders.conditioner import GeneralConditioner
from gm.modules.embedders.modules import ConcatTimestepEmbedderND, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2

__all__ = ["ConcatTimestepEmbedderND", "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2", "GeneralConditioner"]
