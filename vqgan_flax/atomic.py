"""Whole-file writes that readers never see half done (a temporary file beside the target, then a rename), and
the output directories they go into."""
from __future__ import annotations

import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` through `path` + TMP_SUFFIX and `os.replace` (atomic on one filesystem)."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def make_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """`path` as a directory, created if missing; a file in its place is refused by `flag` and name (mkdir alone
    would say only 'File exists')."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path
