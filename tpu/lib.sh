# shellcheck shell=bash
# Shared by tpu/*.sh (sourced, not run): the TPU slice table, quoting, the gcloud wrapper with
# --dry-run, and the steps every script composes (code onto the workers, setup, stop).
# Portable bash (3.2 as on macOS, and newer); the callers set -euo pipefail.

TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TPU_DIR/.." && pwd)"
GCLOUD="${GCLOUD:-gcloud}"          # tests substitute a fake binary
DRY_RUN=0                           # 1: print every command instead of running it
GC_EXEC=0                           # 1: gc replaces the shell (a background job's pid is gcloud's)
PROJECT=""                          # optional --project for every gcloud call
# shellcheck disable=SC2016  # expanded by the worker's shell, not here
REMOTE_LOG_ROOT='"$HOME"/moejax-logs'  # the run logs and pid files on each worker

die() {  # a usage error: the message, then how to get help; exit 2
  echo "$(basename "$0"): $*" >&2
  echo "run 'bash $0 --help' for the options" >&2
  exit 2
}

fail() {  # a runtime failure (not the user's arguments); exit 1
  echo "$(basename "$0"): $*" >&2
  exit 1
}

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# -- TPU slices ----------------------------------------------------------------------------------
# One row per TPU generation, as gcloud names its accelerator types (FAMILY-N):
#   family      N counts   chips/host   largest single-host slice (chips)   default runtime version
# v4 and v5p count TensorCores (2 per chip: v5p-64 = 32 chips); v5e (v5litepod) and v6e count chips.
# Multi-host slices have 4 chips per host: v5p-64 = 32 chips = 8 hosts, v5litepod-16 = 4 hosts,
# while v5litepod-8 and v6e-8 are one 8-chip host.
TPU_TABLE="\
v4          cores 4 4 tpu-ubuntu2204-base
v5p         cores 4 4 v2-alpha-tpuv5
v5litepod   chips 4 8 v2-alpha-tpuv5-lite
v6e         chips 4 8 v2-alpha-tpuv6e"

tpu_row() {  # the table row of an accelerator type like v5p-64 (dies on an unknown family)
  local family="${1%-*}" row
  row="$(printf '%s\n' "$TPU_TABLE" | awk -v f="$family" '$1 == f')"
  [[ -n "$row" && "$1" == *-* ]] || die "unknown accelerator type '$1': use one of" \
    "$(printf '%s\n' "$TPU_TABLE" | awk '{printf "%s-N ", $1}')(e.g. v5p-64, v5litepod-16, v6e-32)"
  printf '%s\n' "$row"
}

slice_chips() {  # chips in one slice of an accelerator type: v5p-64 -> 32
  local n="${1##*-}" unit
  [[ "$n" =~ ^[0-9]+$ && "$n" -gt 0 ]] || die "accelerator type '$1' must end in a size, e.g. v5p-64"
  unit="$(tpu_row "$1")" || exit 2
  unit="$(echo "$unit" | awk '{print $2}')"
  if [[ "$unit" == cores ]]; then
    (( n % 2 == 0 )) || die "accelerator type '$1': ${1%-*} counts TensorCores (2 per chip), so the size must be even"
    echo $(( n / 2 ))
  else
    echo "$n"
  fi
}

slice_hosts() {  # TPU VM hosts (workers) in one slice: v5p-64 -> 8, v5litepod-8 -> 1
  local chips per_host single
  chips="$(slice_chips "$1")" || exit 2
  read -r per_host single <<<"$(tpu_row "$1" | awk '{print $3, $4}')"
  if (( chips <= single )); then echo 1; return; fi
  (( chips % per_host == 0 )) || die "accelerator type '$1': $chips chips is not a whole number of $per_host-chip hosts"
  echo $(( chips / per_host ))
}

default_runtime() {  # v5p-64 -> v2-alpha-tpuv5
  local row
  row="$(tpu_row "$1")" || exit 2
  echo "$row" | awk '{print $5}'
}

# -- quoting and gcloud ----------------------------------------------------------------------------
shquote() {  # one word, quoted for a POSIX shell only where needed (readable dry-run output)
  case "$1" in
    '') printf "''" ;;
    *[!A-Za-z0-9_./:=@%+,-]*) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
    *) printf '%s' "$1" ;;
  esac
}

quote_cmd() {  # a command line a shell would run as exactly these words
  local out="" word
  for word in "$@"; do out="$out${out:+ }$(shquote "$word")"; done
  printf '%s\n' "$out"
}

gc() {  # gcloud with the common flags, or (under --dry-run) the exact command line it would run
  local cmd=("$GCLOUD" "$@")
  [[ -n "$PROJECT" ]] && cmd+=("--project=$PROJECT")
  if (( DRY_RUN )); then quote_cmd "${cmd[@]}"; return 0; fi
  if (( GC_EXEC )); then exec "${cmd[@]}"; fi
  "${cmd[@]}"
}

qr_ssh() {  # qr_ssh NAME ZONE NODE WORKER REMOTE_COMMAND: run a shell command on TPU workers
  local batch=()
  [[ "$4" == all ]] && batch=(--batch-size=all)   # every worker at once, not 64 at a time
  gc compute tpus queued-resources ssh "$1" --zone="$2" --node="$3" --worker="$4" \
    ${batch[@]+"${batch[@]}"} --command "$5"
}

# -- argument checks --------------------------------------------------------------------------------
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }

check_name() {  # a queued-resource / run name gcloud accepts and no shell needs quoting for
  [[ "$2" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "$1 '$2': use lowercase letters, digits and '-'"
}

check_remote_path() {  # a worker path used unquoted in remote commands (relative = under $HOME)
  [[ "$2" =~ ^[A-Za-z0-9_./-]+$ ]] || die "$1 '$2': use letters, digits and ._/- (a relative path is under the worker's home)"
}

check_cache_dir() {  # gs://..., or a worker path (relative = under the code directory)
  [[ "$1" =~ ^gs://[a-z0-9][-a-z0-9_.]*(/[A-Za-z0-9_./=-]*)?$ || "$1" =~ ^[A-Za-z0-9_./-]+$ ]] \
    || die "--cache-dir '$1': give a gs:// URI or a path on the workers (letters, digits, ._/-)"
}

# -- the code on every worker ------------------------------------------------------------------------
code_rev() {  # the commit to pin: --rev (any git revision) resolved here, default HEAD
  git -C "$REPO_ROOT" rev-parse --verify --quiet "${1:-HEAD}^{commit}" \
    || die "--rev '${1:-HEAD}' is not a commit in $REPO_ROOT"
}

remote_git_checkout() {  # the worker command that clones/fetches URL into DIR and checks out REV
  local url="$1" dir="$2" rev="$3" q_url
  q_url="$(shquote "$url")"
  printf '%s' "set -e; if [ ! -d $dir/.git ]; then git clone -q $q_url $dir; fi; cd $dir; " \
    "git remote set-url origin $q_url; git fetch -q origin $rev || git fetch -q origin; " \
    "git checkout -q --force --detach $rev; git log -1 --format='code at %H %s'"
}

checkout_tarball() {  # tar the working tree (tracked + untracked, not ignored) into FILE
  local file="$1"
  if (( DRY_RUN )); then
    echo "(cd $(shquote "$REPO_ROOT") && git ls-files -z -co --exclude-standard | xargs -0 tar czf $(shquote "$file") --)"
    return 0
  fi
  (cd "$REPO_ROOT" && git ls-files -z -co --exclude-standard \
    | while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done \
    | xargs -0 tar czf "$file" --)
}

deploy_code() {  # deploy_code NAME ZONE DIR MODE(rev|copy) REV URL TARBALL: same code, same path, all workers
  local name="$1" zone="$2" dir="$3" mode="$4" rev="$5" url="$6" tarball="$7"
  if [[ "$mode" == rev ]]; then
    qr_ssh "$name" "$zone" all all "$(remote_git_checkout "$url" "$dir" "$rev")"
  else
    gc compute tpus queued-resources scp "$tarball" "$name:moejax-src.tgz" --zone="$zone" \
      --node=all --worker=all --batch-size=all
    qr_ssh "$name" "$zone" all all "set -e; mkdir -p $dir; tar xzf moejax-src.tgz -C $dir; rm moejax-src.tgz"
  fi
}

# -- setup on every worker ------------------------------------------------------------------------------
remote_setup() {  # the idempotent worker command: python>=3.11 venv, moejax[tpu], the compile cache dir
  # (';' not '&&' between steps: under set -e a failure inside an && list does not stop the shell)
  # (the Ubuntu 22.04 TPU images ship Python 3.10: apt installs 3.11, waiting out first-boot upgrades)
  local dir="$1" cache="$2" q_cache
  q_cache="$(shquote "$cache")"
  printf '%s' "set -e; cd $dir; " \
    "py=\$(for v in 3.11 3.12 3.13; do command -v python\$v && break; done || true); " \
    "if [ -z \"\$py\" ] || ! \$py -c 'import ensurepip' 2>/dev/null; then " \
    "sudo apt-get -qq -o DPkg::Lock::Timeout=600 update; sudo apt-get -qq -o DPkg::Lock::Timeout=600 install -y python3.11 python3.11-venv; py=python3.11; fi; " \
    "[ -x .venv/bin/python ] || \$py -m venv .venv; . .venv/bin/activate; " \
    "stamp=.venv/.moejax-setup-\$(cat pyproject.toml | sha256sum | cut -c1-16); " \
    "if [ ! -e \$stamp ]; then pip install -q -U pip; pip install -q -e '.[tpu,gcs]'; touch \$stamp; fi; " \
    "python -c 'import sys; from etils import epath; p = epath.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True); print(\"compile cache:\", p)' $q_cache"
}

setup_workers() {  # setup_workers NAME ZONE DIR CACHE_DIR
  qr_ssh "$1" "$2" all all "$(remote_setup "$3" "$4")"
}

# -- stopping a run ------------------------------------------------------------------------------------
remote_stop() {  # the worker command: SIGTERM the run's process groups (they save), SIGKILL after GRACE s
  local grace="$2" logs="$REMOTE_LOG_ROOT/$1"
  printf '%s' "for f in $logs/*.pid; do [ -e \"\$f\" ] && kill -TERM -- -\$(cat \"\$f\") 2>/dev/null; done; " \
    "for i in \$(seq $grace); do alive=0; for f in $logs/*.pid; do [ -e \"\$f\" ] && kill -0 -- -\$(cat \"\$f\") 2>/dev/null && alive=1; done; [ \$alive = 0 ] && break; sleep 1; done; " \
    "for f in $logs/*.pid; do [ -e \"\$f\" ] && kill -KILL -- -\$(cat \"\$f\") 2>/dev/null; rm -f \"\$f\"; done; true"
}

stop_workers() {  # stop_workers NAME ZONE RUN GRACE: stop the run on every worker of the slice(s)
  qr_ssh "$1" "$2" all all "$(remote_stop "$3" "$4")"
}
