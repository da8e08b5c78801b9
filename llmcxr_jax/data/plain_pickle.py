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


def _first_problem(obj: Any, leaves: frozenset[type] = _LEAVES) -> str | None:
    """What first makes `obj` more than a tree of dicts and lists over `leaves` (bool counts as foreign): a value
    of another type ('a float') or a list or dict that holds itself, which pickle can write and any reader would
    loop over forever; None if nothing does. A part shared by two branches is read once.

    Type sets are taken with `map(type, ...)`, which runs in C: a codes pickle holds ~10^8 ints.
    """
    if type(obj) not in _CONTAINERS:
        return None if type(obj) in leaves else f"a {type(obj).__name__}"
    entered, finished = set(), set()  # depth-first: a container met again while entered lies on its own path
    stack = [(obj, False)]
    while stack:
        item, leaving = stack.pop()
        if leaving:
            entered.discard(id(item))
            finished.add(id(item))
            continue
        if id(item) in entered:
            return f"a {type(item).__name__} that contains itself"
        if id(item) in finished:
            continue
        entered.add(id(item))
        stack.append((item, True))
        parts = (item.keys(), item.values()) if type(item) is dict else (item,)
        for part in parts:
            kinds = set(map(type, part))
            if foreign := kinds - leaves - _CONTAINERS:
                return f"a {next(iter(foreign)).__name__}"
            if kinds & _CONTAINERS:
                stack.extend((v, False) for v in part if type(v) in _CONTAINERS)
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
    if type(obj) not in _CONTAINERS:
        raise PlainPickleError(f"{path}: holds a {type(obj).__name__}; expected {what} built only from {PLAIN}")
    if problem := _first_problem(obj, _LEAVES | {type(None)} if allow_none else _LEAVES):
        raise PlainPickleError(f"{path}: holds {problem}; expected {what} built only from {PLAIN}")
    return obj
