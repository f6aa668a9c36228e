#!/usr/bin/env bash
# Run mmjax on every host of a Cloud TPU pod slice. jax.distributed.initialize() (--distributed)
# finds the coordinator and process ids from the TPU metadata; each host feeds its own shard.
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/coca.py:base --workdir=gs://bucket/run
set -euo pipefail
tpu=$1 zone=$2
shift 2
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd mmjax && python3 -m mmjax.main --distributed $*"
