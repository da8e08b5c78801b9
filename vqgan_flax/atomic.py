"""Whole-file writes that readers never see half done (a temporary file beside the target, then a rename), and
the check of the output directory they go into."""
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


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """`path` as a Path, refused by `flag` and name when a file is in its place (mkdir would say only 'File
    exists', and later than the inputs' checks); creating it is the caller's, once the inputs are good."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {path} exists and is not a directory")
    existing = next(p for p in path.absolute().parents if p.exists())  # where mkdir -p would start
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {existing} is a file, so no directory can be made below it")
    return path
