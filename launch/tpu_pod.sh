#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: run the same command on every worker; with distributed.coordinator_address=auto,
# jax.distributed finds its peers itself (on TPU VMs from the metadata server; llmcxr_jax.parallel.initialize),
# and each host reads its own slice of the data.
#
#   TPU=my-v5p-64 ZONE=us-east5-a WORKDIR=/mnt/bucket/runs/stage1 DATA_DIR=/mnt/bucket/tfds \
#     bash launch/tpu_pod.sh --config configs/stage1.py --config.init.hf_dir=/mnt/dolly-v2-3b
#
# WORKDIR and DATA_DIR are paths that every worker sees at the same place: a shared filesystem, or a bucket mounted
# on every worker (e.g. `gcsfuse --implicit-dirs BUCKET /mnt/bucket`). Checkpoints, TensorBoard events and the
# tokenizer are written through local paths, so a gs:// workdir is refused.
# The repository must already be on every worker (e.g. `gcloud ... ssh --worker=all --command "git clone ..."`)
# with `pip install -e '.[data,tpu]'` done there. Extra arguments go to llmcxr_jax.train, or to the VQ-GAN trainer
# with MODULE=llmcxr_jax.train_vqgan.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
REPO_DIR=${REPO_DIR:-llmcxr-jax}
MODULE=${MODULE:-llmcxr_jax.train}
# Every value is %q-quoted: the remote shell would split a path with spaces into several arguments. The user's
# arguments come first: ml_collections refuses a --config.* override before --config itself.
ARGS=$(printf ' %q' "$@")
DATA_FLAG=${DATA_DIR:+$(printf '%q' "--config.data.data_dir=$DATA_DIR")}
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd $(printf '%q' "$REPO_DIR") && JAX_PLATFORMS=tpu python -m $MODULE $ARGS --workdir $(printf '%q' "$WORKDIR") \
   --config.distributed.coordinator_address=auto $DATA_FLAG"
