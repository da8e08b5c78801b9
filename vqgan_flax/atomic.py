"""Whole-file writes that readers never see half done: a temporary file beside the target, then a rename."""
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
