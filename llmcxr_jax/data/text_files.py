"""UTF-8 text files whose decoding errors name the file, line and byte offset.

A text-mode `open` decodes in chunks, so its UnicodeDecodeError carries an offset into a chunk and no file name;
decoding the whole file at once gives both. The input files are small enough (the largest, MIMIC's metadata CSV,
is some tens of MB) to hold in memory.
"""
from __future__ import annotations

import io
from pathlib import Path


class NotUtf8Error(ValueError):
    """A file that should be UTF-8 text is not (the message names the file, line and byte offset)."""


def open_utf8(path: Path, error: type[ValueError] = NotUtf8Error, *, newline: str | None = None) -> io.StringIO:
    """The file's text as a stream, like `open(path, encoding="utf-8", newline=newline)`; raises `error` (the
    caller's file error) naming the path, line and byte offset where it is not UTF-8."""
    return io.StringIO(decode_utf8(path.read_bytes(), path, error), newline=newline)


def decode_utf8(data: bytes, path: Path, error: type[ValueError] = NotUtf8Error) -> str:
    """`data` (the bytes of `path`, or their start) as text; else `error` naming the path, line and offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text: byte {data[err.start]:#04x} at offset {err.start} "
                    f"({err.reason}); save the file as UTF-8") from None
