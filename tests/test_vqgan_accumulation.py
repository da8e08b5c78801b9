"""VQ-GAN gradient accumulation (Lightning's accumulate_grad_batches) and its ahead-of-time compile for a TPU pod."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmcxr_jax import parallel, train_vqgan, trainer, vqgan_task
from train_helpers import assert_states_agree, flat_state, load_config, mesh_of, phantom_batch, vqgan_steps
from vqgan_flax import losses


def test_accumulated_micro_batches_without_a_gan_train_as_the_whole_batch():
    """L1 and the codebook loss are means, so two half-batches' mean gradient is the whole batch's: k = 2 follows
    k = 1 (the codes of both halves count for usage and dead codes)."""
    whole = load_config("vqgan", "tiny")
    whole.loss.update(disc_start=0, disc_factor=0.0)
    halves = load_config("vqgan", "tiny")
    halves.loss.update(disc_start=0, disc_factor=0.0)
    halves.train.micro_batches = 2
    (want, want_metrics), (got, got_metrics) = vqgan_steps(whole, 4), vqgan_steps(halves, 4)
    assert_states_agree(flat_state(want), flat_state(got), whole.optim.base_lr, 4)
    for a, b in zip(want_metrics, got_metrics):
        for key in ("loss", "l1_loss", "quant_loss", "grad_norm", "perplexity"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)
        assert (b["codes_used"], b["dead_codes"]) == (a["codes_used"], a["dead_codes"])


def test_accumulation_with_the_gan_follows_lightnings_order():
    """k = 2 with the GAN on, against Lightning 1.0.8's accumulate_grad_batches written out: per earlier
    micro-batch G's then D's gradients (D's running statistics move, no weight); on the last, G's gradients, the
    G step on the mean, D's gradients on the updated G, the D step on the mean."""
    config = load_config("vqgan", "tiny")
    config.loss.disc_start = 0
    config.train.micro_batches = 2
    got, got_metrics = vqgan_steps(config, 2)

    task = vqgan_task.build_task(config)
    mesh = mesh_of((1, 1, 1))
    graphdef, _, shardings = trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)
    with jax.set_mesh(mesh):
        state = nnx.merge(graphdef, task.initial_state(shardings))
    loss_cfg = vqgan_task.loss_config_from(config)
    images = jnp.asarray(phantom_batch()["images"])

    @nnx.jit
    def lightning_step(state, step):
        factor = losses.disc_factor(step, loss_cfg)
        rngs = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), step), 2)
        first, last = images[0::2], images[1::2]
        g_first, m_first, _ = losses.generator_grads(state.model, state.discriminator, None, first, factor,
                                                     loss_cfg, rngs[0])
        d_first, dm_first = losses.discriminator_grads(state.discriminator, first, state.model(first)[0], factor)
        g_last, m_last, _ = losses.generator_grads(state.model, state.discriminator, None, last, factor, loss_cfg,
                                                   rngs[1])
        state.gen_optimizer.update(state.model, jax.tree.map(lambda a, b: (a + b) / 2, g_first, g_last))
        d_last, dm_last = losses.discriminator_grads(state.discriminator, last, state.model(last)[0], factor)
        state.disc_optimizer.update(state.discriminator, jax.tree.map(lambda a, b: (a + b) / 2, d_first, d_last))
        return {key: (first_value + m_last[key]) / 2 for key, first_value in m_first.items()} | {
            key: (first_value + dm_last[key]) / 2 for key, first_value in dm_first.items()}

    want_metrics = [jax.tree.map(float, lightning_step(state, step)) for step in range(2)]
    want_state, got_state = flat_state(nnx.to_pure_dict(nnx.state(state))), flat_state(got)
    del want_state["['last_used']"], got_state["['last_used']"]  # code usage is ours, not Lightning's
    assert_states_agree(want_state, got_state, config.optim.base_lr, 2)
    for want, metrics in zip(want_metrics, got_metrics):  # means over the two micro-batches
        assert metrics["disc_factor"] == 1 and metrics["disc_loss"] > 0
        for key in ("loss", "l1_loss", "g_loss", "d_weight", "disc_loss", "logits_real", "logits_fake"):
            np.testing.assert_allclose(metrics[key], want[key], rtol=1e-4, err_msg=key)


def test_micro_batches_must_split_the_batch_over_the_mesh():
    config = load_config("vqgan", "tiny")
    for k, match in ((3, "not divisible by train.micro_batches=3"), (0, "must be at least 1")):
        config.train.micro_batches = k
        with pytest.raises(ValueError, match=match):
            train_vqgan.check_config(config, mesh_of((1, 1, 1)))
    config.train.micro_batches = 2  # 4 images per micro-batch over 8 shards
    with pytest.raises(ValueError, match="micro-batch of 4 does not divide over the 8 data×fsdp shards"):
        train_vqgan.check_config(config, mesh_of((1, 8, 1)))
    config.train.micro_batches, config.optim.base_lr = 1, -1.0  # would train to divergence and export that
    with pytest.raises(ValueError, match=r"optim.base_lr=-1.0 must be > 0"):
        train_vqgan.check_config(config, mesh_of((1, 1, 1)))
    config.optim.base_lr = 1e-4
    for key in ("eval_batches", "preview_images"):  # -1 evaluated all but the last batch, or stacked nothing
        config.data[key] = -1
        with pytest.raises(ValueError, match=rf"data.{key}=-1 must be >= 0"):
            train_vqgan.check_config(config, mesh_of((1, 1, 1)))
        config.data[key] = 0
    train_vqgan.check_config(config, mesh_of((1, 1, 1)))


def test_dry_run_compiles_accumulation_ahead_of_time_for_a_tpu_pod():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "llmcxr_jax.train_vqgan", "--config",
                          str(root / "configs/vqgan.py:tiny"), "--dry_run", "--topology", "v5p:2x2x2",
                          "--config.train.global_batch_size=16", "--config.train.micro_batches=2",
                          "--config.loss.disc_start=0"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dry run: one step of 16 images of 32² compiled for 8 tpu devices" in out.stdout
