"""Devices that need not exist, for ahead-of-time compilation (`--dry_run --topology`, bench/gpu_compile.py).

`h100:8` is 8 H100s on one host and `h100:2x8` two such hosts, compiled through the CUDA PJRT plugin without a
GPU or CUDA libraries (the `gpu-aot` extra); any other name is a TPU topology such as `v5p:2x2x2`, compiled
through libtpu (the `tpu` extra). XLA:GPU compiles for the device in assets/h100_target_config.txtpb; with no
device it does not autotune, so kernel tiles come from its heuristics.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import jax

H100_TARGET_CONFIG = Path(__file__).resolve().parent / "assets" / "h100_target_config.txtpb"
_GPU = re.compile(r"h100:(?:([1-9]\d*)x)?([1-9]\d*)")


def is_gpu_topology(topology: str) -> bool:
    return topology.lower().startswith("h100")


def topology_devices(topology: str) -> list[jax.Device]:
    """The devices of `topology` (see the module docstring), for a mesh to compile against."""
    from jax.experimental import topologies

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
