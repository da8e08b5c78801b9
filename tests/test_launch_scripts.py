"""The multi-host launchers run the program they are told to on every worker, with the user's arguments intact.

`srun`, `gcloud` and `python` are stand-ins on PATH that run or record what the scripts hand them, so the scripts'
own quoting and environment are what is tested.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRICKY = "--config.data.data_dir=/data/with space/tfds"


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _parsed_data_dir(argv: list[str]) -> str:
    """What the module's own flag parser makes of a recorded command line (`-m MODULE ARGS...`): the config's
    data.data_dir after every override, or the parser's error."""
    at = argv.index("-m")
    code = ("import importlib, sys; from llmcxr_jax import config_files; importlib.import_module(sys.argv[1]); "
            "config_files.parse_flags(['prog', *sys.argv[2:]]); print(config_files.config_from_flags().data.data_dir)")
    out = subprocess.run([sys.executable, "-c", code, *argv[at + 1:]], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def stubs(tmp_path):
    """A bin dir whose `python` writes its argv (one per line) and CUDA_VISIBLE_DEVICES to $RECORD."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "python", 'printf "%s\\n" "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}" "$@" > "$RECORD"\n')
    # srun: drop its own options, run the task as SLURM's local rank 3 would
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done; SLURM_LOCALID=3 exec "$@"\n')
    # gcloud: run the --command string where the worker would (REPO_DIR is relative to the home directory)
    _stub(bin_dir, "gcloud", 'for a in "$@"; do case "$a" in --command) next=1;; *) [ -n "$next" ] && cmd="$a" '
                             'next=;; esac; done; cd "$HOME" && exec bash -c "$cmd"\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RECORD=str(tmp_path / "argv"), HOME=str(tmp_path))
    (tmp_path / "llmcxr-jax").mkdir()
    return env, tmp_path / "argv"


@pytest.mark.parametrize("module", [None, "llmcxr_jax.train_vqgan"])
def test_slurm_script_runs_the_module_on_the_tasks_own_gpu(stubs, module):
    env, record = stubs
    if module:
        env["MODULE"] = module
    subprocess.run(["bash", str(ROOT / "launch/slurm_gpu.sbatch"), "--config", "configs/vqgan.py", TRICKY],
                   env=env, check=True, timeout=60)
    argv = record.read_text().splitlines()
    assert argv == [
        "CUDA_VISIBLE_DEVICES=3", "-m", module or "llmcxr_jax.train", "--config", "configs/vqgan.py", TRICKY,
        "--config.distributed.local_device_ids=0"]
    assert _parsed_data_dir(argv) == "/data/with space/tfds"


@pytest.mark.parametrize("module", [None, "llmcxr_jax.train_vqgan"])
def test_tpu_pod_script_runs_the_module_with_automatic_cluster_detection(stubs, module):
    env, record = stubs
    env.update(TPU="pod", ZONE="zone", WORKDIR="/mnt/my runs/r1", DATA_DIR="/mnt/b/tf ds")
    if module:
        env["MODULE"] = module
    subprocess.run(["bash", str(ROOT / "launch/tpu_pod.sh"), "--config", "configs/vqgan.py", TRICKY], env=env,
                   check=True, timeout=60)
    argv = record.read_text().splitlines()
    assert argv == [
        "CUDA_VISIBLE_DEVICES=", "-m", module or "llmcxr_jax.train", "--config", "configs/vqgan.py", TRICKY,
        "--workdir", "/mnt/my runs/r1", "--config.distributed.coordinator_address=auto",
        "--config.data.data_dir=/mnt/b/tf ds"]
    assert _parsed_data_dir(argv) == "/mnt/b/tf ds"  # DATA_DIR wins over an earlier data_dir override



def test_tpu_pod_script_prints_its_usage():
    out = subprocess.run(["bash", str(ROOT / "launch/tpu_pod.sh"), "--help"], capture_output=True, text=True,
                         check=True, timeout=60, env={"PATH": os.environ["PATH"]}).stdout
    assert out.startswith("Train on a Cloud TPU pod slice") and "TPU=my-v5p-64 ZONE=" in out and "set -e" not in out

@pytest.mark.parametrize("flag", ["--num_processes", "--devices_per_process"])
def test_local_launcher_refuses_counts_below_one(flag):
    out = subprocess.run([sys.executable, str(ROOT / "launch/local.py"), flag, "0", "--", "x"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "must be at least 1" in out.stderr, out.stderr


def test_local_launcher_fails_when_a_process_dies_by_a_signal(tmp_path):
    """Negative return codes (killed by a signal, e.g. JAX's abort when peers never arrive) are failures."""
    (tmp_path / "dies.py").write_text("import os, sys\n"
                                      "if '--config.distributed.process_id=1' in sys.argv: os.abort()\n")
    out = subprocess.run([sys.executable, str(ROOT / "launch/local.py"), "--module", "dies", "--num_processes", "2",
                          "--", "x"], env=dict(os.environ, PYTHONPATH=str(tmp_path)), capture_output=True, timeout=60)
    assert out.returncode == 256 - signal.SIGABRT, out.stderr  # sys.exit(-6), not a program that failed to start
