"""Checksums of parameter and optimizer trees, computed where the arrays live, so that a restored checkpoint is
compared value for value with what was saved.

Orbax stores arrays as zstd frames without content checksums: a bit flipped on disk mostly decodes to another
number and restores without a word (NOTES.md). Each leaf's checksum is two 32-bit sums, one per seed, of every
32-bit word of its raw bits hashed together with the word's flat position (murmur3's finalizer, a bijection of
the word at each position): any one changed word changes both sums, and other changes match by chance about once
in 2**64, structured ones included (a sum of the bits weighted by position missed sign flips of pairs). Sums wrap
modulo 2**32, so they are the same whatever the order of the reduction: one jitted pass over sharded arrays on
any mesh and process count, or NumPy for small arrays already in host memory, with the same result.
(`vqgan_flax.checkpoint.fingerprint` is a sha256 of host copies of a whole VQ-GAN; these sums stay on the
devices, per array, for sharded states that no one host holds.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_SEEDS = (0x9E3779B1, 0x85EBCA77)
# Below this many words NumPy is used for host arrays: no program to compile (~60 ms per leaf signature on a
# CPU, seconds per small demo run); above it XLA's fused pass is faster and needs no temporaries.
_HOST_WORDS = 1 << 20


def _fmix32(h: Any, xp: Any) -> Any:
    """murmur3's 32-bit finalizer: a bijection of uint32 that spreads every input bit over the output."""
    h = h ^ (h >> 16)
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _hashed_sums(words: Any, iota: Callable[[int], Any], xp: Any) -> list[Any]:
    """The two sums of uint32 `words` (NumPy or jax.numpy as `xp`; both wrap alike, so both give the same values);
    `iota(axis)` gives positions along an axis, broadcastable to the words' shape."""
    position = xp.uint32(0)
    for axis, size in enumerate(words.shape):  # the flat C-order position, modulo 2**32
        position = position * xp.uint32(size) + iota(axis)
    return [xp.sum(_fmix32(words ^ _fmix32(position + xp.uint32(seed), xp), xp), dtype=xp.uint32)
            for seed in _SEEDS]


def _words_shape(x: Any) -> tuple[int, ...]:
    """8-byte elements are hashed as two words (a trailing axis of 2), narrower ones as one, zero-extended."""
    return (*x.shape, 2) if x.dtype.itemsize == 8 else tuple(x.shape)


@jax.jit  # one program per leaf signature: a whole tree's program took ~10 ms per leaf to compile on a CPU
def _device_sums(x: jax.Array) -> jax.Array:
    """On the array's devices, in one pass, whatever its sharding."""
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 8:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
    shape = _words_shape(x)
    return jnp.stack(_hashed_sums(words, lambda axis: jax.lax.broadcasted_iota(jnp.uint32, shape, axis), jnp))


def _host_sums(x: np.ndarray) -> np.ndarray:
    """The same sums in NumPy."""
    flat = np.ascontiguousarray(x).reshape(-1)  # a 0-d array cannot change its itemsize by a view
    if x.dtype == np.bool_:
        words = flat.astype(np.uint32)
    elif x.dtype.itemsize == 8:
        words = flat.view(np.uint32)
    else:
        words = flat.view(f"uint{8 * x.dtype.itemsize}").astype(np.uint32)
    words = words.reshape(_words_shape(x))

    def iota(axis: int) -> np.ndarray:
        return np.arange(words.shape[axis], dtype=np.uint32).reshape(
            [-1 if a == axis else 1 for a in range(words.ndim)])

    with np.errstate(over="ignore"):  # wrapping is the point (NumPy warns only for scalars: 0-d leaves)
        return np.stack(_hashed_sums(words, iota, np))


def _sums(x: jax.Array | np.ndarray) -> np.ndarray:
    """The two sums of one leaf, on the host or on its devices."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    on_host = isinstance(x, np.ndarray) or (x.is_fully_addressable and {d.platform for d in x.devices()} == {"cpu"})
    if on_host and x.size * (2 if x.dtype.itemsize == 8 else 1) <= _HOST_WORDS:
        return _host_sums(np.asarray(x))
    # Waited for before the next leaf's: independent programs may run in any order, and two processes running
    # their cross-process reductions in different orders wait for each other forever (seen with gloo on CPUs).
    sums = _device_sums(x)
    if not sums.is_fully_replicated:  # a full reduction is replicated on every device; each process reads its own
        raise RuntimeError(f"array checksums came back with sharding {sums.sharding}, not replicated")
    return np.asarray(sums.addressable_data(0))


def _paths_and_arrays(tree: Any) -> tuple[list[str], list[jax.Array]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    named = [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in flat
             if isinstance(leaf, (jax.Array, np.ndarray))]
    return [name for name, _ in named], [leaf for _, leaf in named]


def tree_checksums(tree: Any) -> dict[str, str]:
    """{leaf path: "dtype[shape]:16 hex digits"} for every array leaf of `tree` (global arrays of any sharding;
    every process gets the same dict)."""
    names, arrays = _paths_and_arrays(tree)
    return {name: f"{_signature(x)}:{int(a):08x}{int(b):08x}" for name, x in zip(names, arrays)
            for a, b in [_sums(x)]}


def _signature(x: jax.Array | np.ndarray) -> str:
    return f"{x.dtype}[{','.join(map(str, x.shape))}]"


def compare(tree: Any, recorded: dict[str, str]) -> tuple[list[str], list[str]]:
    """(changed, unchecked): the leaf paths of `tree` whose values differ from the checksums `recorded` at save
    time, and those that cannot be compared: missing from the record, or restored in another dtype or shape than
    saved (which changes the bits)."""
    def signature(checksum: str) -> str:
        return checksum.rpartition(":")[0]

    changed, unchecked = [], []
    for name, checksum in tree_checksums(tree).items():
        if name not in recorded or signature(recorded[name]) != signature(checksum):
            unchecked.append(name)
        elif recorded[name] != checksum:
            changed.append(name)
    return changed, unchecked
