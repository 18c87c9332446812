"""Key map: our (sgm) UNet parameter names <- diffusers ``UNet2DConditionModel`` state-dict keys.

Derived from the cell itself: each parameter name is split into its block path (which
input/middle/output block and which slot), translated by the sgm -> diffusers block mapping
(the UNet's ``num_res_blocks`` fixes the block numbering), and its inner part renamed by the
kind of block it lives in (ResBlock, SpatialTransformer, Downsample, Upsample). Spatial
transformers keep their inner names in both formats.
"""

from __future__ import annotations

from typing import List, Tuple

from mindspore import nn

from gm.checkpoint.keymap import KeyRule, rename
from gm.modules.attention import SpatialTransformer
from gm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, UNetModel, Upsample
from gm.modules.lora import is_lora_parameter

IGNORED_SOURCE_KEYS: Tuple[str, ...] = ()
OPTIONAL_TARGETS: Tuple[str, ...] = ()

# top-level parts outside the blocks: sgm prefix -> diffusers prefix
_TOP = {
    "time_embed.0.": "time_embedding.linear_1.",
    "time_embed.2.": "time_embedding.linear_2.",
    "label_emb.0.0.": "add_embedding.linear_1.",
    "label_emb.0.2.": "add_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.",
    "out.0.": "conv_norm_out.",
    "out.2.": "conv_out.",
}

# inner names of a ResBlock: sgm -> diffusers ResnetBlock2D
_RESBLOCK = {
    "in_layers.0.": "norm1.",
    "in_layers.2.": "conv1.",
    "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.",
    "out_layers.3.": "conv2.",
    "skip_connection.": "conv_shortcut.",
}


def rules(cell: UNetModel) -> List[KeyRule]:
    """One copy rule per parameter of ``cell``: target = our name, source = the diffusers key."""
    if not isinstance(cell, UNetModel):
        raise TypeError(f"diffusers_unet.rules expects a UNetModel, got {type(cell).__name__}")
    # LoRA factors are no part of a base checkpoint (gm.checkpoint.lora handles them)
    return [rename(name, diffusers_name(cell, name)) for name, _ in cell.parameters_and_names()
            if not is_lora_parameter(name)]


def diffusers_name(unet: UNetModel, name: str) -> str:
    """The diffusers key of our parameter ``name`` (e.g. ``input_blocks.4.1.proj_in.weight``
    -> ``down_blocks.1.attentions.0.proj_in.weight``)."""
    for ours, theirs in _TOP.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    part, *rest = name.split(".")
    if part == "middle_block":
        slot, inner = int(rest[0]), ".".join(rest[1:])
        layer = unet.middle_block[slot]
        prefix = "mid_block.attentions.0" if isinstance(layer, SpatialTransformer) else f"mid_block.resnets.{slot // 2}"
        return _inner(layer, prefix, inner, name)
    if part in ("input_blocks", "output_blocks"):
        index, slot, inner = int(rest[0]), int(rest[1]), ".".join(rest[2:])
        blocks = unet.input_blocks if part == "input_blocks" else unet.output_blocks
        layer = blocks[index][slot]
        per_level = unet.num_res_blocks + 1  # diffusers: L resnets + 1 downsampler / L+1 resnets per up block
        if part == "input_blocks":
            level, pos = divmod(index - 1, per_level)
            prefix = _block_prefix("down_blocks", level, pos, layer, Downsample)
        else:
            level, pos = divmod(index, per_level)
            prefix = _block_prefix("up_blocks", level, pos, layer, Upsample)
        return _inner(layer, prefix, inner, name)
    raise ValueError(f"diffusers_unet: no diffusers name for UNet parameter '{name}'")


def _block_prefix(kind: str, level: int, pos: int, layer: nn.Cell, sampler_type: type) -> str:
    if isinstance(layer, sampler_type):
        return f"{kind}.{level}.{'downsamplers' if kind == 'down_blocks' else 'upsamplers'}.0"
    if isinstance(layer, ResBlock):
        return f"{kind}.{level}.resnets.{pos}"
    if isinstance(layer, SpatialTransformer):
        return f"{kind}.{level}.attentions.{pos}"
    raise ValueError(f"diffusers_unet: unexpected {type(layer).__name__} in {kind}.{level}")


def _inner(layer: nn.Cell, prefix: str, inner: str, name: str) -> str:
    if isinstance(layer, ResBlock):
        for ours, theirs in _RESBLOCK.items():
            if inner.startswith(ours):
                return f"{prefix}.{theirs}{inner[len(ours):]}"
        raise ValueError(f"diffusers_unet: unknown ResBlock parameter '{name}'")
    if isinstance(layer, (Downsample, Upsample)):
        # sgm's Downsample conv is `op`, Upsample's `conv`; diffusers calls both `conv`
        return f"{prefix}.conv.{inner.split('.', 1)[1]}"
    return f"{prefix}.{inner}"
