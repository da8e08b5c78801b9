"""Checksums of parameter and optimizer trees, computed where the arrays live, so that a restored checkpoint is
compared value for value with what was saved.

Orbax stores arrays as zstd frames without content checksums: a bit flipped on disk mostly decodes to another
number and restores without a word (NOTES.md). Each leaf's checksum is two 32-bit sums over its raw bits, each
bit pattern weighted by an odd function of its flat position, so any change of one element changes both sums
and a random change of many matches by chance about once in 2**64. Sums wrap modulo 2**32, so they are the
same whatever the order of the reduction: one jitted pass over sharded arrays on any mesh, any process count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B1  # an odd multiplier that spreads consecutive positions over the 32 bits


def _raw_bits(x: jax.Array) -> jax.Array:
    """x's bit patterns as uint32 (narrower types zero-extended)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_sums(x: jax.Array) -> jax.Array:
    bits = _raw_bits(x)
    position = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else jnp.uint32(0)
    for axis in range(1, x.ndim):  # the flat C-order position, modulo 2**32
        position = position * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    mixed = bits ^ (bits >> 15)  # a bijection of uint32: the second sum weighs other bits than the first
    first = jnp.sum(bits * (2 * position + 1), dtype=jnp.uint32)
    second = jnp.sum(mixed * (position * jnp.uint32(_GOLDEN) | 1), dtype=jnp.uint32)
    return jnp.stack([first, second])


_tree_sums = jax.jit(lambda leaves: [_leaf_sums(x) for x in leaves])


def _paths_and_arrays(tree: Any) -> tuple[list[str], list[jax.Array]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    named = [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in flat
             if isinstance(leaf, (jax.Array, np.ndarray))]
    return [name for name, _ in named], [leaf for _, leaf in named]


def tree_checksums(tree: Any) -> dict[str, str]:
    """{leaf path: "dtype[shape]:16 hex digits"} for every array leaf of `tree` (global arrays of any sharding;
    every process gets the same dict)."""
    names, arrays = _paths_and_arrays(tree)
    sums = [np.asarray(s.addressable_data(0)) for s in _tree_sums(arrays)]
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
