"""Devices that need not exist, for ahead-of-time compilation (`--dry_run --topology`, bench/gpu_compile.py).

`h100:8` is 8 H100s on one host and `h100:2x8` two such hosts, compiled through the CUDA PJRT plugin without a
GPU or CUDA libraries (the `gpu-aot` extra); any other name is a TPU topology such as `v5p:2x2x2`, compiled
through libtpu (the `tpu` extra). XLA:GPU compiles for the device in assets/h100_target_config.txtpb; with no
device it does not autotune, so kernel tiles come from its heuristics. cuDNN's fused attention needs cuDNN and a
GPU to compile; `cudnn_shaped_attention` puts opaque kernels of its shapes in its place.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.compilation_cache import compilation_cache

from llmcxr_jax import model

H100_TARGET_CONFIG = Path(__file__).resolve().parent / "assets" / "h100_target_config.txtpb"
_GPU = re.compile(r"h100:(?:([1-9]\d*)x)?([1-9]\d*)")


def is_gpu_topology(topology: str) -> bool:
    return topology.lower().startswith("h100")


def topology_devices(topology: str) -> list[jax.Device]:
    """The devices of `topology` (see the module docstring), for a mesh to compile against.

    Turns JAX's persistent compilation cache off for this process: an executable compiled for devices that are
    not there cannot be loaded back from it (each later compile of the same program warned and compiled again).
    """
    from jax.experimental import topologies

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # whether the cache is used is decided once per process, at its first compile

    if is_gpu_topology(topology):
        match = _GPU.fullmatch(topology.lower())
        if not match:
            raise ValueError(f"--topology {topology}: GPU topologies are h100:N (one host, N GPUs) or h100:HxN "
                             "(H hosts of N GPUs)")
        hosts, per_host = int(match.group(1) or 1), int(match.group(2))
        try:
            return list(topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                                     target_config=H100_TARGET_CONFIG.read_text()).devices)
        except Exception as e:
            raise ValueError(f"--topology {topology}: cannot describe H100s without a GPU ({e}); install the "
                             "`gpu-aot` extra (jax-cuda13-plugin, the version of jaxlib)") from e
    # Compiling for absent chips needs no exclusive hold on a local TPU, and there are no TPU workers to find.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:
        raise ValueError(f"--topology {topology}: cannot describe this TPU topology ({e}); install the `tpu` "
                         "extra (libtpu) and use a name such as v5p:2x2x2") from e


# jaxlib's CUDA plugin registers this FFI target (jax.pure_callback's on GPUs): a call to it compiles without a
# GPU, as an opaque kernel of whatever operands and results it is given.
OPAQUE_KERNEL = "xla_ffi_python_gpu_callback"


def _opaque(results: tuple[jax.ShapeDtypeStruct, ...], *operands: jax.Array, index: int) -> tuple[jax.Array, ...]:
    return jax.ffi.ffi_call(OPAQUE_KERNEL, results)(*operands, index=np.uint64(index))


@jax.custom_vjp
def _cudnn_shaped(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return _cudnn_shaped_fwd(q, k, v)[0]


def _cudnn_shaped_fwd(q, k, v):
    batch, length, heads, _ = q.shape
    out, stats = _opaque((jax.ShapeDtypeStruct(q.shape, q.dtype),
                          jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)), q, k, v, index=0)
    out, stats = checkpoint_name((out, stats), model.FUSED_ATTENTION_NAME)
    return out, (q, k, v, out, stats)


def _cudnn_shaped_bwd(residuals, out_grad):
    q, k, v, out, stats = residuals
    return _opaque((jax.ShapeDtypeStruct(q.shape, q.dtype),) * 3, q, k, v, out, out_grad, stats, index=1)


_cudnn_shaped.defvjp(_cudnn_shaped_fwd, _cudnn_shaped_bwd)


@contextlib.contextmanager
def cudnn_shaped_attention() -> Iterator[None]:
    """Within: the model's attention is two opaque kernels with the operands and results of cuDNN's fused
    attention (forward: q, k, v -> output, softmax statistics; backward: those and the output's gradient -> dq,
    dk, dv), whose forward results the remat policies keep as they keep cuDNN's. The rest of a step compiled
    for H100s without a GPU is then what XLA builds around cuDNN's kernels (cuDNN's workspace not counted)."""
    attention = model._attention
    model._attention = lambda q, k, v, mask, impl: _cudnn_shaped(q, k, v)
    try:
        yield
    finally:
        model._attention = attention
