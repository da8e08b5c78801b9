"""A pickle reader that resolves only an explicit allowlist of globals, so loading a file never runs its code."""
from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np
from numpy._core import multiarray


class UnsafePickleError(ValueError):
    """The file references a class or function outside the allowlist (or is not a valid pickle)."""


class RestrictedUnpickler(pickle.Unpickler):
    """`find_class` admits only `allowed[(module, name)]`; everything else is refused with the file's name, or,
    with `stand_in`, resolved to `stand_in(module, name)` (an inert object of ours; the named one is never
    imported).

    Plain dicts, lists, tuples, strings and numbers need no globals, so `allowed={}` reads exactly those.
    """

    def __init__(self, file: IO[bytes], source: str, allowed: Mapping[tuple[str, str], Any], expected: str,
                 persistent_load: Callable[[Any], Any] | None = None,
                 stand_in: Callable[[str, str], Any] | None = None):
        super().__init__(file)
        self._source = source
        self._allowed = allowed
        self._expected = expected
        self._stand_in = stand_in
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if self._stand_in is not None:
            return self._stand_in(module, name)
        raise UnsafePickleError(f"{self._source}: refusing to unpickle {module}.{name}: "
                                f"this file may hold only {self._expected}")


def restricted_load(file: IO[bytes], source: str, allowed: Mapping[tuple[str, str], Any], expected: str,
                    persistent_load: Callable[[Any], Any] | None = None,
                    stand_in: Callable[[str, str], Any] | None = None) -> Any:
    """Unpickle with `RestrictedUnpickler`; malformed data also becomes an `UnsafePickleError` naming `source`."""
    try:
        return RestrictedUnpickler(file, source, allowed, expected, persistent_load, stand_in).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError, RecursionError) as err:  # the last three: a corrupted length or depth
        raise UnsafePickleError(f"{source}: not a readable pickle: {type(err).__name__}: {err}") from err


def _numeric_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dtype = np.dtype(spec, align=align, copy=copy)
    if dtype.kind not in "biuf":
        raise ValueError(f"numpy dtype {dtype} holds more than numbers")
    return dtype


def _numeric_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise ValueError(f"numpy scalar of {dtype!r} is not a plain number")
    return multiarray.scalar(dtype, data)


class _PlainArrayType:
    """What `numpy.ndarray` resolves to: a marker `_reconstruct` accepts, never the class (which a pickle could call)."""


def _plain_array(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if subtype is not _PlainArrayType:
        raise ValueError(f"array subclass {subtype!r}")
    return multiarray._reconstruct(np.ndarray, shape, dtype_code)


# numpy arrays and scalars of bool, int, uint or float dtypes (numpy 1's and 2's module names): a dtype that could
# hold objects is refused when it is built, so an array's state can only be raw bytes, never Python objects.
NUMERIC_NUMPY: Mapping[tuple[str, str], Any] = {
    ("numpy", "dtype"): _numeric_dtype,
    ("numpy", "ndarray"): _PlainArrayType,
    **{(module, "scalar"): _numeric_scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_reconstruct"): _plain_array for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
}
