"""VQ-GAN training on the shared loop: learning, the GAN switch, exact resume, mesh independence, export, fine-tune."""
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

import vqgan_flax
from llmcxr_jax import parallel, train_vqgan, trainer, vqgan_task
from llmcxr_jax.checkpoint import TrainCheckpoints
from train_helpers import (assert_states_agree, flat_state, load_config, mesh_of, phantom_batch, tensorboard,
                           vqgan_steps)
from vqgan_flax import checkpoint as vq_checkpoint
from vqgan_flax import losses

STEPS = 6  # tiny config: disc_start 4, so the GAN is on for the last two steps


def tiny(**train):
    config = load_config("vqgan", "tiny")
    config.train.update(num_steps=STEPS, **train)
    return config


def saved_state(config, workdir, step: int = STEPS) -> dict[str, np.ndarray]:
    """Every array of the training state as checkpointed at `step` (params, BN statistics, both Adam states ...)."""
    mesh = mesh_of((1, 1, 1))
    _, abstract, _ = trainer.state_shardings(vqgan_task.build_task(config), mesh, parallel.DEFAULT_RULES)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(abstract))
    ckpts = TrainCheckpoints(workdir, read_only=True)
    pure, _, _ = ckpts.restore(step, target)
    ckpts.close()
    return flat_state(pure)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The CLI's run: 6 steps on all 8 fake devices (mesh (1, -1, 1)), with evaluation and pictures every 3."""
    workdir = tmp_path_factory.mktemp("straight")
    config = tiny(eval_every=3, image_every=3)
    fingerprint = train_vqgan.run(config, str(workdir))
    return config, workdir, fingerprint


def test_loss_falls_and_the_discriminator_switches_on_at_disc_start():
    config = load_config("vqgan", "tiny")
    config.loss.disc_start = 16
    mesh = mesh_of((1, 1, 1))
    task = vqgan_task.build_task(config)
    graphdef, _, shardings = trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)
    batch_sh = trainer.batch_shardings(task, mesh, parallel.DEFAULT_RULES)
    batch = phantom_batch()
    with jax.set_mesh(mesh):
        state = task.initial_state(shardings)
        step = trainer.compile_train_step(task, graphdef, shardings, batch_sh)
        history = []
        for _ in range(24):
            disc_before = {k: np.array(v.get_value()) for k, v in nnx.to_flat_state(state["discriminator"])}
            state, metrics = step(state, trainer.to_global(batch, batch_sh))
            disc_after = {k: np.array(v.get_value()) for k, v in nnx.to_flat_state(state["discriminator"])}
            moved = {"/".join(map(str, k)) for k in disc_before if not np.array_equal(disc_before[k], disc_after[k])}
            history.append(({k: float(v) for k, v in metrics.items()}, moved))
    l1 = [m["l1_loss"] for m, _ in history]
    assert np.mean(l1[-5:]) < 0.6 * np.mean(l1[:3]), l1
    stats = {f"norms/{i}/{s}" for i in range(3) for s in ("mean", "var")}
    for i, (m, moved) in enumerate(history):
        if i < 16:  # taming runs D in train mode throughout: statistics move, weights do not, no GAN term
            assert m["disc_factor"] == 0 and m["disc_loss"] == 0 and m["disc_grad_norm"] == 0, (i, m)
            assert moved == stats, (i, moved)
        else:
            assert m["disc_factor"] == 1 and m["disc_loss"] > 0 and m["disc_grad_norm"] > 0, (i, m)
            assert stats < moved and any(k.startswith("convs/") for k in moved), (i, moved)
        assert m["g_loss"] != 0 and m["d_weight"] > 0  # computed (as taming logs it) even while switched off
        assert 0 < m["codes_used"] <= 64 and 1 <= m["perplexity"] <= m["codes_used"] + 1e-3
        # dead = unused for dead_code_steps (4) steps: none before step 4, never one chosen in this step
        assert (m["dead_codes"] == 0) if i < 3 else (0 <= m["dead_codes"] <= 64 - m["codes_used"]), (i, m)
    assert history[-1][0]["dead_codes"] > 0  # the tiny codebook collapses onto a few codes, as taming's does


def test_without_a_gan_the_generator_trains_as_with_the_gan_switched_off():
    """disc_factor 0 skips D: the generator and its Adam state follow the run whose GAN is merely not started
    (taming's path, D run with zero weight), and D's weights stay as initialised."""
    off = load_config("vqgan", "tiny")
    off.loss.disc_start = 100
    none = load_config("vqgan", "tiny")
    none.loss.update(disc_start=0, disc_factor=0.0)
    (off_state, off_metrics), (none_state, none_metrics) = vqgan_steps(off, 5), vqgan_steps(none, 5)
    for state in (off_state, none_state):  # D's running statistics move only where D runs
        for norm in state["discriminator"]["norms"].values():
            del norm["mean"], norm["var"]
    for name in ("model", "gen_optimizer", "discriminator"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), off_state[name],
                     none_state[name])
    for a, b in zip(off_metrics, none_metrics):
        for key in ("loss", "l1_loss", "quant_loss", "grad_norm", "codes_used"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
        assert b["g_loss"] == 0 and b["d_weight"] == 0 and "disc_loss" not in b and a["g_loss"] != 0


def test_dead_codes_restart_onto_batch_latents_when_enabled():
    """With restarts, every code found dead moves onto one of the step's encoder outputs and counts as used."""
    used = {}
    for restart in (False, True):
        config = load_config("vqgan", "tiny")
        config.loss.disc_start = 100
        config.train.update(dead_code_steps=3, restart_dead_codes=restart)
        mesh = mesh_of((1, 1, 1))
        task = vqgan_task.build_task(config)
        graphdef, _, shardings = trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)
        batch_sh = trainer.batch_shardings(task, mesh, parallel.DEFAULT_RULES)
        batch = phantom_batch()
        chosen, restarted_total = set(), 0

        @jax.jit
        def latents_and_codes(state, images):
            model = nnx.merge(graphdef, state).model
            latents = model.encode_latents(images).reshape(-1, 32)
            return latents, model.quantize.indices(latents)

        with jax.set_mesh(mesh):
            state = task.initial_state(shardings)
            step = trainer.compile_train_step(task, graphdef, shardings, batch_sh)
            for i in range(10):
                before = np.asarray(state["model"]["quantize"]["embedding"].get_value())
                state, metrics = step(state, trainer.to_global(batch, batch_sh))
                latents, codes = map(np.asarray, latents_and_codes(state, jnp.asarray(batch["images"])))
                chosen |= set(codes.tolist())
                after = np.asarray(state["model"]["quantize"]["embedding"].get_value())
                last_used = np.asarray(state["last_used"].get_value())
                if restart and metrics["dead_codes"] > 0:
                    moved = np.flatnonzero(np.any(before != after, axis=1) & (last_used == i + 1))
                    assert len(moved) >= int(metrics["dead_codes"]), (i, moved, metrics["dead_codes"])
                    distance = np.min(np.linalg.norm(after[moved][:, None] - latents[None], axis=-1), axis=1)
                    restarted = moved[distance < 1e-5]
                    assert len(restarted) == int(metrics["dead_codes"]), (i, len(restarted), metrics["dead_codes"])
                    restarted_total += len(restarted)
        assert (restarted_total > 0) == restart, restarted_total
        used[restart] = len(chosen)
    assert used[True] > used[False], used  # restarted codes win nearest-neighbour contests again


def test_cli_run_logs_pictures_and_evaluation_and_exports(straight):
    config, workdir, fingerprint = straight
    scalars, images = tensorboard(workdir)
    assert images == ["train/reconstructions", "train/reconstructions"]  # steps 3 and 6
    assert len(scalars["eval/l1_loss"]) == 2 and len(scalars["train/psnr"]) == 3  # log_every 2
    assert all(np.isfinite(v) for values in scalars.values() for v in values)
    assert scalars["train/disc_factor"] == [0.0, 0.0, 1.0]  # window means: steps 1-2, 3-4, 5-6 (disc_start 4)
    model = vqgan_flax.load(workdir / "export")
    assert vq_checkpoint.read_fingerprint(workdir / "export") == fingerprint
    state = saved_state(config, workdir)
    for name, value in vq_checkpoint.params_of(model).items():
        key = "['model']" + "".join(f"['{p}']" if not p.isdigit() else f"[{p}]" for p in name.split("."))
        np.testing.assert_array_equal(value, state[key], err_msg=name)
    codes = model.encode(jnp.zeros((1, 32, 32, 3)))
    assert codes.shape == (1, 16, 16)


def test_resume_is_exact(straight, tmp_path, capsys):
    config, reference, _ = straight  # evaluation and pictures there do not touch the state
    halves = tiny(eval_every=1)  # nor here, where 4 evaluation images make no batch of 8: said, then skipped
    halves.train.num_steps = STEPS // 2
    halves.data.num_eval_images = 4
    train_vqgan.run(halves, str(tmp_path))
    out = capsys.readouterr().out
    assert "the 4 evaluation images are fewer than one batch of 8; training without evaluation" in out, out
    assert "[eval]" not in out
    train_vqgan.run(tiny(), str(tmp_path))  # resumes from step 3
    want, got = saved_state(config, reference), saved_state(config, tmp_path)
    assert sorted(got) == sorted(want)
    assert any("disc_optimizer" in k for k in want) and any("norms" in k and "mean" in k for k in want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_eight_devices_agree_with_one(straight, tmp_path):
    config, eight, _ = straight
    train_vqgan.run(tiny(), str(tmp_path), mesh=mesh_of((1, 1, 1)))
    want, got = saved_state(config, tmp_path), saved_state(config, eight)
    assert_states_agree(want, got, config.optim.base_lr, STEPS)
    moved = [k for k in want if k.endswith("['mean']") and float(np.abs(want[k]).max()) > 0]
    assert len(moved) == 3  # the BatchNorm running means moved, and moved alike on both meshes


def test_export_and_fine_tuning_start_from_it(straight, tmp_path, monkeypatch):
    config, workdir, fingerprint = straight
    with monkeypatch.context() as patch:  # killed while writing the loss tensors: the export must not look done
        patch.setattr(losses, "write_loss_tensors", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            vqgan_task.export_workdir(workdir, tmp_path / "again")
    assert not (tmp_path / "again" / "meta.json").exists()
    assert vqgan_task.export_workdir(workdir, tmp_path / "again") == fingerprint
    tensors = losses.read_loss_tensors(workdir / "export")
    assert sorted(k.split(".")[3] for k in tensors if k.endswith("running_mean")) == ["3", "6", "9"]
    state = saved_state(config, workdir)
    fine = tiny()
    fine.init.vqgan_dir = str(workdir / "export")
    mesh = mesh_of((1, 8, 1))
    task = vqgan_task.build_task(fine)
    start = task.initial_state(trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)[2])
    flat = flat_state(nnx.to_pure_dict(start))
    for key, value in state.items():
        if key.startswith(("['model']", "['discriminator']")):
            np.testing.assert_array_equal(flat[key], value, err_msg=key)  # weights and running statistics
        elif "optimizer" in key or "last_used" in key:
            assert not flat[key].any(), key  # a fresh optimizer and usage count


def test_default_config_is_llmcxr_f16_with_taming_loss_settings():
    config = load_config("vqgan", "")
    mesh = mesh_of((1, 8, 1))
    task = vqgan_task.build_task(config)
    _, abstract, shardings = trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert count(nnx.to_pure_dict(abstract)["model"]) == 72_141_699  # SPEC §11
    assert count(nnx.to_pure_dict(abstract)["lpips"]) == 14_714_688 + 1_472  # VGG16 convs + heads
    assert vqgan_task.learning_rate(config) == pytest.approx(4.5e-6 * 16)
    loss = vqgan_task.loss_config_from(config)
    assert (loss.disc_start, loss.disc_weight, loss.codebook_weight, loss.perceptual_weight, loss.disc_factor) == (
        10000, 0.8, 1.0, 1.0, 1.0)
    with pytest.raises(losses.LossWeightsError, match="perceptual_weight=0"):
        task.initial_state(shardings)  # no LPIPS weights configured


def test_fine_tuning_starts_from_a_converted_taming_checkpoint(tmp_path):
    import torch
    from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

    from test_vqgan_model import state_dict, taming_modules, write_reference
    from vqgan_flax import convert

    config = tiny()
    vq_cfg = vqgan_task.vqgan_config_from(config)
    torch.manual_seed(3)
    disc = NLayerDiscriminator(input_nc=3, ndf=config.loss.disc_ndf, n_layers=3).apply(weights_init)
    for m in disc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
    state = state_dict(taming_modules(vq_cfg))
    state.update({losses.DISCRIMINATOR_PREFIX + k: v for k, v in disc.state_dict().items()})
    convert.convert(*write_reference(tmp_path, vq_cfg, state), tmp_path / "vq")
    config.init.vqgan_dir = str(tmp_path / "vq")
    mesh = mesh_of((1, 1, 1))
    task = vqgan_task.build_task(config)
    graphdef, _, shardings = trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)
    start = nnx.merge(graphdef, task.initial_state(shardings))
    generator = convert.to_flax({k: v.numpy() for k, v in state.items() if not k.startswith("loss.")})
    for name, value in vq_checkpoint.params_of(start.model).items():
        np.testing.assert_array_equal(value, generator[name], err_msg=name)
    back = losses.to_taming_tensors(start.discriminator, None)
    for key, value in disc.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[losses.DISCRIMINATOR_PREFIX + key], value.numpy(), err_msg=key)


def test_dry_run_compiles_one_step_and_reports_memory():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "llmcxr_jax.train_vqgan", "--config",
                          str(root / "configs/vqgan.py:tiny"), "--dry_run"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dry run: one step of 8 images of 32² compiled for 8 cpu devices" in out.stdout
    assert "per device       arguments" in out.stdout
