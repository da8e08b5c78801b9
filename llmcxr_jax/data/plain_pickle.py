"""Read pickles that may hold only dicts, lists, str and int: the original's data files, opened without risk.

`vqgan_flax.safe_pickle` refuses every global (class, function), so nothing in the file is constructed or run;
this module then refuses the plain types that need no global but that our files never hold (float, tuple, set,
bytes, bool, None), so a file of the wrong kind fails loudly instead of being half-understood.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vqgan_flax.safe_pickle import UnsafePickleError, restricted_load

PLAIN = "dicts, lists, str and int"


class PlainPickleError(ValueError):
    """The pickle is unreadable or holds something other than dicts, lists, str and int."""


_LEAVES = frozenset((str, int))
_CONTAINERS = frozenset((dict, list))


def _first_foreign(obj: Any, leaves: frozenset[type] = _LEAVES) -> type | None:
    """The type of the first value that is not dict/list or one of `leaves` (bool counts as foreign), or None.

    Type sets are taken with `map(type, ...)`, which runs in C: a codes pickle holds ~10^8 ints.
    """
    stack = [obj]
    while stack:
        item = stack.pop()
        if type(item) not in _CONTAINERS:
            if type(item) not in leaves:
                return type(item)
            continue
        parts = (item.keys(), item.values()) if type(item) is dict else (item,)
        for part in parts:
            kinds = set(map(type, part))
            foreign = kinds - leaves - _CONTAINERS
            if foreign:
                return next(iter(foreign))
            if kinds & _CONTAINERS:
                stack.extend(v for v in part if type(v) in _CONTAINERS)
    return None


def load_plain_pickle(path: str | Path, what: str, allow_none: bool = False) -> dict | list:
    """The dict or list in `path`; `what` says what the file should hold, for the error message. `allow_none`
    also admits None values (results files mark what was not generated with them)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            obj = restricted_load(f, str(path), {}, f"{what} ({PLAIN} only)")
    except OSError as err:
        raise PlainPickleError(f"{path}: cannot open: {err}") from err
    except UnsafePickleError as err:
        raise PlainPickleError(f"{err}. Convert it to plain Python {PLAIN} in an environment you trust "
                               "(see llmcxr_jax/data/mimic_files.py, CONVERT_SELECTION).") from err
    foreign = _first_foreign(obj, _LEAVES | {type(None)} if allow_none else _LEAVES)
    if type(obj) not in (dict, list) or foreign is not None:
        found = type(obj).__name__ if type(obj) not in (dict, list) else foreign.__name__
        raise PlainPickleError(f"{path}: holds a {found}; expected {what} built only from {PLAIN}")
    return obj
