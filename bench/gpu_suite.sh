#!/usr/bin/env bash
# The whole GPU benchmark set in one call, within a 5-minute budget (BUDGET_S, default 290 s), most important
# first: the 2.8B train step at seq 1024 beside the transformers reference, sampling at batch 1 and 16 beside
# transformers' generate, the bf16 VQ-GAN beside taming (when taming is importable), then a sweep of batch
# size, Adam moment dtype, attention and remat policy, and last the fp32 VQ-GAN the encode/decode CLIs run.
# Each step has its own time limit, cut to what is left of the budget (bench/steps.sh); a step that would start
# with under half its limit (at least 20 s) left is skipped and says so. Every step prints its seconds. Runs from source (PYTHONPATH),
# importing only what the GPU machines have. (The 2026-11-28 H200 call, with one more sweep row, no fp32 VQ-GAN
# row and no budget, took 6-7 minutes.)
#
#   bash bench/gpu_suite.sh 2>&1 | tee bench/results/gpu_suite.log   # the device tool returns only an output tail
#   RESULTS=/some/dir bash bench/gpu_suite.sh      # write the JSON lines elsewhere (default bench/results)
#   SHAPE=tiny VQ_SHAPE=tiny SEQ=64 ATTENTION=xla JAX_PLATFORMS=cpu BUDGET_S=900 bash bench/gpu_suite.sh   # a dry run on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET_S="${BUDGET_S:-290}" RESULTS="${RESULTS:-bench/results}" SHAPE="${SHAPE:-2.8b}" VQ_SHAPE="${VQ_SHAPE:-f16}" SEQ="${SEQ:-1024}" ATTENTION="${ATTENTION:-cudnn}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
export PYTHONUNBUFFERED=1
RESULTS="$(mkdir -p "$RESULTS" && cd "$RESULTS" && pwd)"  # absolute: the sampling and VQ-GAN steps run in bench/
# Lines already in the result files, so that the summary shows this run's rows only.
SEEN="$(for f in train generate vqgan; do [ -f "$RESULTS/$f.jsonl" ] && wc -l < "$RESULTS/$f.jsonl" || echo 0; done | paste -sd,)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

source bench/steps.sh
train() { step "train ${*:2}" "$1" python bench/train_throughput.py --shape "$SHAPE" --seq "$SEQ" \
  --attention "$ATTENTION" --steps 3 --repeats 2 --out "$RESULTS/train.jsonl" "${@:2}"; }
vqgan() { step "vqgan${2:+ ${*:2}}" "$1" env -C bench python vqgan_throughput.py --shape "$VQ_SHAPE" --batch 64 \
  --dtype bfloat16 --repeats 5 --out "$RESULTS/vqgan.jsonl" "${@:2}"; }

# Headline: training at batch 8 × 1024 (remat that keeps weight-matmul outputs; the reference checkpoints).
train 240 --batch 8 --remat dots_no_batch --ref
# Sampling, bf16 weights, batch 1 and 16 (ours, then transformers' generate on the same weights).
step generate 240 env -C bench python generate_latency.py --shape "$SHAPE" --dtype bfloat16 --repeats 3 --ref \
  --out "$RESULTS/generate.jsonl"
# VQ-GAN f16 at batch 64 (taming when importable, else ours alone; ours are kept if taming's are cut short).
vqgan 120 --ref
# The sweep (ours only), most telling first. On an 80 GB H100, batch 16 with fp32 Adam moments is over XLA's
# memory limit and it recomputes matmuls (`xla_remat_copies`; `--dry_run --topology h100:1` says so); bf16
# first moments fit. (`--remat dots` measured the same as dots_no_batch on 2026-11-28 and left the sweep.)
train 120 --batch 16 --remat dots_no_batch
train 120 --batch 16 --remat dots_no_batch --mu_dtype bfloat16
train 120 --batch 8 --remat dots_no_batch --attention xla   # what the fused attention is worth
train 120 --batch 8 --remat full
# The encode/decode CLIs' default: fp32 at full precision (no TF32; VQGAN.encode/decode), beside taming's.
vqgan 90 --dtype float32

python - "$RESULTS" "$SEEN" <<'EOF'
import json, sys
from pathlib import Path
files = [Path(sys.argv[1]) / f"{f}.jsonl" for f in ("train", "generate", "vqgan")]
rows = [json.loads(l) for f, seen in zip(files, map(int, sys.argv[2].split(",")))
        if f.exists() for l in f.read_text().splitlines()[seen:]]
print("\nsummary")
for r in rows:
    if r["bench"] == "train":
        print(f"train    {r['impl']:13} b{r['batch']:<3} {r['remat']:14} {r['attention']:6} {r['tokens_per_s']:>9.0f} tok/s  MFU {r['mfu'] or 0:.1%}"
              f"  peak {r.get('peak_gib', 0):.1f} GiB  first {r['first_step_s']:.0f} s  fused_attn {r.get('fused_attention', '-')} ×{r.get('attention_forwards', '-')}"
              f"  mu {r.get('mu_dtype') or 'fp32'}  remat copies {r.get('xla_remat_copies', '-')}")
    elif r["bench"] == "generate_latency":
        print(f"generate {r['impl']:13} {r['measure']:6} b{r['batch']:<3} {r['ms_per_token']:>8.2f} ms/token"
              f" {r['tokens_per_s']:>9.0f} tok/s  s/image {r.get('s_per_image', '-')}")
    else:
        print(f"vqgan    {r['impl']:13} {r['op']:6} b{r['batch']:<3} {r['images_per_s']:>9.1f} images/s ({r['dtype']})")
EOF
