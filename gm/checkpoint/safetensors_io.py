"""Reading and writing the safetensors format without pickle and without a framework.

Our own reader (the format is an 8-byte header length, a JSON header and raw little-endian
data) because numpy has no bfloat16 and because a truncated or foreign file must give a
one-line error that names the file, not a Rust panic. Tensors are read one at a time with plain
reads (no mmap: pages of a memory-mapped file stay resident and count in the process's memory), so
a 7 GB checkpoint streamed through the merge tool or the loaders never sits in memory as a whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np

from gm.checkpoint.errors import CheckpointError
from gm.fs import atomic_path

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A read-only mapping ``name -> np.ndarray`` over one ``.safetensors`` file.

    bfloat16 tensors are returned as float32 (exact). Indexing reads that one tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
            header_len = int.from_bytes(head, "little")
            if header_len <= 1 or header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.path}: not a safetensors file (bad header length {header_len})")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{self.path}: not a safetensors file (header is not JSON: {err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        self.metadata: Dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries: Dict[str, Tuple[str, Tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for '{name}'") from None
            if dtype not in _DTYPES:
                raise CheckpointError(f"{self.path}: tensor '{name}' has unsupported dtype {dtype}")
            if end > data_size:
                raise CheckpointError(
                    f"{self.path}: file is truncated ({size} bytes; tensor '{name}' ends at "
                    f"{self._data_start + end}); download or copy it again")
            if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize:
                raise CheckpointError(f"{self.path}: tensor '{name}' size does not match its shape {shape}")
            self._entries[name] = (dtype, shape, begin, end)

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        raw = np.empty(shape, dtype=_DTYPES[dtype])
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(self._data_start + begin)
                if f.readinto(memoryview(raw.reshape(-1).view(np.uint8))) != end - begin:
                    raise CheckpointError(f"{self.path}: file shrank while reading tensor '{name}'")
        if dtype == "BF16":
            return (raw.reshape(-1).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> str:
        """The stored dtype name (``F32``, ``F16``, ``BF16``, ...)."""
        return self._entries[name][0]


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``tensors`` (numpy arrays) atomically: a crash mid-write never leaves a half file."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        # np.ascontiguousarray makes a 0-d array 1-d: keep scalars (kohya's .alpha) scalar
        save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata) if metadata else None)


class MergedSource(Mapping[str, np.ndarray]):
    """Several safetensors files (e.g. shards of one diffusers component) seen as one mapping."""

    def __init__(self, files: list[SafetensorsFile]):
        self._where: Dict[str, SafetensorsFile] = {}
        for f in files:
            for name in f:
                if name in self._where:
                    raise CheckpointError(f"{f.path}: key '{name}' also in {self._where[name].path}")
                self._where[name] = f

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._where[name].shape(name)


_DTYPE_NAMES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
                np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


def dtype_name(array: np.ndarray) -> str:
    """The safetensors dtype name of a numpy array (``F32``, ``I64``, ...)."""
    if array.dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"numpy dtype {array.dtype} has no safetensors equivalent")
    return _DTYPE_NAMES[array.dtype]


def to_bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def write_safetensors_streaming(path: str | os.PathLike, entries: Sequence[Tuple[str, str, Tuple[int, ...]]],
                                produce: Callable[[str], np.ndarray],
                                metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a safetensors file one tensor at a time: ``entries`` (name, dtype name, shape) fix the
    header, ``produce(name)`` returns each tensor's array (BF16 entries: float32 values, rounded
    here), so at most one tensor is in memory. Atomic (``gm.fs.publish``)."""
    path = Path(path)
    header: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        itemsize = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
        size = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dtype, shape in entries:
            value = np.asarray(produce(name))
            if tuple(value.shape) != tuple(shape):
                raise CheckpointError(f"{path}: tensor '{name}' has shape {value.shape}, the header says {shape}")
            data = to_bfloat16_bits(value) if dtype == "BF16" else np.ascontiguousarray(value, _DTYPES[dtype])
            f.write(data.tobytes())
