"""Lazy safetensors reading and streaming writing with bfloat16, without torch.

The `safetensors` package's numpy backend has no bfloat16 and its writer needs every tensor in memory at once;
converting a 2.8B model tensor by tensor needs neither limitation, so this reads the (simple, documented) format
directly: 8-byte little-endian header length, a JSON header, then raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read: the message names the file and the problem."""


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """Parse and validate the header; returns (tensor entries, offset where tensor data starts)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: file is truncated ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise SafetensorsError(f"{path}: file is truncated (header of {n} bytes, file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e}); not a safetensors file?") from None
    header.pop("__metadata__", None)
    for name, entry in header.items():
        if entry.get("dtype") not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
        end = entry["data_offsets"][1]
        if 8 + n + end > size:
            raise SafetensorsError(f"{path}: file is truncated: tensor {name!r} ends at byte {8 + n + end}, "
                                   f"the file has {size}")
    return header, 8 + n


class SafetensorsFile:
    """Random access to the tensors of one file, memory-mapped (nothing is read until a tensor is asked for)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header, self._start = read_header(self.path)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        buf = self._mmap[self._start + begin:self._start + end]
        return buf.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write_file(path: str | Path, entries: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
               metadata: dict[str, str] | None = None) -> None:
    """Write tensors one at a time: each entry is (name, shape, dtype, producer). Atomic via a temporary file."""
    entries = list(entries)
    header: dict[str, dict] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype, produce in entries:
            array = np.ascontiguousarray(produce(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} produced shape {array.shape}, header says {tuple(shape)}")
            f.write(array.tobytes())
    os.replace(tmp, path)
