#!/usr/bin/env bash
# Run one command on every worker of a TPU VM pod slice: bash tpu/run.sh TPU_NAME ZONE CMD...
set -euo pipefail
name=$1 zone=$2; shift 2
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd ~/moejax && . .venv/bin/activate && $*"
