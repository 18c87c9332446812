"""Writing weights: official-name ``.safetensors`` or MindSpore ``.ckpt``, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Tuple

import numpy as np

from gm.checkpoint.errors import CheckpointError
from gm.checkpoint.safetensors_io import save_safetensors

_CASTS = {"keep": None, "fp32": np.float32, "fp16": np.float16}


def save_weights(named_arrays: Iterable[Tuple[str, np.ndarray]], path: str | os.PathLike, dtype: str = "keep",
                 metadata: Optional[Mapping[str, str]] = None) -> int:
    """Write ``(name, array)`` pairs to a ``.safetensors`` or ``.ckpt`` file; returns the tensor count.

    ``dtype``: ``keep``, ``fp32`` or ``fp16`` (floating tensors only). The file appears only when
    complete, so an interrupted write never leaves a half checkpoint behind.
    """
    path = Path(path)
    if path.suffix not in (".ckpt", ".safetensors"):
        raise CheckpointError(f"{path}: give a .ckpt or .safetensors file name")
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
    if path.suffix == ".ckpt":
        _save_ckpt(path, tensors)
    else:
        save_safetensors(path, tensors, metadata={"format": "pt", **dict(metadata or {})})
    return len(tensors)


def _save_ckpt(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    import mindspore as ms

    tmp = path.with_name(path.name + ".tmp.ckpt")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in tensors.items()], str(tmp))
    os.replace(tmp, path)
