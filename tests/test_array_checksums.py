"""Array checksums: the same on the device and host paths and on any sharding; any one changed element shows."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llmcxr_jax import array_checksums

ARRAYS = {
    "float32": np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32),
    "bfloat16": np.random.default_rng(1).standard_normal((8, 16)).astype(ml_dtypes.bfloat16),
    "int32": np.arange(-20, 20, dtype=np.int32).reshape(5, 8),
    "uint8": np.arange(64, dtype=np.uint8),
    "bool": np.random.default_rng(2).random((3, 8)) < 0.5,
    "float64": np.arange(1.0, 25.0).reshape(4, 6),  # host leaves only (JAX keeps 32 bits): both halves hashed
    "scalar": np.array(7, np.int32),
}


@pytest.mark.parametrize("name", ARRAYS)
def test_the_host_and_device_sums_agree(name):
    """A checkpoint saved from GPUs (the jitted sums) is checked on a CPU (NumPy's) and the other way round."""
    x = ARRAYS[name]
    device = x.view(np.uint32).reshape(*x.shape, 2) if x.dtype == np.float64 else x  # as its two words
    np.testing.assert_array_equal(array_checksums._host_sums(x), np.asarray(array_checksums._device_sums(device)))


def test_a_sharded_array_has_the_checksum_of_the_whole():
    """The jitted sums reduce each device's shard and then across devices (as on GPUs and multi-host runs)."""
    mesh = jax.make_mesh((2, 4), ("a", "b"), devices=jax.devices()[:8])
    x = ARRAYS["float32"]
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("a", None, "b")))
    assert not sharded.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(array_checksums._device_sums(sharded)), array_checksums._host_sums(x))
    assert array_checksums.tree_checksums({"x": sharded}) == array_checksums.tree_checksums({"x": x})


@pytest.mark.parametrize("name", [n for n in ARRAYS if n != "scalar"])
def test_any_one_changed_element_changes_the_checksum(name):
    x = ARRAYS[name]
    recorded = array_checksums.tree_checksums({"x": x})
    flat = x.reshape(-1)
    for index in (0, flat.size // 2, flat.size - 1):
        changed = flat.copy()
        changed[index] = not changed[index] if x.dtype == np.bool_ else changed[index] + 1
        assert array_checksums.compare({"x": changed.reshape(x.shape)}, recorded) == (["x"], []), index
    swapped = flat.copy()  # two unequal elements trading places: the same bits, other positions
    first, second = 0, int(np.flatnonzero(flat != flat[0])[0])
    swapped[first], swapped[second] = flat[second], flat[first]
    assert array_checksums.compare({"x": swapped.reshape(x.shape)}, recorded) == (["x"], [])


def _structured_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """(before, after) pairs that a sum of the bits weighted by position (the first version) could not tell apart:
    two fp32 elements 2**16 apart with opposite signs and the same bit 16, both negated; the top exponent bit of
    two bf16 elements 2**18 apart, one set and one cleared (-0.14 became -4.7e37 in a reviewer's run)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1 << 17).astype(np.float32)
    b = x.view(np.uint32)
    i = next(i for i in range(1 << 16)
             if b[i] >> 31 != b[i + (1 << 16)] >> 31 and (b[i] >> 16) & 1 == (b[i + (1 << 16)] >> 16) & 1)
    y = x.copy()
    y[[i, i + (1 << 16)]] *= -1
    h = rng.standard_normal(1 << 19).astype(ml_dtypes.bfloat16)
    hb = h.view(np.uint16)
    j = next(j for j in range(1 << 18) if (hb[j] >> 14) & 1 == 0 and (hb[j + (1 << 18)] >> 14) & 1 == 1)
    changed = hb.copy()
    changed[[j, j + (1 << 18)]] ^= 1 << 14
    return [(x, y), (h, changed.view(ml_dtypes.bfloat16))]


@pytest.mark.parametrize("pair", range(2), ids=["fp32 signs", "bf16 exponents"])
def test_structured_changes_change_both_sums(pair):
    before, after = _structured_pairs()[pair]
    assert (array_checksums._host_sums(before) != array_checksums._host_sums(after)).all()


def test_leaves_of_another_dtype_or_shape_or_unrecorded_are_reported_as_unchecked():
    """A restore that casts (fp32 saved, bf16 asked for) changes the bits without damage; a record from an older
    checkpoint may lack leaves."""
    x = ARRAYS["float32"]
    recorded = array_checksums.tree_checksums({"x": x})
    assert array_checksums.compare({"x": jnp.asarray(x, jnp.bfloat16)}, recorded) == ([], ["x"])
    assert array_checksums.compare({"x": x.reshape(-1)}, recorded) == ([], ["x"])
    assert array_checksums.compare({"y": x + 1}, recorded) == ([], ["y"])
    assert array_checksums.compare({"x": x}, recorded) == ([], [])


def test_large_host_arrays_and_prng_keys_take_the_device_path_with_the_same_result(monkeypatch):
    """Above _HOST_WORDS NumPy's temporaries (~20 bytes a word) cost more than XLA's fused pass; typed PRNG keys
    are hashed through their key data."""
    x = ARRAYS["float32"]
    small = array_checksums.tree_checksums({"x": x})
    monkeypatch.setattr(array_checksums, "_HOST_WORDS", 10)
    assert array_checksums.tree_checksums({"x": x}) == small
    keys = jax.random.split(jax.random.key(0), 4)
    assert array_checksums.tree_checksums({"k": keys})["k"].split(":")[1] == (
        array_checksums.tree_checksums({"k": jax.random.key_data(keys)})["k"].split(":")[1])
