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
    "scalar": np.array(7, np.int32),
}


@pytest.mark.parametrize("name", ARRAYS)
def test_the_host_and_device_sums_agree(name):
    """A checkpoint saved from GPUs (the jitted sums) is checked on a CPU (NumPy's) and the other way round."""
    x = ARRAYS[name]
    np.testing.assert_array_equal(array_checksums._host_sums(x), np.asarray(array_checksums._device_sums(x)))


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
        assert array_checksums.mismatches({"x": changed.reshape(x.shape)}, recorded) == ["x"], index
    swapped = flat.copy()  # two unequal elements trading places: the same bits, other positions
    first, second = 0, int(np.flatnonzero(flat != flat[0])[0])
    swapped[first], swapped[second] = flat[second], flat[first]
    assert array_checksums.mismatches({"x": swapped.reshape(x.shape)}, recorded) == ["x"]


def test_leaves_of_another_dtype_or_shape_or_unrecorded_are_not_compared():
    """A restore that casts (fp32 saved, bf16 asked for) changes the bits without damage; a record from an older
    checkpoint may lack leaves."""
    x = ARRAYS["float32"]
    recorded = array_checksums.tree_checksums({"x": x})
    assert array_checksums.mismatches({"x": jnp.asarray(x, jnp.bfloat16)}, recorded) == []
    assert array_checksums.mismatches({"x": x.reshape(-1)}, recorded) == []
    assert array_checksums.mismatches({"y": x + 1}, recorded) == []
    assert array_checksums.mismatches({"x": x}, recorded) == []
