#!/usr/bin/env bash
# The whole GPU benchmark set in one call (6–7 minutes on one H200, 2026-11-28), most important first so that a
# call cut short still returns the headline numbers: the 2.8B train step at seq 1024 beside the transformers
# reference, sampling at batch 1 and 16 beside transformers' generate, the VQ-GAN beside taming (when taming is
# importable), then a sweep of remat policies and batch sizes. Each step has its own time limit.
# Runs from source (PYTHONPATH), importing only what the GPU machines have.
#
#   bash bench/gpu_suite.sh 2>&1 | tee bench/results/gpu_suite.log
#   RESULTS=/some/dir bash bench/gpu_suite.sh      # write the JSON lines elsewhere (default bench/results)
#   SHAPE=tiny VQ_SHAPE=tiny SEQ=64 ATTENTION=xla JAX_PLATFORMS=cpu bash bench/gpu_suite.sh   # a dry run of the script on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${RESULTS:-bench/results}" SHAPE="${SHAPE:-2.8b}" VQ_SHAPE="${VQ_SHAPE:-f16}" SEQ="${SEQ:-1024}" ATTENTION="${ATTENTION:-cudnn}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
export PYTHONUNBUFFERED=1
RESULTS="$(mkdir -p "$RESULTS" && cd "$RESULTS" && pwd)"  # absolute: the sampling and VQ-GAN steps run in bench/
# Lines already in the result files, so that the summary shows this run's rows only.
SEEN="$(for f in train generate vqgan; do [ -f "$RESULTS/$f.jsonl" ] && wc -l < "$RESULTS/$f.jsonl" || echo 0; done | paste -sd,)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

train() { timeout "$1" python bench/train_throughput.py --shape "$SHAPE" --seq "$SEQ" --attention "$ATTENTION" --steps 3 --repeats 2 \
  --out "$RESULTS/train.jsonl" "${@:2}" || echo "train ${*:2}: failed or timed out"; }

# Headline: training at batch 8 × 1024 (remat that keeps weight-matmul outputs; the reference checkpoints).
train 240 --batch 8 --remat dots_no_batch --ref
# Sampling, bf16 weights, batch 1 and 16 (ours, then transformers' generate on the same weights).
(cd bench && timeout 240 python generate_latency.py --shape "$SHAPE" --dtype bfloat16 --repeats 3 --ref \
  --out "$RESULTS/generate.jsonl") || echo "generate: failed or timed out"
# VQ-GAN f16 at batch 64 (taming when importable, else ours alone).
(cd bench && { timeout 120 python vqgan_throughput.py --shape "$VQ_SHAPE" --batch 64 --dtype bfloat16 --repeats 5 --ref \
  --out "$RESULTS/vqgan.jsonl" || timeout 90 python vqgan_throughput.py --shape "$VQ_SHAPE" --batch 64 \
  --dtype bfloat16 --repeats 5 --out "$RESULTS/vqgan.jsonl"; }) || echo "vqgan: failed or timed out"
# The sweep: remat policy and batch size (ours only).
train 120 --batch 8 --remat full
train 120 --batch 8 --remat dots_no_batch --attention xla   # what the fused attention is worth
train 120 --batch 8 --remat dots
train 120 --batch 16 --remat dots_no_batch
# On an 80 GB H100, batch 16 with fp32 Adam moments is over XLA's memory limit and it recomputes matmuls
# (`xla_remat_copies`; `--dry_run --topology h100:1` says so); bf16 first moments fit.
train 120 --batch 16 --remat dots_no_batch --mu_dtype bfloat16

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
