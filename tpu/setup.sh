#!/usr/bin/env bash
# Install moejax on every worker of a TPU VM pod slice: bash tpu/setup.sh TPU_NAME ZONE
set -euo pipefail
name=$1 zone=$2
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd ~/moejax && python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . 'jax[tpu]'"
