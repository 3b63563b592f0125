#!/usr/bin/env bash
# Stop a run on every worker (SIGTERM: each process saves a checkpoint; SIGKILL after --grace s),
# and/or delete the queued resource with its TPU VMs (billing stops only then).
# Stop tpu/run.sh itself first (Ctrl-C in its terminal also stops the workers), or it will rerun.
set -euo pipefail
# shellcheck source=tpu/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
  cat <<'EOF_USAGE'
usage: bash tpu/stop.sh --name NAME --zone ZONE [--run-id ID] [--grace S] [--delete] [--project P] [--dry-run]

  --run-id ID   the run to stop (default NAME, as tpu/run.sh names it)
  --grace S     seconds to wait for the checkpoint before SIGKILL (default 120)
  --delete      then delete the queued resource and its VMs
EOF_USAGE
}

NAME="" ZONE="" RUN_ID="" GRACE=120 DELETE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --run-id) need_value "$@"; RUN_ID="$2"; shift 2 ;;
    --grace) need_value "$@"; GRACE="$2"; shift 2 ;;
    --delete) DELETE=1; shift ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ -n "$NAME" && -n "$ZONE" ]] || die "--name and --zone are required"
check_name --name "$NAME"
RUN_ID="${RUN_ID:-$NAME}"
check_name --run-id "$RUN_ID"
[[ "$GRACE" =~ ^[0-9]+$ ]] || die "--grace '$GRACE': give a whole number of seconds"
stop_workers "$NAME" "$ZONE" "$RUN_ID" "$GRACE" || (( DELETE )) || exit 1
if (( DELETE )); then
  gc compute tpus queued-resources delete "$NAME" --zone="$ZONE" --force --quiet
fi
