"""Writing weights: official-name ``.safetensors`` or MindSpore ``.ckpt``, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Tuple

import numpy as np

from gm.checkpoint.ckpt_io import write_ckpt_file
from gm.checkpoint.errors import CheckpointError
from gm.checkpoint.safetensors_io import dtype_name, save_safetensors, write_safetensors_streaming

_CASTS = {"keep": None, "fp32": np.float32, "fp16": np.float16, "bf16": np.float32}


def save_weights(named_arrays: Iterable[Tuple[str, np.ndarray]], path: str | os.PathLike, dtype: str = "keep",
                 metadata: Optional[Mapping[str, str]] = None,
                 ckpt_entries: Optional[Mapping[str, str]] = None) -> int:
    """Write ``(name, array)`` pairs to a ``.safetensors`` or ``.ckpt`` file; returns the tensor count.

    ``dtype``: ``keep``, ``fp32``, ``fp16`` or ``bf16`` (floating tensors only; bf16 rounds to
    nearest even). The file appears only when complete, so an interrupted write never leaves a half
    checkpoint behind. ``metadata`` goes into a safetensors header; ``ckpt_entries`` are extra
    string entries of a ``.ckpt`` (MindSpore's ``append_dict``).
    """
    path = Path(path)
    if path.suffix not in (".ckpt", ".safetensors"):
        raise CheckpointError(f"{path}: give a .ckpt or .safetensors file name")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give a file name ending in {path.suffix or '.safetensors'}")
    if dtype not in _CASTS:
        raise CheckpointError(f"dtype '{dtype}': expected one of {sorted(_CASTS)}")
    cast = _CASTS[dtype]
    tensors = {}
    for name, value in named_arrays:
        value = np.asarray(value)
        if cast is not None and np.issubdtype(value.dtype, np.floating):
            value = value.astype(cast)
        tensors[name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **dict(metadata or {})}
    if path.suffix == ".ckpt":
        write_ckpt_file(path, tensors, bf16=dtype == "bf16", append_dict=ckpt_entries)
    elif dtype == "bf16":
        entries = [(name, "BF16" if np.issubdtype(v.dtype, np.floating) else dtype_name(v), v.shape)
                   for name, v in tensors.items()]
        write_safetensors_streaming(path, entries, tensors.__getitem__, metadata=metadata)
    else:
        save_safetensors(path, tensors, metadata=metadata)
    return len(tensors)
