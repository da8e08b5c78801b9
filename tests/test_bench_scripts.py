"""The benchmark scripts run on CPU at the `tiny` shapes beside their references and append what they print:
what a GPU call of bench/gpu_suite.sh relies on. (Speed itself is measured by the scripts, never by tests.)"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from train_helpers import ROOT

BENCH = ROOT / "bench"


def _run(tmp_path, script: str, *args: str) -> tuple[str, list[dict]]:
    out = tmp_path / "results.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS="")
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(out)], cwd=BENCH, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, [json.loads(line) for line in out.read_text().splitlines()]


def test_train_throughput_runs_ours_and_transformers(tmp_path):
    printed, rows = _run(tmp_path, "train_throughput.py", "--shape", "tiny", "--batch", "2", "--seq", "32",
                         "--steps", "1", "--repeats", "1", "--ref")
    assert [r["impl"] for r in rows] == ["ours", "transformers"]
    assert all(r["tokens_per_s"] > 0 and r["step_s"] > 0 for r in rows) and "ratio ours/transformers" in printed
    assert rows[0]["xla_remat_copies"] == 0  # a tiny step fits: XLA duplicated nothing


def test_generate_latency_runs_ours_and_transformers(tmp_path):
    printed, rows = _run(tmp_path, "generate_latency.py", "--shape", "tiny", "--batches", "1", "--repeats", "1",
                         "--ref")
    assert {r["impl"] for r in rows} >= {"jax", "transformers"}
    assert all(r["ms_per_token"] > 0 for r in rows) and "ms/token" in printed


def test_vqgan_throughput_runs_ours_and_taming(tmp_path):
    printed, rows = _run(tmp_path, "vqgan_throughput.py", "--shape", "tiny", "--batch", "2", "--repeats", "1",
                         "--warmup", "1", "--ref")
    assert {r["impl"] for r in rows} == {"jax", "taming"} and all(r["images_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("script, steps, first", [("gpu_suite.sh", 8, "train --batch 8 --remat dots_no_batch --ref"),
                                                  ("gpu_profile.sh", 4, "train --batch 8 --remat dots_no_batch")])
def test_gpu_scripts_keep_to_their_budget(tmp_path, script, steps, first):
    """With the budget spent, every step of a GPU script is skipped by name (bench/steps.sh) and the script
    still ends normally (gpu_suite.sh with its summary)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", BUDGET_S="0", RESULTS=str(tmp_path),
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    done = subprocess.run(["bash", str(BENCH / script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(f"[{script}]")]
    assert len(lines) == steps and all(re.search(r"skipped, -?\d+ s of the 0 s budget left, under the \d+ s it "
                                                 r"needs", line) for line in lines), lines
    assert lines[0].startswith(f"[{script}] {first}: ")
    assert not list(tmp_path.glob("*.jsonl"))
    if script == "gpu_suite.sh":
        assert done.stdout.rstrip().endswith("summary")


def test_a_step_with_under_half_its_limit_left_is_skipped():
    """Cut to the 40 s left, a 100 s step would spend them starting and compiling; a 60 s one runs."""
    script = (f"BUDGET_S=40; source {BENCH / 'steps.sh'}; step long 100 true; echo status=$?; "
              "step short 60 true; echo status=$?")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert "[bash] long: skipped, 40 s of the 40 s budget left, under the 50 s it needs" in done.stdout, done.stdout
    assert done.stdout.count("status=1") == 1 and "[bash] short: 0 s" in done.stdout, done.stdout


@pytest.mark.parametrize("script, missing", [("train_throughput.py", "transformers"), ("vqgan_throughput.py", "taming")])
def test_our_rows_are_kept_when_the_reference_cannot_run(tmp_path, script, missing):
    """A reference that fails (here: not importable) or is cut off by a time limit loses only its own rows."""
    (tmp_path / "hide" / missing).mkdir(parents=True)
    (tmp_path / "hide" / missing / "__init__.py").write_text("raise ImportError('not on this machine')\n")
    out = tmp_path / "results.jsonl"
    args = (["--batch", "2", "--seq", "32", "--steps", "1", "--repeats", "1"] if script == "train_throughput.py"
            else ["--batch", "2", "--repeats", "1", "--warmup", "1"])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{tmp_path / 'hide'}:{ROOT}", XLA_FLAGS="")
    subprocess.run([sys.executable, str(BENCH / script), "--shape", "tiny", *args, "--ref", "--out", str(out)],
                   cwd=BENCH, env=env, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and {r["impl"] for r in rows} == ({"ours"} if script == "train_throughput.py" else {"jax"}), rows


def test_a_step_past_its_limit_is_killed_with_its_children(tmp_path):
    """bench/steps.sh: a step over its limit ends with status 124 and says so; the processes it started go too."""
    marker = f"sleep 47.{os.getpid()}"
    script = f"BUDGET_S=100; source {BENCH / 'steps.sh'}; step sleeper 1 bash -c '{marker} & wait'; echo status=$?"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert "[bash] sleeper: timed out after 1 s" in done.stdout and "status=124" in done.stdout, done.stdout
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert left.stdout == "", left.stdout
