"""Bake LoRAs into base weights: ``W += sum_i scale_i * (alpha_i / rank_i) * up_i @ down_i``.

Two targets share one computation of the updates (``lora_deltas``):

- ``merge_into_single_file``: an official single ``.safetensors`` in, one out (official key names,
  every non-LoRA tensor copied as is, in the base's dtype unless a cast is asked for). Tensors are
  read, updated and written one at a time, so a 7 GB base never needs twice its size in memory.
- ``merge_into_engine``: the weights of a loaded model (sampling with several LoRAs at chosen
  scales costs what the base costs).

LoRAs come in any format ``gm.checkpoint.lora_formats`` reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from mindspore import nn

from gm.checkpoint.errors import CheckpointError
from gm.checkpoint.lora_formats import lora_names, parse_updates
from gm.checkpoint.safetensors_io import SafetensorsFile, write_safetensors_streaming

_logger = logging.getLogger(__name__)
_CASTS = {"keep": None, "fp32": "F32", "fp16": "F16", "bf16": "BF16"}

# official weight name -> [(rows or None, delta (out, in) float32)]
Deltas = Dict[str, List[Tuple[Tuple[int, int] | None, np.ndarray]]]


def lora_deltas(engine: nn.Cell, loras: Sequence[Tuple[str | os.PathLike, float]]) -> Deltas:
    """The weight updates of every (LoRA file, scale), keyed by the official base weight name."""
    from gm.checkpoint.lora import read_any_lora_file

    names = {n.ours: n for n in lora_names(engine)}
    deltas: Deltas = {}
    for path, scale in loras:
        arrays, metadata, fmt = read_any_lora_file(path)
        updates = parse_updates(path, arrays, metadata, list(names.values()), fmt)
        for ours, (down, up, alpha) in updates.modules.items():
            factor = np.float32(scale * alpha / down.shape[0])
            deltas.setdefault(names[ours].weight, []).append((names[ours].rows, factor * (up @ down)))
        _logger.info("%s: %d modules (%s format) at scale %g", path, len(updates), fmt, scale)
    return deltas


def _check_shapes(where: str | os.PathLike, deltas: Deltas, shape_of) -> None:
    for name, parts in deltas.items():
        shape = tuple(shape_of(name))
        for rows, delta in parts:
            expected = (shape[0] if rows is None else rows[1] - rows[0], int(np.prod(shape[1:])))
            if delta.shape != expected:
                raise CheckpointError(f"{where}: '{name}' is {shape}, the LoRA update is {delta.shape} -- "
                                      "a LoRA for another model size")


def _add_deltas(value: np.ndarray, parts) -> np.ndarray:
    """``value`` (any float dtype) plus its updates, computed in float32."""
    merged = value.astype(np.float32)
    flat = merged.reshape(merged.shape[0], -1)
    for rows, delta in parts:
        if rows is None:
            flat += delta
        else:
            flat[rows[0]:rows[1]] += delta
    return merged


def merge_into_engine(engine: nn.Cell, loras: Sequence[Tuple[str | os.PathLike, float]]) -> int:
    """Add ``loras`` (file, scale) to the loaded base weights of ``engine`` (no LoRA layers are
    injected; the model keeps the base structure). Returns the number of updated weights."""
    from mindspore import Tensor

    from gm.modules.lora import lora_config_of

    if lora_config_of(engine) is not None:
        raise CheckpointError("merge_into_engine: the model has LoRA layers; merge LoRA files into a plain base")
    deltas = lora_deltas(engine, loras)
    params = dict(engine.parameters_and_names())
    _check_shapes(", ".join(str(p) for p, _ in loras), deltas, lambda name: params[name].shape)
    for name, parts in deltas.items():
        param = params[name]
        value = param.asnumpy()
        param.set_data(Tensor(_add_deltas(value, parts).astype(value.dtype)))
    return len(deltas)


def parse_lora_spec(text: str) -> Tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` -> (file, scale); a ``:`` followed by no number is part of the path."""
    path, sep, scale = text.rpartition(":")
    if not sep or not path:
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        return text, 1.0


def load_base_with_loras(engine: nn.Cell, weight: str | os.PathLike,
                         loras: Sequence[Tuple[str | os.PathLike, float]] = (),
                         prediction_type: Optional[str] = None) -> None:
    """Base weights, then every (LoRA file, scale) merged in: what the sampling CLI and page serve.
    ``prediction_type``: as ``load_weights`` (None: what the weights declare, else the config's)."""
    from gm.checkpoint.load import load_weights

    load_weights(engine, weight, prediction_type)
    if loras:
        merge_into_engine(engine, loras)


def merge_into_single_file(engine: nn.Cell, base: str | os.PathLike, loras: Sequence[Tuple[str, float]],
                           output: str | os.PathLike, dtype: str = "keep") -> int:
    """Write ``base`` with ``loras`` baked in to ``output`` (official single ``.safetensors``).

    ``engine`` (may be built without memory) names the modules. Returns the number of updated tensors.
    """
    base, output = Path(base), Path(output)
    if base.suffix != ".safetensors" or output.suffix != ".safetensors":
        raise CheckpointError(f"{base} -> {output}: the base and the output are official single .safetensors files "
                              "(convert a diffusers folder or .ckpt with tools/convert_weights.py first)")
    if output.exists() and output.resolve() == base.resolve():
        raise CheckpointError(f"{output} is the base file; choose another output name")
    if dtype not in _CASTS:
        raise CheckpointError(f"dtype '{dtype}': choose one of {', '.join(_CASTS)}")
    deltas = lora_deltas(engine, loras)
    source = SafetensorsFile(base)
    missing = sorted(set(deltas) - set(source))
    if missing:
        raise CheckpointError(f"{base}: has no '{missing[0]}' for the LoRA to update -- "
                              "is it an SDXL base single file?")
    _check_shapes(base, deltas, source.shape)

    def produce(name: str) -> np.ndarray:
        value = source[name]
        return _add_deltas(value, deltas[name]) if name in deltas else value

    def out_dtype(name: str) -> str:
        stored = source.dtype(name)
        cast = _CASTS[dtype]
        return cast if cast is not None and stored in ("F32", "F16", "BF16", "F64") else stored

    entries = [(name, out_dtype(name), tuple(source.shape(name))) for name in source]
    write_safetensors_streaming(output, entries, produce,
                                metadata={**source.metadata, "merged_loras": ",".join(
                                    f"{Path(p).name}:{s:g}" for p, s in loras)})
    _logger.info("wrote %s: %d tensors, %d updated by %d LoRA(s)", output, len(entries), len(deltas), len(loras))
    return len(deltas)
