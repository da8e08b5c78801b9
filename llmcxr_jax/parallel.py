"""Mesh and logical-axis rules: sharding is data, so one model runs on 1 CPU, 8 fake CPUs, 8 GPUs or a pod.

Parameters carry logical axis names (`logical_axes` metadata); `DEFAULT_RULES` maps them to the mesh axes
`(data, fsdp, tensor)`. `embed → fsdp` shards every large weight over the fsdp axis (ZeRO-3); a mesh axis that
does not divide a dimension is dropped for that dimension rather than failing, as big_vision's fsdp rule does.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("layers", None),
    ("norm", None),
)

_ACTIVE_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("llmcxr_rules", default=DEFAULT_RULES)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one -1 entry takes the remaining devices. Axes are `Auto` (GSPMD propagation)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not fit {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, but {len(devices)} are available")
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=axis_types, devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh,
                    rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for one array. Unknown names are an error; mesh axes of size 1, reused or not dividing are dropped."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        for ax in axes:
            size = mesh.shape[ax]
            if ax in used or size == 1:
                continue
            if shape is not None and shape[dim] % (size * math.prod(mesh.shape[a] for a in kept)):
                continue
            kept.append(ax)
        used.update(kept)
        spec.append(kept[0] if len(kept) == 1 else (tuple(kept) if kept else None))
    return PartitionSpec(*spec)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for an nnx State (concrete or abstract), from each Variable's `logical_axes`."""

    def one(var: nnx.Variable) -> Any:
        value = var.get_value()
        axes = var.get_metadata().get("logical_axes")
        spec = PartitionSpec() if axes is None else logical_to_spec(axes, value.shape, mesh, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=_is_var)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place every array of `model` on `mesh` according to the rules (in place, returns the model)."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    state = jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings)
    nnx.update(model, state)
    return model


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """Make `rules` the ones `constrain` uses for activations inside this block."""
    token = _ACTIVE_RULES.set(rules)
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation from logical names; a no-op when no mesh is set (one device, tests)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, _ACTIVE_RULES.get())
    return jax.lax.with_sharding_constraint(x, spec)


def shard_count(logical_axis: str, size: int) -> int:
    """Into how many pieces the current mesh and rules split a dimension of `size` named `logical_axis`
    (1 without a mesh): what `constrain` would shard it over."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = logical_to_spec((logical_axis,), (size,), mesh, _ACTIVE_RULES.get())[0] or ()
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def abstract_arrays(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s arrays placed by `shardings` (a tree like it, or one sharding for all): what
    lowering a step and an Orbax restore take, with nothing allocated."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def total_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


AUTO = "auto"  # distributed.coordinator_address: let jax.distributed find the cluster itself


def detect_cluster() -> str | None:
    """Which multi-process launcher started this process, as its environment shows, if any.

    SLURM and Open MPI count with more than one task, a TPU host when TPU_WORKER_HOSTNAMES lists several workers
    (GKE). Cloud TPU VMs learn their peers from the metadata server, which only JAX's own detection reads: set
    `distributed.coordinator_address=auto` there (launch/tpu_pod.sh does).
    """
    import os

    if os.environ.get("SLURM_NTASKS", "1") != "1" and "SLURM_JOB_ID" in os.environ:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "TPU"
    return None


def initialize(cfg: Any) -> None:
    """Multi-host start-up: explicit settings; `auto`, JAX's own cluster detection; else the environment of a launcher
    that `detect_cluster` sees (SLURM, Open MPI, TPU on GKE); else nothing (one process).

    `cfg` has coordinator_address (an address, `auto` or ""), num_processes, process_id, local_device_ids ("0,1,…"
    or ""), timeout_s. On CPU, cross-process collectives go through gloo (the local multi-process launcher uses this).
    """
    address = str(cfg.coordinator_address)
    explicit = address not in ("", AUTO)
    if not explicit and (int(cfg.num_processes) > 0 or int(cfg.process_id) >= 0):  # else each host trains alone
        raise ValueError(f"distributed.num_processes={cfg.num_processes} and process_id={cfg.process_id} are read "
                         f"only with distributed.coordinator_address=HOST:PORT (it is {address!r}: the launcher's "
                         "environment or JAX's detection gives both); set the address, or leave both unset")
    if address == AUTO:
        where = "JAX's own cluster detection"
    elif explicit:
        where = address
    elif (cluster := detect_cluster()) is not None:
        where = f"the {cluster} environment"
    else:
        return
    if int(cfg.timeout_s) < 1:  # JAX would wait for the other processes forever
        raise ValueError(f"distributed.timeout_s={cfg.timeout_s} must be at least 1 (seconds)")
    if explicit and not 0 <= int(cfg.process_id) < int(cfg.num_processes):  # JAX: a traceback under our hint
        raise ValueError(f"distributed.process_id={cfg.process_id} must be in [0, num_processes="
                         f"{cfg.num_processes})")
    if jax.config.jax_platforms in ("cpu",) or str(jax.config.jax_platforms).startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"initialization_timeout": int(cfg.timeout_s)}
    if explicit:
        kwargs.update(coordinator_address=address, num_processes=int(cfg.num_processes),
                      process_id=int(cfg.process_id))
    if cfg.local_device_ids:
        kwargs["local_device_ids"] = [int(i) for i in str(cfg.local_device_ids).split(",")]
    hint = (f"multi-host start-up ({where}, timeout {cfg.timeout_s}s) failed: not every process arrived. Check that "
            "every process was started with the same coordinator address and process count, that process ids are "
            "unique, and that the coordinator port is reachable.")
    # JAX aborts the whole process (DEADLINE_EXCEEDED) when peers do not arrive, so say what to check first.
    print(f"[llmcxr_jax] joining {int(cfg.num_processes) if explicit else 'the'} processes via {where}; if this "
          f"aborts with DEADLINE_EXCEEDED: {hint}", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # errors that JAX raises instead of aborting
        if address == AUTO and isinstance(e, ValueError):  # no cluster found, so no coordinator address
            raise ValueError(f"distributed.coordinator_address=auto: JAX's cluster detection found no cluster to "
                             f"join ({e}); leave it empty for one process, or set coordinator_address, "
                             "num_processes and process_id") from None
        raise RuntimeError(f"{hint} ({e})") from e


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in `~/.cache/llmcxr_jax/xla`, which the train, sample and evaluate
    commands turn on: a rerun or a resumed run skips the 2.8B step's and the sampler's compiles."""
    import os

    directory = os.path.join(os.path.expanduser("~"), ".cache", "llmcxr_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", directory)
