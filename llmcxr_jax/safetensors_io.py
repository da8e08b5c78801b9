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
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object; not a safetensors file?")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        _check_entry(path, name, entry)
        end = entry["data_offsets"][1]
        if 8 + n + end > size:
            raise SafetensorsError(f"{path}: file is truncated: tensor {name!r} ends at byte {8 + n + end}, "
                                   f"the file has {size}")
    return header, 8 + n


def _check_entry(path: Path, name: str, entry: object) -> None:
    """dtype known, shape a list of sizes, and data_offsets spanning exactly shape × itemsize bytes."""
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
        dtype = entry.get("dtype") if isinstance(entry, dict) else entry
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise SafetensorsError(f"{path}: tensor {name!r} has malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{path}: tensor {name!r} has malformed data_offsets {offsets!r}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[entry["dtype"]].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise SafetensorsError(f"{path}: tensor {name!r} of shape {shape} {entry['dtype']} needs {nbytes} bytes, "
                               f"its data_offsets span {offsets[1] - offsets[0]}")


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
