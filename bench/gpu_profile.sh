#!/usr/bin/env bash
# Where the GPU time goes, in one call within a 7-minute budget (BUDGET_S, default 420 s; bench/steps.sh):
# the 2.8B train step at batch 8 and 16, decoding with one weight buffer per layer, and again with cuBLAS
# instead of Triton gemms, each with the top device ops of one call (bench/profile_ops.py). Ours only: it runs
# after bench/gpu_suite.sh, which measured the references on the same card (on 2026-11-28 the first step here,
# decoding beside transformers, took 200 s and left no time for training). Every step prints its seconds.
# Its 2026-11-28 run (H200) also compared the stacked and unrolled layouts, Adam mu in bf16 and
# --xla_gpu_enable_dynamic_slice_fusion (NOTES.md); `--layout stacked` and XLA_FLAGS=... before `generate`
# repeat those.
#
#   RESULTS=/some/dir bash bench/gpu_profile.sh      # JSON lines and op tables (default bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S="${BUDGET_S:-420}" RESULTS="${RESULTS:-bench/results}" SHAPE="${SHAPE:-2.8b}" SEQ="${SEQ:-1024}" ATTENTION="${ATTENTION:-cudnn}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
export PYTHONUNBUFFERED=1
RESULTS="$(mkdir -p "$RESULTS" && cd "$RESULTS" && pwd)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

source bench/steps.sh
generate() { step "generate ${*:2}" "$1" env -C bench python generate_latency.py --shape "$SHAPE" --dtype bfloat16 \
  --repeats 3 --out "$RESULTS/generate.jsonl" --profile "$RESULTS/ops.jsonl" "${@:2}"; }
train() { step "train ${*:2}" "$1" python bench/train_throughput.py --shape "$SHAPE" --seq "$SEQ" \
  --attention "$ATTENTION" --steps 3 --repeats 2 --out "$RESULTS/train.jsonl" --profile "$RESULTS/ops.jsonl" "${@:2}"; }

train 120 --batch 8 --remat dots_no_batch
train 100 --batch 16 --remat dots_no_batch
generate 150 --layout unstacked
# The per-layer matrix-vector products ran as Triton gemm fusions well under the weight-read bandwidth on the
# H200: the same decoding with XLA's Triton gemms off (cuBLAS instead).
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" generate 120 --layout unstacked
exit 0  # each step has printed how it ended
