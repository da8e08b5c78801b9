"""Shared pieces of the training-runtime tests: configs by file name, meshes on device subsets, param readout."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from llmcxr_jax import checkpoint, lm_task, parallel, train, trainer
from llmcxr_jax.data.synthetic import SyntheticBatches

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str, variant: str = "tiny"):
    return train.load_config(f"{name}:{variant}")


def mesh_of(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    n = int(np.prod(shape))
    return parallel.make_mesh(shape, devices=jax.devices()[:n])


def tiny_task(config, mesh, total_steps: int):
    return lm_task.build_task(config, mesh=mesh, rules=parallel.DEFAULT_RULES, total_steps=total_steps,
                              metadata={"stage": config.stage, "image_offset": config.model.vocab_size - 16})


def batches(config, fixed: bool = False, process_index: int = 0, process_count: int = 1) -> SyntheticBatches:
    return SyntheticBatches(global_batch_size=config.train.global_batch_size, seq_len=config.data.seq_len,
                            vocab_size=config.model.vocab_size, seed=config.seed, fixed=fixed,
                            process_index=process_index, process_count=process_count)


def run_steps(config, mesh, workdir, steps: int, fixed: bool = False, data=None):
    task = tiny_task(config, mesh, steps)
    loop = trainer.LoopConfig(total_steps=steps, log_every=0, checkpoint_every=config.train.checkpoint_every,
                              async_checkpoints=False, progress=False)
    state = trainer.train(task, loop, mesh=mesh, rules=parallel.DEFAULT_RULES, workdir=workdir,
                          train_iter=data if data is not None else batches(config, fixed))
    return task, state


def params_of(state) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(state["model"])
    return {"/".join(map(str, path)): np.asarray(jax.device_get(v.get_value())) for path, v in flat}


def saved_params(workdir) -> dict[str, np.ndarray]:
    """The model parameters of a workdir's latest checkpoint, whatever number of processes wrote it."""
    return params_of({"model": nnx.state(checkpoint.load_model(workdir))})
