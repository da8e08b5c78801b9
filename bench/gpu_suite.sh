#!/usr/bin/env bash
# The whole GPU benchmark set in one call (≤ 5 minutes on one H100/H200): training at seq 1024 over remat
# policies and batch sizes, sampling at batch 1 and 16, VQ-GAN encode/decode, each reference once.
# Runs from source (PYTHONPATH), importing only what the GPU machines have. Results append to bench/results/.
#
#   bash bench/gpu_suite.sh 2>&1 | tee bench/results/gpu_suite.log
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:${PYTHONPATH:-}" XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

# Training, 2.8B at seq 1024: the reference once, then our sweep.
python bench/train_throughput.py --shape 2.8b --seq 1024 --batch 8 --remat full --attention cudnn --ref --steps 3 --repeats 2
for remat in dots_no_batch dots; do
  for batch in 8 16; do
    python bench/train_throughput.py --shape 2.8b --seq 1024 --batch $batch --remat $remat --attention cudnn --steps 3 --repeats 2 || true
  done
done

# Sampling (ours vs transformers generate) and the VQ-GAN (ours vs taming, when taming is importable).
python bench/generate_latency.py --shape 2.8b --ref || true
python bench/vqgan_throughput.py --shape f16 --batch 64 --dtype bfloat16 --ref || python bench/vqgan_throughput.py --shape f16 --batch 64 --dtype bfloat16 || true
