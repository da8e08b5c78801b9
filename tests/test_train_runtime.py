"""The sharded training runtime: learning, mesh independence, ZeRO-3 memory, exact resume, stage seeding."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_reference import save_hf, tiny_hf_model
from llmcxr_jax import checkpoint, config_files, lm_task, optim, parallel, trainer
from train_helpers import (ROOT, batches, load_config, mesh_of, params_of, per_device_bytes, run_steps, tensorboard,
                           tiny_task)


def _eval_loss(task, state, batch, mesh):
    graphdef, _, shardings = trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)
    module = nnx.merge(graphdef, state)
    sums = lm_task.eval_step(module, {k: jnp.asarray(v) for k, v in batch.items()}, lm_task.LMStepConfig(
        image_offset=10**9))
    return float(sums["loss_sum"]) / float(sums["tokens"])


def test_tiny_config_overfits_a_fixed_batch(tmp_path):
    config = load_config("stage1")
    mesh = mesh_of((1, 8, 1))
    fixed = batches(config, fixed=True)
    batch = next(batches(config, fixed=True))
    task, state0 = run_steps(config, mesh, tmp_path / "a", 1, fixed=True)
    before = _eval_loss(task, state0, batch, mesh)
    task, state = run_steps(config, mesh, tmp_path / "b", 60, fixed=True, data=fixed)
    after = _eval_loss(task, state, batch, mesh)
    assert after < 0.1 * before, (before, after)


@pytest.mark.parametrize("loss_mode", ["global", "original"])
def test_two_steps_agree_across_meshes_and_micro_batching(tmp_path, loss_mode):
    config = load_config("stage1")
    config.train.loss_mode = loss_mode
    config.optim.lr = 1e-4
    results = {}
    for shape in [(1, 1, 1), (1, 8, 1), (2, 4, 1)]:
        results[shape] = params_of(run_steps(config, mesh_of(shape), tmp_path / str(shape), 2)[1])
    config.train.micro_batches = 2
    results["micro2"] = params_of(run_steps(config, mesh_of((2, 2, 1)), tmp_path / "micro", 2)[1])
    config.train.micro_batches = config.train.global_batch_size  # one sequence each: 'original' groups split
    results["micro_all"] = params_of(run_steps(config, mesh_of((1, 1, 1)), tmp_path / "micro_all", 2)[1])
    reference = results.pop((1, 1, 1))
    initial = params_of(jax.jit(lambda: nnx.state(tiny_task(config, mesh_of((1, 1, 1)), 2).create_state()))())
    assert any(np.abs(reference[k] - initial[k]).max() > 1e-4 for k in reference)  # the steps changed something
    # Adam divides by sqrt(v): where a gradient is ~0, reduction-order noise moves a weight by a visible fraction
    # of one lr step, so the tolerance is 3% of a step (lr 1e-4) rather than float epsilon.
    for name, params in results.items():
        for key in reference:
            np.testing.assert_allclose(params[key], reference[key], atol=3e-6, rtol=1e-5, err_msg=f"{name} {key}")


def test_loss_modes_normalise_as_documented():
    weights = jnp.asarray(np.array([[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0], [0, 0, 0, 1]], np.float32))
    per_seq = jnp.asarray([3.0, 2.0, 4.0, 1.0])  # summed token losses
    global_loss = (lm_task.sequence_scales(weights, "global", 2) * per_seq).sum()
    # Targets per row after the causal shift: 3, 2, 2, 1 → 8 in all; groups {0,1}: 5 tokens, {2,3}: 3 tokens.
    np.testing.assert_allclose(global_loss, 10.0 / 8.0, rtol=1e-6)
    original = (lm_task.sequence_scales(weights, "original", 2) * per_seq).sum()
    np.testing.assert_allclose(original, 0.5 * (5.0 / 5 + 5.0 / 3), rtol=1e-6)


def test_fsdp_shards_params_and_moments_to_an_eighth(tmp_path):
    config = load_config("stage1")
    config.model.update(hidden_size=256, intermediate_size=1024, vocab_size=512)  # realistic share of biases
    mesh = mesh_of((1, 8, 1))
    task = tiny_task(config, mesh, 1)
    _, _, shardings = trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)
    state = jax.jit(lambda: nnx.state(task.create_state()), out_shardings=shardings)()
    total = parallel.total_bytes(state)
    assert per_device_bytes(state) <= total / 8 * 1.05
    param = state["model"]["layers"]["qkv_kernel"].get_value()
    moments = [x for x in jax.tree.leaves(state["optimizer"]["opt_state"]) if x.shape == param.shape]
    assert len(moments) == 2  # Adam's mu and nu follow the stacked-layer parameter's sharding
    assert all(m.sharding.spec == param.sharding.spec for m in moments) and "fsdp" in tuple(param.sharding.spec)


def test_full_configs_hold_the_original_recipe():
    """SPEC §8-9 as the full stage configs set them (the tiny and demo variants may differ)."""
    for stage in ("stage1", "stage2"):
        c = load_config(stage, "")
        assert (c.train.global_batch_size, c.train.micro_batches, c.train.num_epochs) == (16, 1, 5)
        assert (c.train.loss_mode, c.train.loss_group_size) == ("original", 2)
        assert (c.optim.lr, c.optim.schedule, c.optim.warmup_steps) == (5e-6, "log_warmup", 50)
        assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay, c.optim.clip_norm) == \
            (0.9, 0.999, 1e-8, 0.0, 1.0)
        assert (c.seed, c.data.max_length, c.train.log_every, c.train.eval_every, c.train.epoch_checkpoints) == \
            (42, 2048, 50, 1500, 5)


def test_original_warmup_schedule_values():
    schedule = optim.log_warmup_schedule(5e-6, 50)
    expected = [5e-6] + [5e-6 * min(1.0, np.log(u) / np.log(50)) for u in range(1, 61)]
    np.testing.assert_allclose([float(schedule(u)) for u in range(61)], expected, rtol=1e-6, atol=1e-15)


def test_restore_onto_a_smaller_mesh(tmp_path):
    config = load_config("stage1")
    task, state = run_steps(config, mesh_of((1, 8, 1)), tmp_path / "w", 2)
    for shape in [(1, 4, 1), (1, 1, 1)]:
        # total_steps already reached: train() restores and returns without stepping.
        _, restored = run_steps(config, mesh_of(shape), tmp_path / "w", 2)
        for key, value in params_of(state).items():
            np.testing.assert_array_equal(params_of(restored)[key], value)


def test_stage2_is_seeded_from_stage1_parameters_only(tmp_path):
    """Stage 1's layer loop and remat are runtime choices stage 2 does not inherit (an unrolled stage 1 seeds a
    scanned, rematerialized stage 2; the loop refuses remat, so inheriting would fail)."""
    stage1 = load_config("stage1")
    stage1.model.scan_layers = False
    _, s1 = run_steps(stage1, mesh_of((1, 8, 1)), tmp_path / "s1", 3)
    stage2 = load_config("stage2")
    stage2.model.update(scan_layers=True, remat_policy="full")
    stage2.init.workdir = str(tmp_path / "s1")
    mesh = mesh_of((1, 4, 1))
    task = tiny_task(stage2, mesh, 1)
    _, _, shardings = trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)
    seeded = task.initial_state(shardings)
    for key, value in params_of(s1).items():
        np.testing.assert_array_equal(params_of(seeded)[key], value)
    assert int(seeded["optimizer"]["step"].get_value()) == 0
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(seeded["optimizer"]["opt_state"]))



class _SigtermAt:
    """A data iterator that sends this process SIGTERM when batch `at` is drawn (a preemption mid-run)."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.drawn = inner, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.drawn += 1
        if self.drawn == self.at:
            signal.raise_signal(signal.SIGTERM)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_training_says_once_per_batch_shape_when_xla_recomputes_kernels(tmp_path, capsys, monkeypatch):
    """XLA:CPU never runs out of memory here, so the count of rematerialized kernels is stubbed: the note comes
    from the step compiled for the batch, once per batch shape, and training goes on."""
    counted = []
    monkeypatch.setattr(trainer, "rematerialized_kernels", lambda text: counted.append(text) or 7)
    run_steps(load_config("stage1"), mesh_of((1, 1, 1)), tmp_path, 3)
    notes = [line for line in capsys.readouterr().out.splitlines() if "XLA recomputes 7 kernels" in line]
    assert len(notes) == 1 and len(counted) == 1 and "ENTRY" in counted[0], notes


def test_stage2_refuses_an_unfinished_stage1_unless_its_step_is_named(tmp_path, capsys):
    stage1 = load_config("stage1")
    mesh = mesh_of((1, 1, 1))
    loop = trainer.LoopConfig(total_steps=6, log_every=0, checkpoint_every=100, async_checkpoints=False,
                              progress=False)
    trainer.train(tiny_task(stage1, mesh, 6), loop, mesh=mesh, rules=parallel.DEFAULT_RULES,
                  workdir=tmp_path / "s1", train_iter=_SigtermAt(batches(stage1), 3))
    assert "starting from freshly initialised weights" in capsys.readouterr().out
    stopped = checkpoint.TrainCheckpoints(tmp_path / "s1", read_only=True)
    step = stopped.latest_step()
    stopped.close()
    assert step is not None and step < 6
    stage2 = load_config("stage2")
    stage2.init.workdir = str(tmp_path / "s1")
    task = tiny_task(stage2, mesh, 1)
    shardings = trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)[2]
    with pytest.raises(ValueError, match=rf"stopped at step {step} of 6: finish that run first .*init.step={step}"):
        task.initial_state(shardings)
    stage2.init.step = step  # deliberately
    tiny_task(stage2, mesh, 1).initial_state(shardings)
    assert f"stage 2 starts from {tmp_path / 's1' / 'checkpoints'} step {step}" in capsys.readouterr().out
    stage2.init.step = 99
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint of step 99 \(it has \[{step}\]\)"):
        tiny_task(stage2, mesh, 1).initial_state(shardings)
    trainer.train(tiny_task(stage1, mesh, 6), loop, mesh=mesh, rules=parallel.DEFAULT_RULES,
                  workdir=tmp_path / "s1", train_iter=batches(stage1))  # the rerun finishes stage 1
    assert f"s1: resuming at step {step} of 6" in capsys.readouterr().out
    trainer.train(tiny_task(stage1, mesh, 6), loop, mesh=mesh, rules=parallel.DEFAULT_RULES,
                  workdir=tmp_path / "s1", train_iter=batches(stage1))
    assert "s1: nothing to train, step 6 of 6 is done" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"resuming\) was written by stage 1, this run is stage 2: give stage 2 a "
                                         r"workdir of its own"):  # not stage 1's optimizer, step and data state
        trainer.train(tiny_task(stage2, mesh, 8), loop, mesh=mesh, rules=parallel.DEFAULT_RULES,
                      workdir=tmp_path / "s1", train_iter=batches(stage2))

def test_stage2_starts_from_a_converted_checkpoint_and_leaves_it_as_it_was(tmp_path):
    """init.workdir may name a converted checkpoint (meta.json + params/); reading it must not turn it into an
    empty training workdir (an Orbax manager opened for writing creates checkpoints/ there)."""
    _, s1 = run_steps(load_config("stage1"), mesh_of((1, 1, 1)), tmp_path / "s1", 1)
    meta, _, _ = checkpoint.latest_metadata(tmp_path / "s1")
    converted = tmp_path / "converted"
    checkpoint.save_model(checkpoint.load_model(tmp_path / "s1"), converted,
                          extra_metadata={k: v for k, v in meta.items() if k not in ("model_config", "versions")})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    stage2 = load_config("stage2")
    stage2.init.workdir = str(converted)
    mesh = mesh_of((1, 1, 1))
    task = tiny_task(stage2, mesh, 1)
    seeded = task.initial_state(trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)[2])
    for key, value in params_of(s1).items():
        np.testing.assert_array_equal(params_of(seeded)[key], value)
    stage2.init.workdir = str(tmp_path / "s1")  # a training workdir is read without writing to it too
    tiny_task(stage2, mesh, 1).initial_state(trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)[2])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    stage2.init.workdir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"nowhere: not a model"):
        tiny_task(stage2, mesh, 1).initial_state(trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)[2])


def test_stage2_refuses_other_vocabulary_or_vqgan(tmp_path):
    stage1 = load_config("stage1")
    run_steps(stage1, mesh_of((1, 1, 1)), tmp_path / "s1", 1)
    stage2 = load_config("stage2")
    stage2.init.workdir = str(tmp_path / "s1")
    stage2.model.vocab_size = 144
    mesh = mesh_of((1, 1, 1))
    task = tiny_task(stage2, mesh, 1)
    with pytest.raises(ValueError, match=r"vocabulary size 128 differs from this run's 144"):
        task.initial_state(trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)[2])
    stage2.model.update(vocab_size=128, vocab_multiple=256)  # tables of 256 rows, stage 1's have 128
    task = tiny_task(stage2, mesh, 1)
    with pytest.raises(ValueError, match=r"tables have 128 rows \(vocab_multiple=128\), this run's 256; set "
                                         r"--config.model.vocab_multiple=128"):
        task.initial_state(trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)[2])
    stage2.model.update(vocab_multiple=1, hidden_size=128)  # weights of another width: refused, not trained on
    task = tiny_task(stage2, mesh, 1)
    with pytest.raises(ValueError, match=r"its model differs from config.model in \['hidden_size \(64 vs 128\)'\]"):
        task.initial_state(trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)[2])
    stage2.model.hidden_size = 64  # 128 ids need no padding: the same tables
    task = tiny_task(stage2, mesh, 1)
    task.initial_state(trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)[2])
    stage2 = load_config("stage2")
    stage2.init.workdir = str(tmp_path / "s1")
    task = lm_task.build_task(stage2, mesh=mesh, rules=parallel.DEFAULT_RULES, total_steps=1,
                              metadata={"stage": 2, "image_offset": 112, "vqgan_fingerprint": "other"})
    with pytest.raises(ValueError, match=r"vqgan_fingerprint is None, this run expects 'other'"):
        task.initial_state(trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)[2])


def test_stage1_starts_from_an_hf_directory_with_vocab_extension(tmp_path):
    hf = tiny_hf_model(seed=7, vocab_size=112, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    config = load_config("stage1")
    config.init.hf_dir = str(save_hf(hf, tmp_path / "hf"))
    config.model.update(vocab_size=128, max_position_embeddings=128)
    mesh = mesh_of((1, 8, 1))
    task = tiny_task(config, mesh, 1)
    state = task.initial_state(trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)[2])
    embed = np.asarray(state["model"]["embed_in"].get_value())
    assert embed.shape == (128, 64)
    np.testing.assert_array_equal(embed[:112], hf.gpt_neox.embed_in.weight.detach().numpy())
    config.model.intermediate_size = 256
    task = tiny_task(config, mesh, 1)
    with pytest.raises(ValueError, match=r"config.json differs from config.model in \['intermediate_size \(128 vs "
                                         r"256\)'\]"):
        task.initial_state(trainer.state_shardings(task, mesh, parallel.DEFAULT_RULES)[2])


def _train_cli(workdir, steps, extra=()):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "llmcxr_jax.train", "--config", str(ROOT / "configs/stage1.py:tiny"),
           "--workdir", str(workdir), f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=1",
           *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final(workdir, steps, mesh):
    config = load_config("stage1")
    return run_steps(config, mesh, workdir, steps)[1]


def _finished(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)  # read, not wait(): a full pipe would block the child
    assert proc.returncode == 0, out[-3000:]


def test_resume_after_sigkill_is_exact(tmp_path):
    steps = 12
    _finished(_train_cli(tmp_path / "straight", steps))
    proc = _train_cli(tmp_path / "killed", steps)
    ckpt_dir = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert done and done[-1] < steps, f"the run finished before it could be killed: {done}"
    _finished(_train_cli(tmp_path / "killed", steps))
    mesh = mesh_of((1, 8, 1))
    straight, resumed = _final(tmp_path / "straight", steps, mesh), _final(tmp_path / "killed", steps, mesh)
    for key, value in params_of(straight).items():
        np.testing.assert_array_equal(params_of(resumed)[key], value)

    def data_state(workdir):
        return json.loads((workdir / "checkpoints" / str(steps) / "data" / "process_0-of-1.json").read_text())

    assert data_state(tmp_path / "killed") == data_state(tmp_path / "straight") == {"index": steps}


@pytest.mark.parametrize("signum,name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_sigterm_or_ctrl_c_writes_a_checkpoint_and_exits_cleanly(tmp_path, signum, name):
    proc = _train_cli(tmp_path / "w", 100000, ["--config.train.checkpoint_every=0"])
    time.sleep(0.5)
    while proc.poll() is None and not (tmp_path / "w" / "tensorboard").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f"{name}: saved a checkpoint at step" in out
    entries = sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir())
    steps = [int(name) for name in entries if name.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 100000, (entries, out[-3000:])


def test_non_finite_loss_stops_with_step_and_batch(tmp_path):
    config = load_config("stage1")
    config.optim.lr = 1e30  # the first update overflows the weights; the next loss is not finite
    config.optim.clip_norm = 0.0
    with pytest.raises(trainer.NonFiniteLossError, match=r"loss is nan at step 2 \(the batch drawn at data-iterator "
                                                         r"state \{'index': 1\}\)"):
        run_steps(config, mesh_of((1, 1, 1)), tmp_path / "w", 3)
    assert not (tmp_path / "w" / "checkpoints" / "2").exists()


def test_throughput_leaves_out_compiles_and_saves(tmp_path, monkeypatch, capsys):
    """Each checkpoint here takes 0.6 s more, the tiny step a few ms: logged tokens/s must be the steps' own."""
    config = load_config("stage1")
    save = checkpoint.TrainCheckpoints.save
    monkeypatch.setattr(checkpoint.TrainCheckpoints, "save", lambda self, *a: time.sleep(0.6) or save(self, *a))
    loop = trainer.LoopConfig(total_steps=6, log_every=2, checkpoint_every=1, async_checkpoints=False,
                              progress=False)
    trainer.train(tiny_task(config, mesh_of((1, 1, 1)), 6), loop, mesh=mesh_of((1, 1, 1)),
                  rules=parallel.DEFAULT_RULES, workdir=tmp_path, train_iter=batches(config))
    rates = [float(r) for r in re.findall(r"tokens_per_s=([-+.e0-9]+)", capsys.readouterr().out)]
    window_tokens = 2 * config.train.global_batch_size * config.data.seq_len
    assert len(rates) == 3 and all(window_tokens / rate < 0.3 for rate in rates), rates


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_the_fraction_of_examples_dropped_for_length_is_logged_and_shown_when_any(tmp_path, capsys, fraction):
    config = load_config("stage1")
    data = batches(config)
    data.log_values = lambda: {"dropped_fraction": fraction}  # as the LM pipeline reports its share
    loop = trainer.LoopConfig(total_steps=2, log_every=2, checkpoint_every=0, async_checkpoints=False,
                              progress=False)
    trainer.train(tiny_task(config, mesh_of((1, 1, 1)), 2), loop, mesh=mesh_of((1, 1, 1)),
                  rules=parallel.DEFAULT_RULES, workdir=tmp_path, train_iter=data)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[train] step 2:"))
    assert ("dropped_fraction=0.25" in line) == (fraction > 0), line
    assert tensorboard(tmp_path)[0]["train/dropped_fraction"] == [fraction]


def test_non_finite_weights_are_never_saved(tmp_path):
    """Step 1's loss and gradients are finite (they come from the weights before its update), its update is not."""
    config = load_config("stage1")
    config.optim.lr = float("inf")
    config.optim.clip_norm = 0.0
    config.train.checkpoint_every = 1
    with pytest.raises(trainer.NonFiniteLossError, match=r"the weights after step 1 are not finite \(the batch "
                                                         r"drawn at data-iterator state \{'index': 0\}\)"):
        run_steps(config, mesh_of((1, 1, 1)), tmp_path / "w", 3)
    assert not [p for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit()]


@pytest.mark.parametrize("override,message", [
    (["--config.train.nonexistent=1"], "error: a --config.KEY override names no config field: nonexistent\n"),
    (["--config.train.globl_batch_size=4"], 'no config field: globl_batch_size Did you mean "global_batch_size"'),
    (["--config.model.attention_impl=cudnn"], "error: model.attention_impl='cudnn' needs GPUs, not cpu"),
    (["--config.mesh.shape=(1,3,1)"], "mesh shape (1, 3, 1) needs 3 devices, but 8 are available"),
    (["--config.train.global_batch_size=4", "--config.mesh.shape=(1,8,1)"],
     "a micro-batch of 4 does not divide over the 8 data×fsdp shards"),
    (["--config.train.micro_batches=0"], "train.micro_batches=0 must be at least 1"),
    (["--config.train.loss_mode=original", "--config.train.loss_group_size=0"],
     "train.loss_group_size=0 must be at least 1"),
    (["--config.train.loss_mode=original", "--config.train.loss_group_size=3"],
     "train.loss_mode='original' averages over groups of train.loss_group_size=3 sequences; "
     "train.global_batch_size=8 is no multiple of it"),
    (["--config.train.keep_checkpoints=0"], "train.keep_checkpoints=0 must be at least 1"),
    (["--config.train.loss_chunk=-1"], "train.loss_chunk=-1 must be >= 0"),
    (["--config.train.num_steps=-1"], "train.num_steps=-1 must be >= 0 (0 = train.num_epochs decide)"),
    (["--config.data.seq_len=256"], "data.seq_len=256 exceeds model.max_position_embeddings=128"),
    (["--config.init.from_scratch=False"], "stage 1 needs weights to start from: init.hf_dir"),
])
def test_bad_config_is_a_clear_error_before_compiling(tmp_path, override, message):
    out, _ = _train_cli(tmp_path / "w", 2, override).communicate(timeout=120)
    assert message in out, out
    assert not (tmp_path / "w" / "checkpoints").exists()


_BASE = "import ml_collections\nfrom configs.stage1 import get_config as base\n\ndef get_config(arg=''):\n    c = base('tiny')\n"


@pytest.mark.parametrize("body,message", [
    (_BASE + "    c.train.num_step = 2\n    c.optim.lr = 1\n    return c\n",
     "{file}: train.num_step is no field (did you mean train.num_steps?) (the fields of configs/stage1.py)"),
    (_BASE + "    c = ml_collections.ConfigDict(dict(c, seed='42', mesh=3))\n"
             "    c.train = ml_collections.ConfigDict(dict(c.train, global_batch_size=8.0))\n    return c\n",
     "{file}: mesh is a int, not a section; seed='42' is a str, not a int; train.global_batch_size=8.0 is a float, "
     "not a int"),
    ("def get_config(arg=''):\n    return 1 +\n", "{file}:2: SyntaxError: invalid syntax"),
    ("def get_config(arg=''):\n    return 1 / 0\n", "{file}:2: ZeroDivisionError: division by zero"),
    ("X = 1\n", "{file}: defines no get_config(arg) function"),
    (_BASE + "    del c.train.loss_chunk\n    del c.optim\n    return c\n",
     "{file}: train.loss_chunk is missing (256 there); optim is missing (a section) (the fields of configs/stage1.py)"),
    (_BASE + "    c.trian.num_steps = 2\n    return c\n",
     "{file}:6: AttributeError: trian Did you mean \"train\" instead of \"trian\"?"),
])
def test_a_config_file_with_mistakes_is_one_line_naming_it(tmp_path, body, message):
    file = tmp_path / "my_config.py"
    file.write_text(body)
    cmd = [sys.executable, "-m", "llmcxr_jax.train", "--config", str(file), "--workdir", str(tmp_path / "w")]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("error: --config " + message.format(file=file)), \
        out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()


def test_an_unknown_flag_is_not_blamed_on_the_config_file(tmp_path):
    cmd = [sys.executable, "-m", "llmcxr_jax.train", "--config", str(ROOT / "configs/stage1.py:tiny"), "--workdirr",
           str(tmp_path / "w")]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("error: Unknown command line flag 'workdirr'"), out.stderr


def test_mixing_weights_come_from_the_data_settings_and_must_be_positive():
    from llmcxr_jax import train

    config = load_config("stage1", "")
    assert train._weights(config, ["mimic", "vqa", "dolly"]) == {"mimic+vqa": 0.8, "dolly": 0.2}
    config.data.image_weight = 0.0
    assert train._weights(config, ["dolly"]) == {"dolly": 0.2}
    with pytest.raises(ValueError, match=r"data.image_weight=0.0 must be > 0 while mimic data is used"):
        train._weights(config, ["mimic", "dolly"])


def test_none_and_numpy_numbers_pass_the_config_check():
    """ml_collections lets None stand for any field (the code reads it as unset); numpy numbers are numbers."""
    import ml_collections

    reference = config_files.load_config("stage1:")
    config = load_config("stage1")
    config.init.step, config.tokenizer = None, None
    assert config_files.config_problems(config, reference) == []
    fields = reference.to_dict()  # a file may build its own ConfigDict
    fields["train"].update(global_batch_size=np.int64(8), progress=1)
    fields["optim"]["lr"] = np.float32(1e-3)
    built = ml_collections.ConfigDict(fields)
    assert config_files.config_problems(built, reference) == ["train.progress=1 is a int, not a bool"]


@pytest.mark.parametrize("workdir,message", [("w", "--workdir {w} exists and is not a directory"),
                                             ("w/sub", "--workdir {w}/sub: {w} is a file, so no directory can be made")])
def test_a_workdir_that_is_or_is_below_a_file_is_refused(tmp_path, workdir, message):
    (tmp_path / "w").write_text("")
    out, _ = _train_cli(tmp_path / workdir, 2).communicate(timeout=120)
    assert message.format(w=tmp_path / "w") in out and "Traceback" not in out, out


def test_a_workdir_that_is_the_one_it_starts_from_is_refused(tmp_path):
    """Stage 2 in stage 1's workdir would resume stage 1's run as its own."""
    (tmp_path / "s1").mkdir()
    out, _ = _train_cli(tmp_path / "s1" / ".", 2, [f"--config.init.workdir={tmp_path / 's1'}",
                                                   "--config.init.from_scratch=False"]).communicate(timeout=120)
    assert f"error: --workdir {tmp_path / 's1'} is init.workdir: give stage 1 a workdir of its own" in out, out


@pytest.mark.parametrize("module,config,message", [
    ("llmcxr_jax.train", "configs/vqgan.py:tiny",
     "(it has no stage, tokenizer, vqgan); e.g. --config configs/stage1.py"),
    ("llmcxr_jax.train_vqgan", "configs/stage1.py:tiny",
     "(it has no loss, lpips, export_dir); e.g. --config configs/vqgan"),
])
def test_the_other_trainers_config_is_refused_by_name(tmp_path, module, config, message):
    cmd = [sys.executable, "-m", module, "--config", str(ROOT / config), "--workdir", str(tmp_path / "w")]
    out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and f"{ROOT / config} is not a config for this trainer {message}" in out.stderr, \
        out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()


@pytest.mark.parametrize("module", ["llmcxr_jax.train", "llmcxr_jax.train_vqgan"])
@pytest.mark.parametrize("config, message", [
    ("configs/nope.py", "error: --config configs/nope.py: [Errno 2] No such file or directory: 'configs/nope.py'"),
    ("configs/vqgan.py:bogus", "error: flag --config=configs/vqgan.py:bogus: Error whilst parsing config file: "
                               "ValueError: configs/vqgan.py: unknown variant 'bogus'"),
])
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, module, config, message):
    out = subprocess.run([sys.executable, "-m", module, "--config", config, "--workdir", str(tmp_path / "w")],
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and out.stderr.strip().startswith(message), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "w").exists()


@pytest.mark.parametrize("change,message", [
    ({"vocab_size": 144}, r"vocabulary size 128 differs from this run's 144"),
    ({"num_hidden_layers": 3, "rotary_pct": 0.5},
     r"its model differs from config.model in \['num_hidden_layers \(2 vs 3\)', 'rotary_pct \(0.25 vs 0.5\)'\]"),
])
def test_resuming_a_workdir_with_another_model_is_a_clear_error(tmp_path, monkeypatch, change, message):
    config = load_config("stage1")
    run_steps(config, mesh_of((1, 1, 1)), tmp_path / "w", 1)
    config.model.update(change)
    closed = []
    close = checkpoint.TrainCheckpoints.close
    monkeypatch.setattr(checkpoint.TrainCheckpoints, "close", lambda self: closed.append(self) or close(self))
    with pytest.raises(ValueError, match=r"latest checkpoint \(resuming\): " + message):
        run_steps(config, mesh_of((1, 1, 1)), tmp_path / "w", 2)
    assert len(closed) == 1  # the refused run's checkpoint manager: no Orbax threads left running


def _largest_array_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate_largest_array_file(step_dir):
    largest = _largest_array_file(step_dir)
    largest.write_bytes(largest.read_bytes()[:1000])


def _flip_first_byte_of_largest_array_file(step_dir):
    """The first byte of a zstd frame: the array's chunk no longer decodes."""
    largest = _largest_array_file(step_dir)
    data = bytearray(largest.read_bytes())
    data[0] ^= 0x04
    largest.write_bytes(bytes(data))


# Orbax reads a step's arrays concurrently: when one file is damaged, the reads still in flight are abandoned and
# report themselves only when collected, as unraisable exceptions after the clear error this test checks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage,reason", [
    (_truncate_largest_array_file, r"OUT_OF_RANGE: .* is not valid for value of size 1000"),
    (_flip_first_byte_of_largest_array_file, r"FAILED_PRECONDITION: .* ZSTD_decompressStream\(\) failed"),
    (lambda step_dir: (step_dir / "state" / "_METADATA").write_text(""), r"Expecting value"),
    (lambda step_dir: (step_dir / "data" / "process_0-of-1.json").write_text("{bad"), r"Expecting property name"),
    (lambda step_dir: (step_dir / "data" / "process_0-of-1.json").unlink(), r".*/process_0-of-1.json: missing \(the checkpoint holds the data states \[\]\)"),
])
def test_a_damaged_checkpoint_is_named_with_the_way_on(tmp_path, damage, reason):
    config = load_config("stage1")
    config.train.update(checkpoint_every=1, keep_checkpoints=2)
    run_steps(config, mesh_of((1, 1, 1)), tmp_path / "w", 2)
    checkpoints = tmp_path / "w" / "checkpoints"
    damage(checkpoints / "2")
    with pytest.raises(checkpoint.DamagedCheckpointError,
                       match=rf"^{checkpoints / '2'}: damaged or incomplete, cannot be read \({reason}.*\); move it "
                             rf"aside \(mv {checkpoints / '2'} {checkpoints}/damaged-2\) to resume from step 1$"):
        run_steps(config, mesh_of((1, 1, 1)), tmp_path / "w", 3)
    (checkpoints / "2").rename(checkpoints / "damaged-2")  # as the message says
    run_steps(config, mesh_of((1, 1, 1)), tmp_path / "w", 3)
    assert checkpoint.TrainCheckpoints(tmp_path / "w", read_only=True).latest_step() == 3


def _restore_latest(workdir, config):
    """The whole train state of `workdir`'s latest step, restored as a resumed run restores it."""
    mesh = mesh_of((1, 1, 1))
    _, abstract, shardings = trainer.state_shardings(tiny_task(config, mesh, 1), mesh, parallel.DEFAULT_RULES)
    target = parallel.abstract_arrays(nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings))
    ckpts = checkpoint.TrainCheckpoints(workdir, read_only=True)
    try:
        return ckpts.restore(ckpts.latest_step(), target)
    finally:
        ckpts.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_bit_flips_in_a_checkpoint_never_restore_silently(tmp_path):
    """Orbax's zstd frames carry no checksum, so most bits flipped in an array file decode to other values: each
    flip is either unreadable or caught by the checksums saved with the step, which name the arrays."""
    config = load_config("stage1")
    run_steps(config, mesh_of((1, 1, 1)), tmp_path / "w", 1)
    largest = _largest_array_file(tmp_path / "w/checkpoints/1")
    intact = largest.read_bytes()
    outcomes = []
    for offset in range(len(intact) // 16, len(intact), len(intact) // 8):
        flipped = bytearray(intact)
        flipped[offset] ^= 0x04
        largest.write_bytes(bytes(flipped))
        with pytest.raises(checkpoint.DamagedCheckpointError) as refused:
            _restore_latest(tmp_path / "w", config)
        message = str(refused.value)
        outcomes.append("caught" if re.search(r": \S+ \(1 array\) differs from what was saved", message) else
                        "unreadable" if "cannot be read" in message else message)
    assert set(outcomes) <= {"caught", "unreadable"} and "caught" in outcomes, outcomes
    largest.write_bytes(intact)
    state, _, meta = _restore_latest(tmp_path / "w", config)  # intact again: restored, the checksums kept apart
    assert "checksums" not in meta and meta["stage"] == 1 and set(state) == {"model", "optimizer"}


def test_a_step_whose_arrays_were_replaced_is_refused_by_name(tmp_path):
    """Another step's files in this step's place (a mixed-up copy): every array decodes, none is what was saved."""
    config = load_config("stage1")
    config.train.update(checkpoint_every=1, keep_checkpoints=2)
    run_steps(config, mesh_of((1, 1, 1)), tmp_path / "w", 2)
    checkpoints = tmp_path / "w" / "checkpoints"
    shutil.rmtree(checkpoints / "2" / "state")
    shutil.copytree(checkpoints / "1" / "state", checkpoints / "2" / "state")
    with pytest.raises(checkpoint.DamagedCheckpointError,
                       match=rf"^{checkpoints / '2'}: \S+, \S+, \S+ and \d+ more \(\d+ arrays\) differ from what was "
                             rf"saved: the files were changed or damaged on disk; move it aside .* resume from step 1$"):
        run_steps(config, mesh_of((1, 1, 1)), tmp_path / "w", 3)
    with pytest.raises(checkpoint.DamagedCheckpointError, match=r"differ from what was saved"):  # as a sampler in
        checkpoint.load_model(tmp_path / "w", dtype="bfloat16", param_dtype="bfloat16")  # bf16 reads the weights
    bf16 = checkpoint.load_model(tmp_path / "w", step=1, dtype="bfloat16", param_dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype("bfloat16")}


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"),
                                   RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"),
                                   KeyError("model")])
def test_a_checkpoint_that_fails_for_other_reasons_is_not_called_damaged(tmp_path, error):
    """No permission, no memory, another tree: moving the step aside would lose a good checkpoint."""
    config = load_config("stage1")
    run_steps(config, mesh_of((1, 1, 1)), tmp_path / "w", 1)
    ckpts = checkpoint.TrainCheckpoints(tmp_path / "w", read_only=True)
    try:
        def fail(*args, **kwargs):
            raise error
        ckpts._manager.restore = fail
        with pytest.raises(type(error)) as raised:
            ckpts.read_meta(1)
        assert raised.value is error
    finally:
        ckpts.close()


def test_a_url_workdir_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pathlib would have made gs://bucket/run the local directory gs:/bucket/run
    with pytest.raises(ValueError, match=r"workdir gs://bucket/run: URLs are not supported.*mount the bucket"):
        run_steps(load_config("stage1"), mesh_of((1, 1, 1)), "gs://bucket/run", 1)
    assert not any(tmp_path.iterdir())


def test_reading_a_workdir_prints_no_orbax_warnings(tmp_path, caplog):
    """Stage 2, the sampler and exports open workdirs read-only; Orbax's notes that they are read-only look like
    faults to users and are filtered (only those)."""
    writer = checkpoint.TrainCheckpoints(tmp_path / "w", every=1, keep=1, async_save=False)
    writer.save(1, {"a": np.zeros(2, np.float32)}, {}, {"x": 1})
    writer.close()
    with caplog.at_level("WARNING"):
        reader = checkpoint.TrainCheckpoints(tmp_path / "w", read_only=True)
        assert reader.read_meta(reader.latest_step()) == {"x": 1}
        reader.close()
    assert not [r for r in caplog.records if "read only" in r.getMessage() or "read_only" in r.getMessage()]


def test_ctrl_c_while_a_stop_is_pending_aborts():
    """The first Ctrl-C or a SIGTERM asks for a checkpointed stop; a Ctrl-C after either aborts without it."""
    for first in (signal.SIGTERM, signal.SIGINT):
        with trainer._Preemption(mesh_of((1, 1, 1))) as preemption:
            signal.raise_signal(first)
            assert preemption.stop_now(0)
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)


def test_config_sections_name_fields_their_dataclass_lacks():
    from llmcxr_jax import vqgan_task

    config = load_config("stage1")
    config.model.hidden_sise = 64
    with pytest.raises(ValueError, match=r"config.model has unknown fields \['hidden_sise'\]; known: \[.*'hidden_size'"):
        lm_task.model_config_from(config)
    vq = load_config("vqgan")
    vq.loss.disc_wieght = 0.5
    with pytest.raises(ValueError, match=r"config.loss has unknown fields \['disc_wieght'\]; known: \[.*'disc_weight'"):
        vqgan_task.loss_config_from(vq)


@pytest.mark.parametrize("epochs", [0, -1])
def test_no_steps_and_no_epochs_is_refused_rather_than_a_run_that_trains_nothing(epochs):
    """It used to exit 0 with an empty checkpoints/, which stage 2 then could not start from."""
    from llmcxr_jax import train

    config = load_config("stage1")
    config.train.update(num_steps=0, num_epochs=epochs)
    with pytest.raises(ValueError, match=f"train.num_steps=0 and train.num_epochs={epochs}: nothing to train"):
        train.total_steps(config, steps_per_epoch=10)
    config.train.num_epochs = 2
    assert train.total_steps(config, steps_per_epoch=10) == 20
