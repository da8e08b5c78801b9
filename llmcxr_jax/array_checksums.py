"""Checksums of parameter and optimizer trees, computed where the arrays live, so that a restored checkpoint is
compared value for value with what was saved.

Orbax stores arrays as zstd frames without content checksums: a bit flipped on disk mostly decodes to another
number and restores without a word (NOTES.md). Each leaf's checksum is two 32-bit sums over its raw bits, each
bit pattern weighted by an odd function of its flat position, so any change of one element changes both sums
and a random change of many matches by chance about once in 2**64. Sums wrap modulo 2**32, so they are the
same whatever the order of the reduction: one jitted pass over sharded arrays on any mesh, any process count,
or NumPy for arrays already in host memory, with the same result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B1  # an odd multiplier that spreads consecutive positions over the 32 bits


def _weighted_sums(bits: Any, iota: Callable[[int], Any], xp: Any) -> tuple[Any, Any]:
    """The two sums of uint32 `bits` (NumPy or jax.numpy as `xp`; both wrap the same way, so both give the same
    values); `iota(axis)` gives positions along an axis, broadcastable to the array's shape."""
    position = xp.uint32(0)
    for axis, size in enumerate(bits.shape):  # the flat C-order position, modulo 2**32
        position = position * xp.uint32(size) + iota(axis)
    mixed = bits ^ (bits >> 15)  # a bijection of uint32: the second sum weighs other bits than the first
    first = xp.sum(bits * (2 * position + 1), dtype=xp.uint32)
    second = xp.sum(mixed * (position * xp.uint32(_GOLDEN) | 1), dtype=xp.uint32)
    return first, second


@jax.jit  # one program per leaf signature: a whole tree's program took ~10 ms per leaf to compile on a CPU
def _device_sums(x: jax.Array) -> jax.Array:
    """On the array's devices, in one pass, whatever its sharding."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    return jnp.stack(_weighted_sums(bits, lambda axis: jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis), jnp))


def _host_sums(x: np.ndarray) -> np.ndarray:
    """In NumPy, for arrays already in host memory: no program to compile (~60 ms per leaf signature on a CPU,
    seconds per run of the demo or of a test)."""
    bits = x.astype(np.uint32) if x.dtype == np.bool_ else x.view(f"uint{8 * x.dtype.itemsize}").astype(np.uint32)

    def iota(axis: int) -> np.ndarray:
        return np.arange(x.shape[axis], dtype=np.uint32).reshape([-1 if a == axis else 1 for a in range(x.ndim)])

    return np.stack(_weighted_sums(bits, iota, np))


def _sums(x: jax.Array | np.ndarray) -> np.ndarray:
    on_host = isinstance(x, np.ndarray) or (x.is_fully_addressable and {d.platform for d in x.devices()} == {"cpu"})
    if on_host:
        return _host_sums(np.asarray(x))
    return np.asarray(_device_sums(x).addressable_data(0))


def _paths_and_arrays(tree: Any) -> tuple[list[str], list[jax.Array]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    named = [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in flat
             if isinstance(leaf, (jax.Array, np.ndarray))]
    return [name for name, _ in named], [leaf for _, leaf in named]


def tree_checksums(tree: Any) -> dict[str, str]:
    """{leaf path: "dtype[shape]:16 hex digits"} for every array leaf of `tree` (global arrays of any sharding;
    every process gets the same dict)."""
    names, arrays = _paths_and_arrays(tree)
    sums = [_sums(x) for x in arrays]
    return {name: f"{_signature(x)}:{int(a):08x}{int(b):08x}" for name, x, (a, b) in zip(names, arrays, sums)}


def _signature(x: jax.Array) -> str:
    return f"{jnp.dtype(x.dtype).name}[{','.join(map(str, x.shape))}]"


def mismatches(tree: Any, recorded: dict[str, str]) -> list[str]:
    """The leaf paths of `tree` whose values differ from the checksums `recorded` at save time. Leaves the record
    lacks, or restored with another dtype or shape than saved (which changes the bits), cannot be checked and are
    not reported."""
    def signature(checksum: str) -> str:
        return checksum.rpartition(":")[0]

    return [name for name, checksum in tree_checksums(tree).items()
            if name in recorded and signature(recorded[name]) == signature(checksum) and recorded[name] != checksum]
