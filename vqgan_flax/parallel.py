"""Data parallelism over the local devices for the CLIs: batch split on axis 0, parameters replicated."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vqgan_flax.model import VQGAN


class DataParallel:
    """`fn(model, batch)` compiled once for a fixed batch, sharded over `devices` (default: all local ones).

    `batch_size` is rounded up to a multiple of the device count; shorter batches are zero-padded and the
    padding is cut from the result, so every call reuses one compiled program.
    """

    def __init__(self, fn: Callable[[VQGAN, jax.Array], jax.Array], model: VQGAN, batch_size: int,
                 devices: Sequence[jax.Device] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        devices = list(devices or jax.local_devices())
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        mesh = Mesh(np.array(devices), ("data",))
        self._split = NamedSharding(mesh, PartitionSpec("data"))
        graphdef, state = nnx.split(model)
        self._state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        self._step = jax.jit(lambda s, x: fn(nnx.merge(graphdef, s), x), out_shardings=self._split)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"batch of {n} does not fit the compiled batch size {self.batch_size}")
        padded = np.concatenate([batch, np.zeros((self.batch_size - n, *batch.shape[1:]), batch.dtype)])
        return np.asarray(self._step(self._state, jax.device_put(padded, self._split)))[:n]
