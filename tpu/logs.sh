#!/usr/bin/env bash
# Show the logs of a tpu/run.sh run: one file per worker, s<slice>-w<worker>.log, collected on the
# launching machine (default ~/moejax-tpu-logs/RUN_ID), kept on every worker (~/moejax-logs/RUN_ID)
# and, with --log-bucket/--bucket, copied to gs://.../RUN_ID after every attempt.
set -euo pipefail
# shellcheck source=tpu/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
  cat <<'EOF_USAGE'
usage: bash tpu/logs.sh RUN_ID [--worker s0-w3] [--follow | --lines N] [--log-dir DIR]
       bash tpu/logs.sh RUN_ID --from-workers --name NAME --zone ZONE [--project P]   # scp them here
       bash tpu/logs.sh RUN_ID --from-bucket gs://BUCKET/tpu-logs                     # copy them here

  RUN_ID          the run (tpu/run.sh --run-id; default there: the queued-resource name)
  --worker W      only this worker's log (s<slice>-w<worker>, e.g. s0-w0: process 0)
  --follow        follow every (or that) worker's log as it grows (tail -F)
  --lines N       last N lines of each log (default 20)
  --log-dir DIR   the local log root (default ~/moejax-tpu-logs)
  --from-workers  fetch ~/moejax-logs/RUN_ID/*.log from every worker into DIR/RUN_ID/workers/
  --from-bucket   fetch gs://.../RUN_ID/ into DIR/RUN_ID/bucket/
EOF_USAGE
}

RUN_ID="" WORKER="" FOLLOW=0 LINES=20 LOG_DIR="$HOME/moejax-tpu-logs" FROM="" NAME="" ZONE="" BUCKET_URI=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    --lines) need_value "$@"; LINES="$2"; shift 2 ;;
    --log-dir) need_value "$@"; LOG_DIR="$2"; shift 2 ;;
    --from-workers) FROM=workers; shift ;;
    --from-bucket) need_value "$@"; FROM=bucket; BUCKET_URI="${2%/}"; shift 2 ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -*) die "unknown option '$1'" ;;
    *) [[ -z "$RUN_ID" ]] || die "one RUN_ID only (got '$RUN_ID' and '$1')"; RUN_ID="$1"; shift ;;
  esac
done
[[ -n "$RUN_ID" ]] || die "give the RUN_ID (tpu/run.sh --run-id, default the queued-resource name)"
check_name RUN_ID "$RUN_ID"
[[ -z "$WORKER" || "$WORKER" =~ ^s[0-9]+-w[0-9]+$ ]] || die "--worker '$WORKER': use s<slice>-w<worker>, e.g. s0-w3"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines '$LINES': give a whole number"
here="$LOG_DIR/$RUN_ID"

case "$FROM" in
  workers)
    [[ -n "$NAME" && -n "$ZONE" ]] || die "--from-workers needs --name and --zone"
    (( DRY_RUN )) || mkdir -p "$here/workers"
    gc compute tpus queued-resources scp "$NAME:moejax-logs/$RUN_ID/*.log" "$here/workers/" \
      --zone="$ZONE" --node=all --worker=all --batch-size=all
    (( DRY_RUN )) && exit 0
    here="$here/workers" ;;
  bucket)
    [[ "$BUCKET_URI" == gs://* ]] || die "--from-bucket '$BUCKET_URI': give a gs:// URI"
    (( DRY_RUN )) || mkdir -p "$here/bucket"
    gc storage cp -r "$BUCKET_URI/$RUN_ID/*" "$here/bucket/"
    (( DRY_RUN )) && exit 0
    here="$here/bucket" ;;
esac

if [[ -n "$WORKER" ]]; then files=("$here/$WORKER.log"); else files=("$here"/s*-w*.log); fi
[[ -e "${files[0]}" ]] || fail "no logs in $here (is the run id right? --log-dir?)"
if (( FOLLOW )); then exec tail -n "$LINES" -F "${files[@]}"; fi
for f in "${files[@]}"; do
  echo "==> ${f##*/} <=="
  tail -n "$LINES" "$f"
done
