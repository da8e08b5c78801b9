#!/usr/bin/env bash
# Where the GPU time goes, in one call within a 7-minute budget (BUDGET_S, default 420 s; bench/steps.sh):
# decoding with one weight buffer per layer beside transformers' generate and again with cuBLAS instead of
# Triton gemms, the 2.8B train step at batch 8 beside the reference and at batch 16, each with the top device
# ops of one call (bench/profile_ops.py). Every step prints its seconds.
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

generate 300 --layout unstacked --ref
# The per-layer matrix-vector products ran as Triton gemm fusions well under the weight-read bandwidth on the
# H200: the same decoding with XLA's Triton gemms off (cuBLAS instead).
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" generate 120 --layout unstacked
train 150 --batch 8 --remat dots_no_batch --ref
train 90 --batch 16 --remat dots_no_batch
exit 0  # each step has printed how it ended
