#!/usr/bin/env bash
# Follow-up to gpu_suite.sh in one call (about 6 minutes on one H100/H200): decoding with each layer-weight
# layout (stacked/scanned, unstacked, unrolled), the unstacked one beside transformers' generate, with the top
# device ops of one call per layout; then the 2.8B train step's top ops and two training variants.
#
#   RESULTS=/some/dir bash bench/gpu_profile.sh      # JSON lines and op tables (default bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${RESULTS:-bench/results}" SHAPE="${SHAPE:-2.8b}" SEQ="${SEQ:-1024}" ATTENTION="${ATTENTION:-cudnn}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
export PYTHONUNBUFFERED=1
RESULTS="$(mkdir -p "$RESULTS" && cd "$RESULTS" && pwd)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

generate() { (cd bench && timeout "$1" python generate_latency.py --shape "$SHAPE" --dtype bfloat16 --repeats 3 \
  --out "$RESULTS/generate.jsonl" --profile "$RESULTS/ops.jsonl" "${@:2}") || echo "generate ${*:2}: failed or timed out"; }
train() { timeout "$1" python bench/train_throughput.py --shape "$SHAPE" --seq "$SEQ" --attention "$ATTENTION" --steps 3 \
  --repeats 2 --out "$RESULTS/train.jsonl" "${@:2}" || echo "train ${*:2}: failed or timed out"; }

generate 200 --layout unstacked --ref
generate 80 --layout stacked --batches 1
train 90 --batch 16 --remat dots_no_batch --profile "$RESULTS/ops.jsonl"
generate 80 --layout unrolled --batches 1
train 80 --batch 16 --remat dots_no_batch --mu_dtype bfloat16
XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true generate 80 --layout stacked --batches 1
