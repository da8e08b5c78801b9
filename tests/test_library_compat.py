"""Library behaviours this project relies on; an upgrade that changes one of them fails here first, loudly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llmcxr_jax import parallel


class _Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 16)), logical_axes=("embed", "mlp"))


def test_custom_variable_metadata_survives_split_and_eval_shape():
    """We keep logical names in our own `logical_axes` metadata, so flax's eager sharding never triggers."""
    abstract = nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    var = state["w"]
    assert var.get_metadata()["logical_axes"] == ("embed", "mlp")
    assert isinstance(var.get_value(), jax.ShapeDtypeStruct)
    model = _Tiny(nnx.Rngs(0))  # no mesh: builds and runs on one device
    assert model.w[...].shape == (8, 16)


def test_make_mesh_auto_axes_propagate_sharded_contractions():
    """With Auto axes a matmul over a sharded contracting dimension needs no out_sharding (GSPMD propagation)."""
    mesh = parallel.make_mesh((1, 8, 1))
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    x = jax.device_put(jnp.ones((4, 16)), NamedSharding(mesh, P(None, "fsdp")))
    w = jax.device_put(jnp.ones((16, 8)), NamedSharding(mesh, P("fsdp", None)))
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a, b: a @ b)(x, w)
    np.testing.assert_allclose(np.asarray(y), 16.0)


def test_orbax_round_trip_restores_onto_requested_sharding(tmp_path):
    mesh = parallel.make_mesh((1, 8, 1))
    tree = {"a": {"b": jnp.arange(32.0).reshape(8, 4)}, "c": jnp.ones((3,), jnp.bfloat16)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", tree)
        ckptr.wait_until_finished()
        target = {"a": {"b": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))},
                  "c": jax.ShapeDtypeStruct((3,), jnp.bfloat16, sharding=NamedSharding(mesh, P()))}
        restored = ckptr.restore(tmp_path / "ckpt", target)
    np.testing.assert_array_equal(np.asarray(restored["a"]["b"]), np.asarray(tree["a"]["b"]))
    assert restored["a"]["b"].sharding.spec == P("fsdp")
    assert restored["c"].dtype == jnp.bfloat16


def test_nnx_optimizer_needs_wrt_and_updates_in_place():
    model = _Tiny(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    before = np.asarray(model.w[...])
    grads = nnx.grad(lambda m: jnp.sum(m.w[...]))(model)
    opt.update(model, grads)
    np.testing.assert_allclose(np.asarray(model.w[...]), before - 0.5)
