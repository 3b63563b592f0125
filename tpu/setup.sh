#!/usr/bin/env bash
# Set up every worker of a queued resource (idempotent; tpu/run.sh does this on every attempt):
# Python >= 3.11 venv in the code directory, moejax with the tpu extra (jax[tpu] pinned to the tested
# jax) and the gcs extra (gs:// paths), and the persistent XLA compilation cache directory.
set -euo pipefail
# shellcheck source=tpu/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
  cat <<'EOF_USAGE'
usage: bash tpu/setup.sh --name NAME --zone ZONE [--cache-dir DIR] [--dir PATH] [--project P] [--dry-run]

  --cache-dir DIR   compile cache to create and check: gs://BUCKET/jax-cc (kept across preemptions)
                    or a worker path (default .jax-cc under the code directory)
  --dir PATH        code directory on the workers (default moejax, under the worker's home);
                    put the code there first (tpu/deploy.sh)
EOF_USAGE
}

NAME="" ZONE="" CACHE_DIR=.jax-cc DIR=moejax
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --cache-dir) need_value "$@"; CACHE_DIR="$2"; shift 2 ;;
    --dir) need_value "$@"; DIR="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ -n "$NAME" && -n "$ZONE" ]] || die "--name and --zone are required"
check_name --name "$NAME"
check_remote_path --dir "$DIR"
check_cache_dir "$CACHE_DIR"
setup_workers "$NAME" "$ZONE" "$DIR" "$CACHE_DIR"
