"""Key map between our VAE (sgm names) and a diffusers ``AutoencoderKL`` state dict.

Derived from the cell's own parameter names and its level count, one translation per naming
difference (sgm -> diffusers):

- ``{enc,dec}oder.down.i.block.j`` / ``decoder.up.i.block.j`` -> ``down_blocks.i.resnets.j`` /
  ``up_blocks.(n-1-i).resnets.j`` (the decoder's levels are listed in reverse in diffusers),
- ``downsample.conv`` / ``upsample.conv`` -> ``downsamplers.0.conv`` / ``upsamplers.0.conv``,
- ``nin_shortcut`` -> ``conv_shortcut``,
- ``mid.block_1`` / ``mid.block_2`` -> ``mid_block.resnets.0`` / ``.1``,
- ``mid.attn_1.{norm,q,k,v,proj_out}`` -> ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}``
  (diffusers' attention projections are Linear (C, C); ours are 1x1 convs (C, C, 1, 1)),
- ``norm_out`` -> ``conv_norm_out``; ``conv_in``, ``conv_out``, ``quant_conv``, ``post_quant_conv`` keep their names.
"""

from __future__ import annotations

import re
from typing import List

from mindspore import nn

from gm.checkpoint.keymap import KeyRule

IGNORED_SOURCE_KEYS: tuple = ()
OPTIONAL_TARGETS: tuple = ()

_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_PARTS = {"norm1", "conv1", "norm2", "conv2", "nin_shortcut"}


def _resnet_tail(tail: str, name: str) -> str:
    """``conv1.weight`` -> ``conv1.weight``, ``nin_shortcut.bias`` -> ``conv_shortcut.bias``."""
    part, _, leaf = tail.partition(".")
    if part not in _RESNET_PARTS:
        raise ValueError(f"VAE parameter '{name}': unknown ResNet block part '{part}'")
    return ("conv_shortcut" if part == "nin_shortcut" else part) + "." + leaf


def _translate(name: str, num_levels: int) -> KeyRule:
    """The rule that makes our parameter ``name`` from the diffusers state dict."""
    half, _, rest = name.partition(".")
    if half in ("quant_conv", "post_quant_conv"):
        return KeyRule(name, (name,))
    if half not in ("encoder", "decoder"):
        raise ValueError(f"VAE parameter '{name}' has no diffusers counterpart")
    if m := re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(.+)", rest):
        kind, level, block, tail = m.groups()
        index = int(level) if kind == "down" else num_levels - 1 - int(level)
        src = f"{kind}_blocks.{index}.resnets.{block}.{_resnet_tail(tail, name)}"
    elif m := re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(\w+)", rest):
        kind, level, _, leaf = m.groups()
        index = int(level) if kind == "down" else num_levels - 1 - int(level)
        src = f"{kind}_blocks.{index}.{kind}samplers.0.conv.{leaf}"
    elif m := re.fullmatch(r"mid\.block_([12])\.(.+)", rest):
        src = f"mid_block.resnets.{int(m.group(1)) - 1}.{_resnet_tail(m.group(2), name)}"
    elif m := re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest):
        part, leaf = m.groups()
        src = f"mid_block.attentions.0.{_ATTN_PARTS[part]}.{leaf}"
        if part != "norm" and leaf == "weight":
            return KeyRule(name, (f"{half}.{src}",), "linear_to_conv")
    elif rest.startswith("norm_out."):
        src = "conv_norm_out." + rest[len("norm_out."):]
    elif rest.startswith(("conv_in.", "conv_out.")):
        src = rest
    else:
        # e.g. encoder.down.i.attn.j (attn_resolutions non-empty): diffusers' AutoencoderKL has no such blocks
        raise ValueError(f"VAE parameter '{name}' has no diffusers AutoencoderKL counterpart "
                         "(diffusers supports attention only in the mid block: use attn_resolutions: [])")
    return KeyRule(name, (f"{half}.{src}",))


def rules(cell: nn.Cell) -> List[KeyRule]:
    """Rules making each parameter of our ``AutoencoderKL`` ``cell`` from a diffusers AutoencoderKL state dict.

    Args:
        cell: a ``gm.models.autoencoder.AutoencoderKL`` (only its parameter names and the
            decoder's level count are read, so a ``no_init_parameters`` model works).
    Returns:
        One KeyRule per parameter, target = our (sgm) name relative to the VAE.
    """
    num_levels = cell.decoder.num_resolutions
    return [_translate(name, num_levels) for name, _ in cell.parameters_and_names()]
