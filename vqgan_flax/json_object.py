"""Reading one JSON object from a file, with errors that name the file (every metadata reader's first step), and
the check its sizes need."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def positive_int(value: Any) -> bool:
    """An int (numpy's too, not a bool) of at least 1: what a size read from a JSON file must be."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def read_json_object(path: Path, error: type[Exception], missing_ok: bool = False) -> dict[str, Any]:
    """The object in `path` ({} for a missing file when `missing_ok`); else `error` naming the file and why."""
    path = Path(path)
    if missing_ok and not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
