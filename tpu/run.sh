#!/usr/bin/env bash
# Run one experiment on a TPU pod slice from a queued resource, and keep it running through
# preemptions: create the slice (or reuse it), put the same code on every worker, set up, run the
# command on every worker with --distributed, collect each worker's log; on a non-zero exit or a
# preempted slice, stop what is left, recreate the slice and rerun the same command, which resumes
# from the checkpoint in its gs:// workdir. --dry-run prints the exact commands, one line per worker.
set -euo pipefail
# shellcheck source=tpu/lib.sh
. "$(dirname "$0")/lib.sh"

usage() {
  cat <<'EOF'
usage: bash tpu/run.sh --name NAME --zone ZONE --type TYPE [options] -- COMMAND...

  COMMAND runs on every worker in the code directory with the venv active, e.g.
    python -m experiments.pretrain --preset tpu-v5p-64 --workdir gs://BUCKET/runs/pretrain
  (--distributed is appended when missing; use a gs:// --workdir so every attempt resumes from it).

slice
  --name NAME             queued-resource name (lowercase, digits, '-'); its nodes are NAME or NAME-0..N-1
  --zone ZONE             e.g. us-east5-a (v5p), us-west4-a (v5e), us-east1-d (v6e)
  --type TYPE             accelerator type per slice: v5p-64, v4-32, v5litepod-16, v6e-32, ...
  --slices N              multislice: N slices of TYPE over DCN (--node-count N; default 1)
  --spot | --best-effort | --reserved
                          capacity: Spot (preemptible, GA gcloud), best-effort (preemptible, gcloud
                          alpha) or a reservation; default on-demand
  --runtime-version V     TPU VM image (default per generation, e.g. v2-alpha-tpuv5 for v5p)
  --project P             GCP project (default: gcloud's configured project)
  --no-create             use an existing ACTIVE queued resource; never create or recreate it
  --create-flag FLAG      extra flag for queued-resources create (repeatable), e.g.
                          --create-flag=--service-account=SA --create-flag=--reservation-host-project=P

code (the same revision at the same path on every worker)
  --repo URL              git URL the workers clone (https with a token, or a public repo)
  --rev REV               revision to pin (default: this checkout's HEAD, resolved to a commit)
  --copy                  instead of git: tar this checkout (tracked + untracked, not ignored) and scp it
  --dir PATH              code directory on the workers (default moejax, under the worker's home)

run
  --bucket gs://B         defaults --cache-dir gs://B/jax-cc and --log-bucket gs://B/tpu-logs
  --cache-dir DIR         persistent XLA compilation cache (gs://, or a worker path; relative = under
                          the code directory), given to the command as JAX_COMPILATION_CACHE_DIR
                          (default .jax-cc: on the boot disk, lost when a preempted VM is deleted)
  --env KEY=VALUE         extra environment for the command (repeatable)
  --run-id ID             names the logs (default: NAME)
  --log-dir DIR           local directory for the logs (default ~/moejax-tpu-logs); each worker's
                          stdout+stderr goes to DIR/ID/s<slice>-w<worker>.log here and on the worker
  --log-bucket gs://...   also copy the logs to gs://.../ID/ after every attempt
  --max-restarts N        reruns after a preemption or failure before giving up (default 50)
  --grace S               after the first worker fails, seconds the others get before being
                          stopped (default 300)
  --poll S                seconds between queued-resource state checks (default 60)
  --delete-when-done      delete the queued resource after the command succeeds
  --dry-run               print the commands (one line per worker) and exit
EOF
}

NAME="" ZONE="" TYPE="" SLICES=1 CAPACITY="" RUNTIME="" NO_CREATE=0
REPO="" REV="" COPY=0 DIR=moejax
BUCKET="" CACHE_DIR="" RUN_ID="" LOG_DIR="$HOME/moejax-tpu-logs" LOG_BUCKET=""
MAX_RESTARTS=50 GRACE=300 POLL=60 DELETE_WHEN_DONE=0 ATTEMPT=0
EXTRA_ENV=() CREATE_FLAGS=() CMD=()
POLL_WORKERS_S="${MOEJAX_TPU_POLL_WORKERS_S:-5}"  # seconds between checks on the workers' ssh

parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --name) need_value "$@"; NAME="$2"; shift 2 ;;
      --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
      --type) need_value "$@"; TYPE="$2"; shift 2 ;;
      --slices) need_value "$@"; SLICES="$2"; shift 2 ;;
      --spot|--best-effort|--reserved)
        [[ -z "$CAPACITY" ]] || die "give at most one of --spot, --best-effort, --reserved"
        CAPACITY="${1#--}"; shift ;;
      --runtime-version) need_value "$@"; RUNTIME="$2"; shift 2 ;;
      --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
      --no-create) NO_CREATE=1; shift ;;
      --create-flag) [[ $# -ge 2 && "$2" == --* ]] || die "--create-flag needs a gcloud flag, e.g. --create-flag=--spot"
                     CREATE_FLAGS+=("$2"); shift 2 ;;
      --create-flag=*) CREATE_FLAGS+=("${1#--create-flag=}"); shift ;;
      --repo) need_value "$@"; REPO="$2"; shift 2 ;;
      --rev) need_value "$@"; REV="$2"; shift 2 ;;
      --copy) COPY=1; shift ;;
      --dir) need_value "$@"; DIR="$2"; shift 2 ;;
      --bucket) need_value "$@"; BUCKET="${2%/}"; shift 2 ;;
      --cache-dir) need_value "$@"; CACHE_DIR="$2"; shift 2 ;;
      --env) need_value "$@"; [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$2': use KEY=VALUE"
             EXTRA_ENV+=("$2"); shift 2 ;;
      --run-id) need_value "$@"; RUN_ID="$2"; shift 2 ;;
      --log-dir) need_value "$@"; LOG_DIR="$2"; shift 2 ;;
      --log-bucket) need_value "$@"; LOG_BUCKET="${2%/}"; shift 2 ;;
      --max-restarts) need_value "$@"; MAX_RESTARTS="$2"; shift 2 ;;
      --grace) need_value "$@"; GRACE="$2"; shift 2 ;;
      --poll) need_value "$@"; POLL="$2"; shift 2 ;;
      --delete-when-done) DELETE_WHEN_DONE=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; CMD=("$@"); break ;;
      *) die "unknown option '$1' (the command goes after --)" ;;
    esac
  done
}

check_args() {
  [[ -n "$NAME" ]] || die "--name is required"
  [[ -n "$ZONE" ]] || die "--zone is required"
  [[ -n "$TYPE" ]] || die "--type is required (e.g. v5p-64)"
  [[ ${#CMD[@]} -gt 0 ]] || die "give the command after --, e.g. -- python -m experiments.pretrain --preset tpu-v5p-64 --workdir gs://BUCKET/runs/x"
  check_name --name "$NAME"
  RUN_ID="${RUN_ID:-$NAME}"
  check_name --run-id "$RUN_ID"
  check_remote_path --dir "$DIR"
  local n
  for n in SLICES MAX_RESTARTS GRACE POLL; do
    [[ "${!n}" =~ ^[0-9]+$ ]] || die "--$(echo "$n" | tr 'A-Z_' 'a-z-') '${!n}': give a whole number"
  done
  (( SLICES >= 1 )) || die "--slices must be at least 1"
  HOSTS="$(slice_hosts "$TYPE")" || exit 2
  [[ -n "$RUNTIME" ]] || RUNTIME="$(default_runtime "$TYPE")" || exit 2
  [[ -z "$BUCKET" || "$BUCKET" == gs://* ]] || die "--bucket '$BUCKET': give a gs:// URI"
  [[ -z "$LOG_BUCKET" || "$LOG_BUCKET" == gs://* ]] || die "--log-bucket '$LOG_BUCKET': give a gs:// URI"
  if [[ -n "$BUCKET" ]]; then
    CACHE_DIR="${CACHE_DIR:-$BUCKET/jax-cc}"
    LOG_BUCKET="${LOG_BUCKET:-$BUCKET/tpu-logs}"
  fi
  if [[ -z "$CACHE_DIR" ]]; then CACHE_DIR=.jax-cc; CACHE_DIR_DEFAULTED=1; fi
  check_cache_dir "$CACHE_DIR"
  if (( COPY )); then
    [[ -z "$REPO$REV" ]] || die "--copy ships this checkout; it does not take --repo or --rev"
  else
    [[ -n "$REPO" ]] || REPO="$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || true)"
    [[ -n "$REPO" ]] || die "give --repo URL (a git URL the workers can clone), or --copy to scp this checkout"
    REV="$(code_rev "$REV")"
  fi
  local word
  for word in "${CMD[@]}"; do [[ "$word" == --distributed ]] && return 0; done
  CMD+=(--distributed)
}

# -- the queued resource -------------------------------------------------------------------------------
qr_state() {  # ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ... or NOT_FOUND; UNKNOWN on other errors
  local out
  if out="$(gc compute tpus queued-resources describe "$NAME" --zone="$ZONE" \
      --format='value(state.state)' 2>&1)"; then
    echo "${out:-UNKNOWN}"
  elif [[ "$out" == *NOT_FOUND* || "$out" == *"not found"* ]]; then
    echo NOT_FOUND
  else
    log "describe $NAME failed: $out"
    echo UNKNOWN
  fi
}

create_args() {  # the words of the queued-resource create command
  local track=()
  [[ "$CAPACITY" == best-effort ]] && track=(alpha)   # --best-effort is in gcloud alpha only
  local words=(${track[@]+"${track[@]}"} compute tpus queued-resources create "$NAME" --zone="$ZONE"
               --accelerator-type="$TYPE" --runtime-version="$RUNTIME")
  if (( SLICES > 1 )); then
    words+=(--node-count="$SLICES" --node-prefix="$NAME")   # nodes NAME-0 .. NAME-(N-1)
  else
    words+=(--node-id="$NAME")
  fi
  [[ -n "$CAPACITY" ]] && words+=("--$CAPACITY")
  printf '%s\n' "${words[@]}" ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}
}

create_slice() {  # a failure is fatal on the first attempt (arguments, quota), retried later
  local words=() w
  while IFS= read -r w; do words+=("$w"); done < <(create_args)
  log "creating queued resource $NAME: $SLICES x $TYPE ($HOSTS host(s) each), ${CAPACITY:-on-demand}"
  gc "${words[@]}" && return 0
  (( ATTEMPT > 1 )) || fail "could not create queued resource $NAME (see gcloud's message above)"
  log "could not create queued resource $NAME; trying again in ${POLL}s"
}

delete_slice() {
  log "deleting queued resource $NAME (and its TPU VMs)"
  gc compute tpus queued-resources delete "$NAME" --zone="$ZONE" --force --quiet || true
}

ensure_active() {  # wait until the slice is ACTIVE, creating or recreating it as needed
  local state
  while :; do
    state="$(qr_state)"
    case "$state" in
      ACTIVE) return 0 ;;
      NOT_FOUND)
        (( NO_CREATE )) && fail "queued resource $NAME does not exist (--no-create)"
        create_slice ;;
      SUSPENDED|SUSPENDING|FAILED)
        (( NO_CREATE )) && fail "queued resource $NAME is $state (--no-create: not recreating it)"
        delete_slice ;;
      *) log "queued resource $NAME is $state; checking again in ${POLL}s" ;;
    esac
    sleep "$POLL"
  done
}

# -- the command on every worker ----------------------------------------------------------------------
prepare_workers() {  # prepare_workers MODE TARBALL: stop a leftover job, code, setup (3 tries: a
  # freshly ACTIVE slice may not take ssh yet)
  local try
  for try in 1 2 3; do
    stop_workers "$NAME" "$ZONE" "$RUN_ID" 60 || true   # an earlier attempt's or launcher's job
    if deploy_code "$NAME" "$ZONE" "$DIR" "$1" "$REV" "$REPO" "$2" \
        && setup_workers "$NAME" "$ZONE" "$DIR" "$CACHE_DIR"; then return 0; fi
    (( try == 3 )) || { log "code/setup failed (try $try of 3); again in ${POLL}s"; sleep "$POLL"; }
  done
  return 1
}

worker_log() { echo "s$1-w$2"; }  # s<slice>-w<worker>: the name of that worker's log and pid files

worker_env() {  # the environment worker (slice $1, worker $2) runs the command with
  printf '%s\n' "JAX_COMPILATION_CACHE_DIR=$CACHE_DIR" "MOEJAX_RUN_ID=$RUN_ID" \
    "MOEJAX_SLICE=$1" "MOEJAX_WORKER=$2" ${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}
}

worker_command() {  # the shell command for worker (slice $1, worker $2): env, log, pid, exit status
  # The pid file names the ssh shell, whose process group remote_stop signals. The shell outlives a
  # SIGTERM (trap) to report the command's exit status; tee ignores it and keeps writing the worker's
  # log while the command saves its checkpoint, and (-p) also after the launcher's ssh goes away.
  local logs="$REMOTE_LOG_ROOT/$RUN_ID" file env=() line
  file="$(worker_log "$1" "$2")"
  while IFS= read -r line; do env+=("$line"); done < <(worker_env "$1" "$2")
  printf '%s' "cd $DIR && . .venv/bin/activate && mkdir -p $logs && echo \$\$ > $logs/$file.pid" \
    " && trap true TERM && set -o pipefail && $(quote_cmd env "${env[@]}" "${CMD[@]}") 2>&1" \
    " | (trap '' TERM; exec tee -p -a $logs/$file.log); rc=\$?; rm -f $logs/$file.pid; exit \$rc"
}

launch_line() {  # the exact gcloud command that runs the job on one worker
  qr_ssh "$NAME" "$ZONE" "$1" "$2" "$(worker_command "$1" "$2")"
}

PIDS=() FILES=() CODES=()

launch_all() {  # start every worker's ssh in the background, output appended to its local log
  local s w file attempt="$1"
  PIDS=() FILES=() CODES=()
  mkdir -p "$LOG_DIR/$RUN_ID"
  for (( s = 0; s < SLICES; s++ )); do
    for (( w = 0; w < HOSTS; w++ )); do
      file="$LOG_DIR/$RUN_ID/$(worker_log "$s" "$w").log"
      echo "=== attempt $attempt, $(date -u +%FT%TZ), slice $s worker $w" >> "$file"
      (GC_EXEC=1; launch_line "$s" "$w") >> "$file" 2>&1 &   # $! is then gcloud itself
      PIDS+=("$!") FILES+=("$file") CODES+=("")
    done
  done
}

wait_all() {  # wait for every worker; once one fails, the rest get GRACE s, then are stopped
  local i left deadline=""
  while :; do
    left=0
    for i in "${!PIDS[@]}"; do
      [[ -n "${CODES[$i]}" ]] && continue
      if kill -0 "${PIDS[$i]}" 2>/dev/null; then left=$((left + 1)); continue; fi
      CODES[i]=0; wait "${PIDS[$i]}" || CODES[i]=$?
      if [[ "${CODES[$i]}" != 0 && -z "$deadline" ]]; then
        log "worker ${FILES[$i]##*/} exited with ${CODES[$i]}; the others get ${GRACE}s"
        deadline=$(( $(date +%s) + GRACE ))
      fi
    done
    (( left == 0 )) && return 0
    if [[ -n "$deadline" ]] && (( $(date +%s) >= deadline )); then
      log "stopping the remaining workers"
      stop_workers "$NAME" "$ZONE" "$RUN_ID" 60 || true
      for i in "${!PIDS[@]}"; do [[ -n "${CODES[$i]}" ]] || kill "${PIDS[$i]}" 2>/dev/null || true; done
      deadline=""
    fi
    sleep "$POLL_WORKERS_S"
  done
}

# moejax prints this when SIGTERM (a preemption notice) stopped it after saving: exit 0, not done
RESUME_MARKER="rerun the command to resume"

attempt_outcome() {  # done | user-error | retry, from the exit codes and this attempt's log lines
  local i code any_fail=0 user_error=0
  for i in "${!CODES[@]}"; do
    code="${CODES[$i]}"
    [[ "$code" == 0 ]] || any_fail=1
    [[ "$code" == 2 ]] && user_error=1   # moejax: a configuration or data error, rerunning won't help
  done
  if (( any_fail == 0 )); then
    for i in "${!FILES[@]}"; do
      if awk '/^=== attempt /{seg=""} {seg = seg $0 "\n"} END{printf "%s", seg}' "${FILES[$i]}" \
          | grep -q "$RESUME_MARKER"; then echo retry; return; fi
    done
    echo "done"; return
  fi
  (( user_error )) && [[ "$(qr_state)" == ACTIVE ]] && { echo user-error; return; }
  echo retry
}

sync_logs() {
  [[ -n "$LOG_BUCKET" ]] || return 0
  gc storage cp -r "$LOG_DIR/$RUN_ID" "$LOG_BUCKET/" || log "could not copy the logs to $LOG_BUCKET"
}

# -- dry run ------------------------------------------------------------------------------------------
print_plan() {
  local s w words=() line code
  echo "# $SLICES x $TYPE: $(slice_chips "$TYPE") chips on $HOSTS host(s) per slice, $((SLICES * HOSTS)) worker(s), runtime $RUNTIME, ${CAPACITY:-on-demand}"
  echo "# 1. queued resource (skipped while $NAME is ACTIVE; recreated after a preemption)"
  while IFS= read -r line; do words+=("$line"); done < <(create_args)
  gc "${words[@]}"
  echo "# 2. wait for ACTIVE (every ${POLL}s)"
  gc compute tpus queued-resources describe "$NAME" --zone="$ZONE" --format='value(state.state)'
  echo "# 3. stop a job left by an earlier attempt or launcher (SIGTERM: it saves; SIGKILL after 60s)"
  stop_workers "$NAME" "$ZONE" "$RUN_ID" 60
  if (( COPY )); then code="this checkout (tar + scp)"; else code="$REV from $REPO"; fi
  echo "# 4. code: $code, in $DIR on every worker (a relative path is under the worker's home)"
  if (( COPY )); then checkout_tarball "$LOG_DIR/.$RUN_ID-src.tgz"; fi
  deploy_code "$NAME" "$ZONE" "$DIR" "$([[ $COPY == 1 ]] && echo copy || echo rev)" "$REV" "$REPO" "$LOG_DIR/.$RUN_ID-src.tgz"
  echo "# 5. setup (idempotent): venv, moejax[tpu], compile cache $CACHE_DIR"
  setup_workers "$NAME" "$ZONE" "$DIR" "$CACHE_DIR"
  echo "# 6. run: one line per worker; output to $LOG_DIR/$RUN_ID/s<slice>-w<worker>.log here and ~/moejax-logs/$RUN_ID/ there"
  for (( s = 0; s < SLICES; s++ )); do
    for (( w = 0; w < HOSTS; w++ )); do launch_line "$s" "$w"; done
  done
  if [[ -n "$LOG_BUCKET" ]]; then echo "# 7. after every attempt: the logs to $LOG_BUCKET"; sync_logs; fi
  echo "# after a failure or preemption (at most $MAX_RESTARTS times): recreate the slice if it is gone, repeat 2-7"
  if (( DELETE_WHEN_DONE )); then echo "# when done"; delete_slice 2>/dev/null; fi
}

# -- main ----------------------------------------------------------------------------------------------
on_signal() {
  log "interrupted: stopping the job on every worker (it saves a checkpoint); the slice stays"
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do kill "$pid" 2>/dev/null || true; done
  stop_workers "$NAME" "$ZONE" "$RUN_ID" 120 || true
  sync_logs
  exit 130
}

main() {
  parse_args "$@"
  check_args
  if (( DRY_RUN )); then print_plan; return 0; fi
  [[ "${CACHE_DIR_DEFAULTED:-0}" == 1 ]] && log "compile cache on the workers' boot disks ($CACHE_DIR), lost with the VMs; pass --bucket or --cache-dir gs://... to keep it"
  mkdir -p "$LOG_DIR/$RUN_ID"
  local tarball="$LOG_DIR/.$RUN_ID-src.tgz" mode=rev outcome
  if (( COPY )); then mode=copy; checkout_tarball "$tarball"; fi   # one snapshot for every attempt
  trap on_signal INT TERM
  while :; do
    ATTEMPT=$((ATTEMPT + 1))
    ensure_active
    log "attempt $ATTEMPT on $NAME: code, setup, then $((SLICES * HOSTS)) worker(s)"
    if prepare_workers "$mode" "$tarball"; then
      launch_all "$ATTEMPT"
      wait_all
      outcome="$(attempt_outcome)"
    else
      (( ATTEMPT > 1 )) || fail "putting the code on the workers or setting them up failed (see above)"
      outcome=retry
    fi
    sync_logs
    case "$outcome" in
      done)
        log "done: logs in $LOG_DIR/$RUN_ID"
        (( DELETE_WHEN_DONE )) && delete_slice
        return 0 ;;
      user-error) fail "the command failed with a configuration/data error (exit 2); see $LOG_DIR/$RUN_ID" ;;
    esac
    (( ATTEMPT <= MAX_RESTARTS )) || fail "giving up after $MAX_RESTARTS restarts; see $LOG_DIR/$RUN_ID"
    log "attempt $ATTEMPT did not finish (exit codes: ${CODES[*]:-none}); rerunning, it resumes from its checkpoint"
  done
}

main "$@"
