"""LoRA weight files: saving in any format, loading any format (detected from the keys).

``gm.checkpoint.lora_formats`` maps between formats (kohya, diffusers, the seed's ckpt, ours);
this module reads and writes files and puts a LoRA into a model. Our own format:

- ``.safetensors``: the metadata sits in the header (``__metadata__``);
- ``.ckpt`` (MindSpore protobuf, the training script's ``*_lora.ckpt``): the same metadata as one
  JSON string entry ``gm_lora_metadata`` (``save_checkpoint(append_dict=...)``), so the file is
  self-contained.

Keys are the LoRA parameter names relative to the engine, e.g.
``model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight``.
Metadata: ``gm_lora_format_version``, ``lora_rank``, ``lora_alpha``, ``lora_dropout``,
``lora_unet_targets``, ``lora_text_encoder`` and whatever the caller adds (base model, step, ...).
Writes are atomic (``gm.fs.publish``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
from mindspore import nn

from gm.checkpoint.ckpt_io import read_ckpt_file
from gm.checkpoint.errors import CheckpointError, summarize_keys
from gm.checkpoint.lora_formats import (
    config_and_arrays,
    detect_format,
    format_arrays,
    lora_names,
    parse_updates,
    updates_of,
)
from gm.checkpoint.safetensors_io import SafetensorsFile
from gm.checkpoint.save import save_weights
from gm.errors import ConfigError
from gm.modules.lora import (
    LoRAConfig,
    expected_lora_shapes,
    inject_lora,
    is_lora_parameter,
    is_merged,
    lora_config_of,
    lora_parameters,
    lora_state,
    plan_lora,
    set_lora_values,
)

_logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
VERSION_KEY = "gm_lora_format_version"
CKPT_METADATA_KEY = "gm_lora_metadata"
_SUFFIXES = (".safetensors", ".ckpt")


def save_lora(engine: nn.Cell, path: str | os.PathLike, metadata: Optional[Mapping[str, object]] = None,
              lora_format: str = "gm", dtype: str = "keep") -> int:
    """Write ``engine``'s LoRA factors (and nothing else) to ``path``; returns the tensor count.

    Args:
        engine: a model injected with ``gm.modules.lora.inject_lora`` (not merged).
        path: ``*.safetensors`` or ``*.ckpt`` (the ``seed`` format: ``.ckpt``).
        metadata: extra entries (values are stored as strings), e.g. ``{"base_model": ..., "step": 400}``;
            they may not reuse the LoRA config's keys.
        lora_format: ``gm``, ``kohya``, ``diffusers`` or ``seed`` (see ``lora_formats``).
        dtype: ``keep``, ``fp32``, ``fp16`` or ``bf16``.
    """
    path = Path(path)
    if path.suffix not in _SUFFIXES:
        raise CheckpointError(f"{path}: a LoRA file must end in .safetensors or .ckpt")
    if lora_format != "gm":
        return _save_foreign(engine, path, metadata, lora_format, dtype)
    config = lora_config_of(engine)
    if config is None:
        raise CheckpointError("save_lora: the model has no LoRA layers (inject_lora first)")
    if is_merged(engine):
        raise CheckpointError("save_lora: the LoRA is merged into the base weights; unmerge_lora first")
    header = {VERSION_KEY: FORMAT_VERSION, **config.to_metadata()}
    clash = sorted(set(metadata or {}) & set(header))
    if clash:
        raise CheckpointError(f"save_lora: metadata keys {clash} are reserved for the LoRA config")
    header.update({str(k): str(v) for k, v in (metadata or {}).items()})
    arrays = lora_state(engine)
    return write_lora_arrays(path, arrays, header, "gm", dtype)


def _save_foreign(engine: nn.Cell, path: Path, metadata: Optional[Mapping[str, object]], lora_format: str,
                  dtype: str) -> int:
    config = lora_config_of(engine)
    if config is None:
        raise CheckpointError("save_lora: the model has no LoRA layers (inject_lora first)")
    if is_merged(engine):
        raise CheckpointError("save_lora: the LoRA is merged into the base weights; unmerge_lora first")
    names = lora_names(engine, text_encoders=config.text_encoder)  # (trained text encoders are never released)
    arrays, header = format_arrays(updates_of(engine), names, lora_format, config, metadata)
    return write_lora_arrays(path, arrays, header, lora_format, dtype)


def write_lora_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], header: Mapping[str, str],
                      lora_format: str, dtype: str = "keep") -> int:
    """Write already formatted LoRA ``arrays`` + string ``header`` atomically; returns the tensor count."""
    path = Path(path)
    if lora_format == "seed" and path.suffix != ".ckpt":
        raise CheckpointError(f"{path}: the seed's LoRA format is a MindSpore .ckpt; name the file *_lora.ckpt")
    if lora_format in ("kohya", "diffusers") and path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: {lora_format} LoRA files are .safetensors")
    if lora_format == "seed":
        # the seed's loader reads plain name -> tensor checkpoints: no metadata entry
        save_weights(arrays.items(), path, dtype=dtype)
    elif path.suffix == ".safetensors":
        save_weights(arrays.items(), path, dtype=dtype, metadata=header)
    else:
        save_weights(arrays.items(), path, dtype=dtype,
                     ckpt_entries={CKPT_METADATA_KEY: json.dumps(dict(header), sort_keys=True)})
    _logger.info("saved %d LoRA tensors (%s format) to %s", len(arrays), lora_format, path)
    return len(arrays)


def read_lora_file(path: str | os.PathLike) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """``(name -> array, metadata)`` of a LoRA file written by ``save_lora``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file")
    if path.suffix == ".safetensors":
        source = SafetensorsFile(path)
        return {name: source[name] for name in source}, dict(source.metadata)
    if path.suffix == ".ckpt":
        return _read_ckpt(path)
    raise CheckpointError(f"{path}: unsupported LoRA file; give a .safetensors or .ckpt LoRA")


def _read_ckpt(path: Path) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    arrays, strings = read_ckpt_file(path)
    raw = strings.pop(CKPT_METADATA_KEY, None)
    if strings:
        raise CheckpointError(f"{path}: non-tensor entries {summarize_keys(sorted(strings))}")
    metadata = {}
    if raw is not None:
        try:
            metadata = json.loads(raw)
        except (TypeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: entry '{CKPT_METADATA_KEY}' is not JSON") from None
    return arrays, metadata


def lora_config_from_metadata(path: str | os.PathLike, metadata: Mapping[str, str]) -> LoRAConfig:
    """The LoRAConfig recorded in a LoRA file's metadata, with one-line errors."""
    if VERSION_KEY not in metadata:
        raise CheckpointError(f"{path}: no '{VERSION_KEY}' metadata -- not a LoRA file written by this project "
                              "(a base checkpoint goes first in --weight)")
    if metadata[VERSION_KEY] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: LoRA format version {metadata[VERSION_KEY]}, this code reads "
                              f"{FORMAT_VERSION}; update the code")
    try:
        return LoRAConfig.from_metadata(metadata)
    except (KeyError, ValueError) as err:  # ConfigError is a ValueError
        raise CheckpointError(f"{path}: bad LoRA metadata ({type(err).__name__}: {err})") from None


def read_any_lora_file(path: str | os.PathLike) -> Tuple[Dict[str, np.ndarray], Dict[str, str], str]:
    """``(arrays, metadata, format)`` of a LoRA file in any format (``lora_formats.detect_format``);
    a file that is no LoRA of a known format gives a one-line error naming its odd keys."""
    arrays, metadata = read_lora_file(path)
    fmt = detect_format(list(arrays), metadata)
    if fmt is None:
        if not arrays:
            raise CheckpointError(f"{path}: the file holds no tensors -- not a LoRA file")
        odd = [k for k in arrays if not _looks_like_lora(k)]
        if len(odd) == len(arrays):
            raise CheckpointError(f"{path}: not a LoRA file ({summarize_keys(odd, 3)} keys, none a LoRA factor) -- "
                                  "a base checkpoint goes first in --weight")
        raise CheckpointError(f"{path}: {summarize_keys(odd or arrays, 3)} keys are not LoRA factors of one known "
                              "format (kohya lora_unet_*.lora_down.weight, diffusers unet.*.lora_A.weight, ours "
                              "*.lora_down.weight) -- base weights go first in --weight")
    return arrays, metadata, fmt


def read_lora(path: str | os.PathLike, engine: nn.Cell, into: Optional[LoRAConfig] = None,
              ) -> Tuple[LoRAConfig, Dict[str, np.ndarray], Dict[str, str], Dict[str, object]]:
    """Any LoRA file -> (config, arrays under our names, metadata, report) for ``engine``.

    The format is detected from the keys (``lora_formats.detect_format``). ``report``: the
    format and the counts of modules applied, zero-filled (in an adapted group, absent from the
    file) and without effect (on a text-encoder block SDXL never runs).
    """
    arrays, metadata, fmt = read_any_lora_file(path)
    if fmt == "gm" and VERSION_KEY in metadata:
        return lora_config_from_metadata(path, metadata), arrays, metadata, {"format": fmt, "applied": None}
    names = lora_names(engine)
    updates = parse_updates(path, arrays, metadata, names, fmt)
    config, ours, counts = config_and_arrays(path, updates, names, into=into)
    return config, ours, metadata, {"format": fmt, **counts}


def _looks_like_lora(key: str) -> bool:
    return key.startswith(("lora_unet_", "lora_te")) or ".lora_" in key


def load_lora(engine: nn.Cell, path: str | os.PathLike) -> Dict[str, str]:
    """Load a LoRA file of any format into ``engine`` (whose base weights are already loaded).

    Injects LoRA layers with the file's config when ``engine`` has none, or checks that the file
    fits its LoRA (same rank; modules inside its targets). Every key and shape is checked before
    anything changes (the engine is injected only once the file is known to fit). Logs how many
    modules the file applied. Returns the file's metadata.
    """
    current = lora_config_of(engine)
    if current is not None and is_merged(engine):
        raise CheckpointError(f"{path}: the model's LoRA is merged; unmerge_lora before loading another")
    config, arrays, metadata, report = read_lora(path, engine, into=current)
    not_lora = [k for k in arrays if not is_lora_parameter(k)]
    if not_lora:
        raise CheckpointError(f"{path}: {summarize_keys(not_lora)} keys are not LoRA factors -- a LoRA file "
                              "holds only *.lora_down.weight / *.lora_up.weight (base weights go first in --weight)")
    if current is not None and not current.same_weights_layout(config):
        raise CheckpointError(f"{path}: LoRA rank {config.rank} alpha {config.alpha:g} targets "
                              f"{_describe(config)} does not match the model's rank {current.rank} alpha "
                              f"{current.alpha:g} targets {_describe(current)}")
    if current is None:
        try:
            expected = expected_lora_shapes(plan_lora(engine, config), config.rank)
        except ConfigError as err:
            raise CheckpointError(f"{path}: cannot apply this LoRA to the model ({err})") from None
    else:
        expected = {name: tuple(p.shape) for name, p in lora_parameters(engine).items()}
    _check_keys(path, arrays, expected)
    if current is None:
        inject_lora(engine, config)
    set_lora_values(engine, arrays)
    applied = report["applied"] if report["applied"] is not None else len(arrays) // 2
    extra = "".join(f", {report[k]} {k.replace('_', ' ')}" for k in ("zero_filled", "no_effect") if report.get(k))
    _logger.info("loaded LoRA %s (%s format, rank %d, alpha %g): %d modules applied%s", path, report["format"],
                 config.rank, config.alpha, applied, extra)
    return metadata


def _describe(config: LoRAConfig) -> str:
    parts = list(config.unet_targets) + (["text_encoder"] if config.text_encoder else [])
    return "+".join(parts)


def _count(keys) -> str:
    return summarize_keys(keys, 3) if keys else "0"


def _check_keys(path, arrays: Mapping[str, np.ndarray], expected: Mapping[str, Tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: LoRA keys do not fit the model: missing {_count(missing)}, unexpected "
                              f"{_count(unexpected)} -- was it trained with another config?")
    wrong = [f"{k} file {tuple(np.shape(v))} vs model {expected[k]}" for k, v in arrays.items()
             if tuple(np.shape(v)) != expected[k]]
    if wrong:
        raise CheckpointError(f"{path}: {len(wrong)} LoRA tensors have the wrong shape (first: {'; '.join(wrong[:2])})"
                              " -- the rank in the metadata does not match the tensors, or another model size")
