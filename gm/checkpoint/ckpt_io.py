"""MindSpore ``.ckpt`` files (protobuf, not pickle) as numpy: one reader and one writer shared by
the weight loaders, the LoRA files and the tools."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Collection, Dict, Mapping, Optional, Tuple

import numpy as np

from gm.checkpoint.errors import CheckpointError
from gm.fs import atomic_path


def read_ckpt_file(path: str | os.PathLike, names: Optional[Collection[str]] = None
                   ) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """``(name -> array, name -> string)``: the tensors (bfloat16 as float32, exact) and the
    string entries ``save_checkpoint(append_dict=...)`` adds (e.g. a LoRA file's metadata);
    ``names``: only those entries (none of them there: two empty dicts)."""
    import mindspore as ms

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        entries = ms.load_checkpoint(str(path), choice_func=None if names is None else (lambda name: name in names))
    except ValueError as err:
        if names is not None and "empty after filter" in str(err):
            return {}, {}
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({_first_line(err)})") from None
    except Exception as err:  # MindSpore raises ValueError/RuntimeError with multi-line text
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({_first_line(err)})") from None
    arrays, strings = {}, {}
    for name, value in entries.items():
        if not hasattr(value, "asnumpy"):
            strings[name] = value
        elif value.dtype == ms.bfloat16:
            arrays[name] = value.float().asnumpy()
        else:
            arrays[name] = value.asnumpy()
    return arrays, strings


def _first_line(err: Exception) -> str:
    """MindSpore raises ValueError/RuntimeError with multi-line text."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def write_ckpt_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], bf16: bool = False,
                    append_dict: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` (float32 ones as bfloat16 with ``bf16``) atomically: a temporary file, then
    ``gm.fs.publish``, so an interrupted write never leaves a half checkpoint behind."""
    import mindspore as ms

    def tensor(value: np.ndarray) -> ms.Tensor:
        value = ms.Tensor(value)
        return value.astype(ms.bfloat16) if bf16 and value.dtype == ms.float32 else value

    with atomic_path(path, suffix=".tmp.ckpt") as tmp:  # save_checkpoint insists on the .ckpt suffix
        ms.save_checkpoint([{"name": k, "data": tensor(v)} for k, v in tensors.items()], str(tmp),
                           append_dict=dict(append_dict) if append_dict else None)
