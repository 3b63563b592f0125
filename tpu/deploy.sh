#!/usr/bin/env bash
# Put the same code at the same path on every worker of a queued resource: a pinned git revision
# cloned/fetched by each worker (--repo, --rev), or this checkout copied over scp (--copy).
# tpu/run.sh does this on every attempt.
set -euo pipefail
# shellcheck source=tpu/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
  cat <<'EOF_USAGE'
usage: bash tpu/deploy.sh --name NAME --zone ZONE (--repo URL [--rev REV] | --copy) [--dir PATH] [--project P] [--dry-run]

  --repo URL   git URL the workers clone; --rev pins a revision (default this checkout's HEAD,
               which must be pushed there)
  --copy       tar this checkout (tracked + untracked files, not ignored ones) and scp it
  --dir PATH   code directory on the workers (default moejax, under the worker's home)
EOF_USAGE
}

NAME="" ZONE="" REPO="" REV="" COPY=0 DIR=moejax
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --repo) need_value "$@"; REPO="$2"; shift 2 ;;
    --rev) need_value "$@"; REV="$2"; shift 2 ;;
    --copy) COPY=1; shift ;;
    --dir) need_value "$@"; DIR="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done
[[ -n "$NAME" && -n "$ZONE" ]] || die "--name and --zone are required"
check_name --name "$NAME"
check_remote_path --dir "$DIR"
if (( COPY )); then
  [[ -z "$REPO$REV" ]] || die "--copy ships this checkout; it does not take --repo or --rev"
  tarball="$(mktemp "${TMPDIR:-/tmp}/moejax-src.XXXXXX")"
  trap 'rm -f "$tarball"' EXIT
  checkout_tarball "$tarball"
  deploy_code "$NAME" "$ZONE" "$DIR" copy "" "" "$tarball"
else
  [[ -n "$REPO" ]] || REPO="$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || true)"
  [[ -n "$REPO" ]] || die "give --repo URL (a git URL the workers can clone), or --copy"
  deploy_code "$NAME" "$ZONE" "$DIR" rev "$(code_rev "$REV")" "$REPO" ""
fi
