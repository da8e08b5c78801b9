"""Multi-process training on one machine, and dry-run compilation for this mesh and for absent TPU pods."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import vqgan_flax

from llmcxr_jax import aot, checkpoint, config_files, parallel, train
from train_helpers import ROOT, load_config, saved_params

TINY = str(ROOT / "configs/stage1.py:tiny")


def _env(devices: int) -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


def test_two_local_processes_train_like_one(tmp_path):
    common = ["--config", TINY, "--config.train.num_steps=2", "--config.train.checkpoint_every=2",
              "--config.optim.lr=1e-4"]
    launch = subprocess.run([sys.executable, str(ROOT / "launch/local.py"), "--num_processes", "2",
                             "--devices_per_process", "4", "--", *common, "--workdir", str(tmp_path / "multi")],
                            cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=600)
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "llmcxr_jax.train", *common, "--workdir", str(tmp_path / "one")],
                            cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi, one = (saved_params(tmp_path / w) for w in ("multi", "one"))
    # Adam turns reduction-order noise in near-zero gradients into up to a few % of one lr step.
    for key, value in one.items():
        np.testing.assert_allclose(multi[key], value, atol=3e-6, rtol=1e-5, err_msg=key)


def _child(launcher: subprocess.Popen, process_id: int) -> int:
    """The pid of the training process that launch/local.py started with this process id."""
    for pid in (Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()):
        if f"--config.distributed.process_id={process_id}" in Path(f"/proc/{pid}/cmdline").read_text():
            return int(pid)
    raise AssertionError(f"launch/local.py has no process {process_id}")


def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
    workdir = tmp_path / "w"
    launcher = subprocess.Popen([sys.executable, str(ROOT / "launch/local.py"), "--num_processes", "2",
                                 "--devices_per_process", "2", "--", "--config", TINY, "--workdir", str(workdir),
                                 "--config.train.num_steps=100000", "--config.train.checkpoint_every=0"],
                                cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        while launcher.poll() is None and not (workdir / "tensorboard").exists():
            time.sleep(0.05)
        time.sleep(2.0)  # a few steps in
        assert launcher.poll() is None, launcher.communicate()[0][-3000:]
        os.kill(_child(launcher, 1), signal.SIGTERM)  # process 0 hears of it only through the vote
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, out[-3000:]
    # Process 1 may still be starting when the signal comes (JAX's notifier takes it then): either way, a stop.
    assert re.search(r"(SIGTERM/Ctrl-C on another process|SIGTERM to some process during start-up): saved a "
                     r"checkpoint at step", out), out[-3000:]
    steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1, out[-3000:]
    states = [json.loads((steps[0] / "data" / f"process_{i}-of-2.json").read_text()) for i in range(2)]
    assert states == [{"index": int(steps[0].name)}] * 2  # both processes stopped after the same batch


def test_two_local_processes_train_and_export_a_vqgan(tmp_path):
    """Every process opens the checkpoint for the export (Orbax waits for all of them); process 0 writes it."""
    workdir = tmp_path / "vq"
    launch = subprocess.run([sys.executable, str(ROOT / "launch/local.py"), "--num_processes", "2",
                             "--devices_per_process", "1", "--module", "llmcxr_jax.train_vqgan", "--", "--config",
                             str(ROOT / "configs/vqgan.py:tiny"), "--workdir", str(workdir)],
                            cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=300)
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    assert launch.stdout.count("exported the VQ-GAN of step 6") == 1, launch.stdout[-3000:]
    model = vqgan_flax.load(workdir / "export")
    assert model.config.resolution == 32
    assert json.loads((workdir / "export" / "meta.json").read_text())["step"] == 6


def _dry_run(extra, devices=8, timeout=600):
    """The README's command as written: no dataset and no step count needed."""
    cmd = [sys.executable, "-m", "llmcxr_jax.train", "--config", str(ROOT / "configs/stage1.py"), "--dry_run", *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def _gib(text, key):
    return float(re.search(rf"{key}:\s+([0-9.]+) GiB", text).group(1))


def test_dry_run_of_the_full_model_on_8_fake_devices_shards_state_to_an_eighth():
    out = _dry_run([])
    total = _gib(out, "parameters \\+ optimizer state")
    assert 30 < total < 32  # 2.78B fp32 params + two fp32 Adam moments
    assert _gib(out, "per device       arguments") <= total / 8 * 1.05
    assert "not a guarantee for a GPU" in out


@pytest.mark.parametrize("mesh_shape", [(1, 1, 8), (1, 2, 4)])
def test_full_model_state_splits_to_an_eighth_on_tensor_meshes(mesh_shape):
    """LLM-CXR's 51,305 ids divide by no tensor axis > 1: unpadded, the embedding tables and their Adam moments
    were split over fsdp only, or replicated (6.46 GiB per device on (1, 1, 8)); padded to 51,328 rows they split
    like every other weight."""
    from flax import nnx

    from llmcxr_jax import lm_task, optim
    from llmcxr_jax.model import GPTNeoX

    config = load_config("stage1", "")
    cfg = lm_task.model_config_from(config)
    assert cfg.vocab_size == 51305 and cfg.table_rows == 51328
    tx, _ = optim.make_optimizer(config.optim, 100)
    state = nnx.state(nnx.eval_shape(lambda: lm_task.LMTrainState(GPTNeoX(cfg, rngs=nnx.Rngs(0)), tx)))
    shardings = parallel.state_shardings(state, parallel.make_mesh(mesh_shape))
    leaves = list(zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
    total = sum(a.size * a.dtype.itemsize for a, _ in leaves)
    per_device = sum(np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in leaves)
    assert 30 * 2**30 < total < 32 * 2**30 and per_device <= total / 8 * 1.005


def test_full_model_compiles_ahead_of_time_for_a_tpu_pod():
    """64 chips on 16 hosts. (The same compile for 8 chips, v5p:2x2x2, took 70 s of the suite and checked no more.)"""
    topology, chips = "v5p:4x4x4", 64
    out = _dry_run(["--topology", topology, f"--config.train.global_batch_size={chips * 2}"], devices=1)
    assert f"compiled for {chips} tpu devices" in out


@pytest.mark.parametrize("topology,gpus,attention", [("h100:8", 8, "auto"), ("h100:2x8", 16, "cudnn")])
def test_full_model_compiles_ahead_of_time_for_h100s(topology, gpus, attention):
    out = _dry_run(["--topology", topology, f"--config.train.global_batch_size={gpus * 2}",
                    f"--config.model.attention_impl={attention}"], devices=1)
    assert f"compiled for {gpus} gpu devices" in out and "opaque kernels of its shapes" in out
    assert _gib(out, "per device       arguments") <= _gib(out, "parameters \\+ optimizer state") / gpus * 1.05
    assert "recomputes" not in out


def test_a_dry_run_says_when_xla_recomputes_kernels_to_fit_an_h100():
    """One 80 GB H100 at the config's longest batches, 16 × 2048, with fp32 Adam moments: over XLA's memory
    limit, so its rematerialization runs matmuls twice; the dry run says so, with what needs less."""
    out = _dry_run(["--topology", "h100:1"], devices=1)
    assert "one step of 16×2048 tokens (the longest of data.lengths)" in out, out[-2000:]
    assert re.search(r"XLA recomputes \d+ kernels .* optim.mu_dtype=bfloat16, more train.micro_batches", out), \
        out[-2000:]


def test_a_gpu_dry_run_without_the_attention_stand_in_is_a_clear_error(monkeypatch):
    """A jaxlib whose CUDA plugin lacks the FFI target that stands in for cuDNN's attention (renamed here)."""
    monkeypatch.setattr(aot, "OPAQUE_KERNEL", "no_such_ffi_target")
    monkeypatch.setattr(parallel, "enable_compilation_cache", lambda: None)  # no cache directory from a test
    config = config_files.load_config(f"{ROOT / 'configs/stage1.py'}:tiny")
    config.model.dtype = "bfloat16"
    with pytest.raises(ValueError, match="no_such_ffi_target.*attention_impl=xla"):
        train.run(config, "", dry=True, topology="h100:1")


@pytest.mark.parametrize("dtype,fused", [("bfloat16", True), ("float32", False)])
def test_a_gpu_dry_run_compiles_the_attention_a_gpu_run_would_use(monkeypatch, capsys, dtype, fused):
    """`auto` is cuDNN for bf16 only: an fp32 config's H100 dry run compiles XLA's attention, as its run would."""
    monkeypatch.setattr(parallel, "enable_compilation_cache", lambda: None)  # no cache directory from a test
    config = config_files.load_config(f"{ROOT / 'configs/stage1.py'}:tiny")
    config.model.dtype = dtype
    train.run(config, "", dry=True, topology="h100:1")
    assert ("opaque kernels of its shapes" in capsys.readouterr().out) == fused


@pytest.mark.parametrize("extra,message", [
    (["--topology", "h100:x"], "GPU topologies are h100:N (one host, N GPUs) or h100:HxN"),
    (["--topology", "H100:0"], "GPU topologies are h100:N (one host, N GPUs) or h100:HxN"),
])
def test_gpu_topology_mistakes_are_one_line_errors(extra, message):
    cmd = [sys.executable, "-m", "llmcxr_jax.train", "--config", str(ROOT / "configs/stage1.py"), "--dry_run", *extra]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def _join(address: str, processes: int, pid: int, timeout_s: int) -> str:
    """Python source that joins process `pid` to a cluster of `processes` through llmcxr_jax.parallel."""
    return (f"import types; from llmcxr_jax import parallel; parallel.initialize(types.SimpleNamespace("
            f"coordinator_address={address!r}, num_processes={processes}, process_id={pid}, local_device_ids='', "
            f"timeout_s={timeout_s}))\n")


def _local_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _in_processes(code: str, processes: int, *args: str) -> list[str]:
    """Run `code` (with `sys.argv[1:] == args`) in processes that form one cluster; their stdouts, by process."""
    address = _local_address()
    procs = [subprocess.Popen([sys.executable, "-c", _join(address, processes, pid, 60) + code, *args], cwd=ROOT,
                              env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in range(processes)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:  # a hung cluster must not outlive the test
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    return [out for out, _ in outs]


_SIGTERM_BEFORE_TRAINING = """
import os, signal, sys
from llmcxr_jax import config_files, train
os.kill(os.getpid(), signal.SIGTERM)  # after jax.distributed started: JAX's notifier takes it, not the trainer
config = config_files.load_config(sys.argv[1])
config.train.update(num_steps=100000, checkpoint_every=0)
train.run(config, sys.argv[2])
"""


@pytest.mark.parametrize("processes", [1, 2])
def test_a_sigterm_before_the_training_loop_still_stops_it_with_a_checkpoint(tmp_path, processes):
    """Once jax.distributed is up, JAX's preemption notifier catches SIGTERM until the trainer's handler is
    installed; the trainer asks JAX's preemption sync point too, so the run stops, on every process at once."""
    outs = _in_processes(_SIGTERM_BEFORE_TRAINING, processes, TINY, str(tmp_path / "w"))
    assert "SIGTERM to some process during start-up: saved a checkpoint at step" in outs[0], outs[0][-2000:]
    steps = [p.name for p in (tmp_path / "w" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and int(steps[0]) < 100, steps


_SAVE_AND_RESTORE_DATA_STATE = """
import json, sys
import jax, numpy as np
from llmcxr_jax import aot, checkpoint, parallel, train
pid = jax.process_index()
ckpts = checkpoint.TrainCheckpoints(sys.argv[1], every=1, keep=2, async_save=True)
ckpts.save(1, {"x": np.arange(3.0)}, {"examples": {"next_index": 10 + pid}, "dropped": 3 * pid}, {"task": "t"})
ckpts.close()
ckpts = checkpoint.TrainCheckpoints(sys.argv[1], every=1, keep=2)
_, data, meta = ckpts.restore(ckpts.latest_step(), {"x": np.zeros(3)})
ckpts.close()
print(json.dumps(data))
"""


def test_each_process_restores_its_own_data_iterator_state(tmp_path):
    outs = _in_processes(_SAVE_AND_RESTORE_DATA_STATE, 2, str(tmp_path))
    restored = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert restored == [{"examples": {"next_index": 10}, "dropped": 0}, {"examples": {"next_index": 11}, "dropped": 3}]
    data = tmp_path / "checkpoints" / "1" / "data"
    assert sorted(p.name for p in data.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    ckpts = checkpoint.TrainCheckpoints(tmp_path, every=1, keep=2)
    try:  # this test is one process: there is no state of "process 0 of 1"
        with pytest.raises(ValueError, match=r"process_0-of-1.json: missing; this checkpoint holds the data "
                                             r"states \['process_0-of-2.json', 'process_1-of-2.json'\]") as refused:
            ckpts.restore(1, {"x": np.zeros(3)})
        assert not isinstance(refused.value, checkpoint.DamagedCheckpointError)  # another process count, not damage
    finally:
        ckpts.close()


_BATCH_WIDTHS = """
import json
import numpy as np
from llmcxr_jax.data.pipeline import make_eval_iterator, make_lm_iterator
from llmcxr_jax.tokenizer import LlmCxrTokenizer
tok = LlmCxrTokenizer.from_pretrained(None)
records = [{"dicom_id": f"d{i}", "report": f"Report {i}.", "codes": np.zeros(400 if i % 5 == 0 else 4, np.int16),
            "direction": "cxr2report"} for i in range(40)]
def rows(batch):  # each row's length: examples end with the weighted `### End`
    return [int(np.flatnonzero(w).max()) + 1 if w.any() else 0 for w in batch["loss_weights"]]
shape = dict(global_batch_size=4, lengths=(128, 1024), max_length=1024)
out = {}
for name, it in (("train", make_lm_iterator({"mimic": records}, tok, **shape)),
                 ("eval", make_eval_iterator({"mimic": records}, tok, **shape))):
    batches = [next(it) for _ in range(8)]
    out[name] = [(b["input_ids"].shape[1], max(rows(b))) for b in batches]
print(json.dumps(out))
"""


def test_processes_pad_each_batch_to_the_same_width():
    """Each process reads its own rows; padding each to its own bucket would compile different steps per process
    and mismatch their collectives."""
    outs = [json.loads(out.strip().splitlines()[-1]) for out in _in_processes(_BATCH_WIDTHS, 2)]
    for name in ("train", "eval"):
        (widths_0, longest_0), (widths_1, longest_1) = (zip(*out[name]) for out in outs)
        assert widths_0 == widths_1, name
        assert list(widths_0) == [128 if max(a, b) <= 128 else 1024 for a, b in zip(longest_0, longest_1)], name
        assert any((a <= 128) != (b <= 128) for a, b in zip(longest_0, longest_1)), f"{name}: no batch tests it"


def _without_cluster(**extra: str) -> dict[str, str]:
    """This machine's environment without any launcher's variables, plus `extra`."""
    prefixes = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "KUBERNETES_", "JAX_COORDINATOR")
    return {**{k: v for k, v in _env(1).items() if not k.startswith(prefixes)}, **extra}


_IS_INITIALIZED = "import jax; print('initialized:', jax.distributed.is_initialized(), jax.process_count())"


def test_auto_defers_to_jax_cluster_detection():
    """`auto` lets JAX find the cluster (here a one-task SLURM job, which `detect_cluster` alone leaves alone)."""
    slurm = _without_cluster(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="1", SLURM_PROCID="0",
                             SLURM_LOCALID="0", JAX_COORDINATOR_PORT=_local_address().split(":")[1])
    outs = {}
    for address in ("auto", ""):
        out = subprocess.run([sys.executable, "-c", _join(address, 0, -1, 30) + _IS_INITIALIZED], cwd=ROOT, env=slurm,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        outs[address] = out.stdout.strip().splitlines()[-1]
    assert outs == {"auto": "initialized: True 1", "": "initialized: False 1"}
    alone = subprocess.run([sys.executable, "-c", _join("auto", 0, -1, 30)], cwd=ROOT, env=_without_cluster(),
                           capture_output=True, text=True, timeout=120)
    assert alone.returncode != 0
    assert "coordinator_address=auto: JAX's cluster detection found no cluster to join" in alone.stderr, alone.stderr


def test_missing_peers_are_explained(tmp_path):
    out = subprocess.run([sys.executable, "-c", _join(_local_address(), 2, 0, 2)], cwd=ROOT, env=_env(1),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "not every process arrived" in out.stderr and "same coordinator address" in out.stderr


@pytest.mark.parametrize("timeout_s", [0, -1])
def test_a_start_up_timeout_below_one_second_is_refused_not_waited_on_forever(timeout_s):
    """JAX takes a timeout <= 0 as no timeout: a process whose peers never come would wait without end."""
    with pytest.raises(ValueError, match=f"distributed.timeout_s={timeout_s} must be at least 1"):
        parallel.initialize(types.SimpleNamespace(coordinator_address=_local_address(), num_processes=2,
                                                  process_id=0, local_device_ids="", timeout_s=timeout_s))
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("address,processes,pid", [("", 2, 1), ("", 0, 0), ("auto", 2, -1)])
def test_a_process_count_or_id_without_a_coordinator_address_is_refused(address, processes, pid):
    """Without an address they were ignored: every host would have trained alone into the same workdir."""
    with pytest.raises(ValueError, match=rf"num_processes={processes} and process_id={pid} are read only with "
                                         rf"distributed.coordinator_address=HOST:PORT \(it is '{address}'"):
        parallel.initialize(types.SimpleNamespace(coordinator_address=address, num_processes=processes,
                                                  process_id=pid, local_device_ids="", timeout_s=5))
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("processes,pid", [(0, 0), (2, 2), (2, -1)])
def test_a_process_id_outside_the_process_count_is_refused_before_joining(processes, pid):
    with pytest.raises(ValueError, match=rf"distributed.process_id={pid} must be in \[0, num_processes={processes}\)"):
        parallel.initialize(types.SimpleNamespace(coordinator_address=_local_address(), num_processes=processes,
                                                  process_id=pid, local_device_ids="", timeout_s=5))
    assert not jax.distributed.is_initialized()
