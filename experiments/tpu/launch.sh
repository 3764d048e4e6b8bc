#!/usr/bin/env bash
# Launch a dromedary_jax command on every worker of a Cloud TPU VM / pod slice, detached.
#
#   experiments/tpu/launch.sh --name dromedary --zone us-central2-b --accelerator v4-256 \
#       [--project P] [--version RUNTIME] [--python 3.11] [--log_dir DIR] [--spot] [--wait] \
#       [--dry_run] -- python -m dromedary_jax.run --config configs/dromedary_65b.py --workdir /mnt/runs/run1
#
# 1. creates the TPU VM / slice if it does not exist; reuses it when READY, starts it when
#    STOPPED, deletes and re-creates it when PREEMPTED or TERMINATED (spot slices).
# 2. copies this checkout (HEAD plus uncommitted changes to tracked files; untracked files are
#    NOT copied) to every worker and installs it with jax[tpu] into ~/dromedary_jax_venv, a
#    Python 3.11 virtual environment built with uv: the TPU VM images ship Python 3.10, which
#    jax 0.10 / flax 0.12 do not support. A worker whose run is still going is left as it is.
# 3. starts the command after `--` on all workers at once, DETACHED (nohup + setsid): it keeps
#    running when this ssh connection drops. Each worker appends its output to
#    LOG_DIR/NAME-<hostname>.log (LOG_DIR: --log_dir, default ~/dromedary_logs on the worker's
#    disk; a folder on the shared --workdir mount keeps the logs across a re-created slice).
#    jax.distributed initialises itself from the TPU environment (DROMEDARY_DISTRIBUTED=auto).
#    The script ends by printing the commands that follow the log and stop the run. While a
#    run goes on, launching the same command again changes nothing; another one is refused.
#    --wait: follow worker 0's log until the run ends and exit with its status (for scripts,
#    e.g. the ablation sweep's --launcher); a dropped connection ends the following, not the run.
# To resume after a preemption, a crash or a stop: run the same command again. The pipeline
# skips finished stages and ids and restores the last training checkpoint from --workdir.
#
# --version defaults to the runtime Google documents for JAX on the accelerator:
# tpu-ubuntu2204-base (v2, v3, v4), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv5-lite (v5litepod),
# v2-alpha-tpuv6e (v6e). With --dry_run the gcloud commands are printed, not run. --workdir must
# be a folder every worker sees (a Filestore share or a gcsfuse-mounted bucket), not a gs:// URL.
set -euo pipefail
# Internal: the same file runs on the workers with --worker_setup / --worker_start / --worker_job
# / --worker_running (see the worker_* functions); those modes are not part of the usage above.

REMOTE_DIR="dromedary_jax"            # the code, under the worker's home
VENV_DIR="dromedary_jax_venv"         # the Python environment, under the worker's home
JAX_SPEC="jax[tpu]>=0.10,<0.11"       # the range setup.py pins

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

die() {
  echo "error: $*" >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------
# Worker side: these run ON a TPU worker, from the copy of this file in ~/dromedary_jax.

pid_alive() {
  # pid_alive PIDFILE: the job recorded there is still running (not just any process that
  # reuses its pid after a reboot).
  local pid
  [[ -s "$1" ]] || return 1
  pid="$(cat "$1")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
    && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- '--worker_job'
}

worker_files() {
  # worker_files NAME LOG_DIR: sets LOG, PIDFILE, EXITFILE, CMDFILE for this worker.
  local dir="${2:-$HOME/dromedary_logs}"
  local host
  host="$(hostname)"
  mkdir -p "$dir"
  LOG="$dir/$1-$host.log"
  PIDFILE="$dir/$1-$host.pid"
  EXITFILE="$dir/$1-$host.exit"
  CMDFILE="$dir/$1-$host.cmd"
}

worker_setup() {
  # worker_setup PYTHON_VERSION: uv, that Python, the venv, and the package with jax[tpu].
  local py="$1" venv="$HOME/$VENV_DIR"
  export PATH="$HOME/.local/bin:$PATH"
  if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --user -q --disable-pip-version-check 'uv>=0.5' \
      || curl -LsSf https://astral.sh/uv/install.sh | sh
  fi
  uv python install "$py"
  if ! "$venv/bin/python" -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$py')" 2>/dev/null; then
    rm -rf "$venv"
    uv venv --python "$py" "$venv"
  fi
  uv pip install -q --python "$venv/bin/python" "$JAX_SPEC" -e "$HOME/$REMOTE_DIR"
  "$venv/bin/python" -c "import sys, jax; print('$(hostname): Python', sys.version.split()[0], '| jax', jax.__version__)"
}

worker_start() {
  # worker_start NAME LOG_DIR -- COMMAND...: start COMMAND detached unless it is still running.
  # The same command still running is left alone (exit 0); another one is refused (exit 3).
  local name="$1" cmd
  worker_files "$1" "$2"
  shift 2
  [[ "${1:-}" == "--" ]] && shift
  printf -v cmd ' %q' "$@"
  if pid_alive "$PIDFILE"; then
    if [[ "$(cat "$CMDFILE" 2>/dev/null)" != "$cmd" ]]; then
      echo "$(hostname): another command is still running on '$name' (pid $(cat "$PIDFILE")):$(cat "$CMDFILE" 2>/dev/null)" >&2
      return 3
    fi
    echo "$(hostname): this command is still running (pid $(cat "$PIDFILE")): not started again"
    return 0
  fi
  rm -f "$PIDFILE" "$EXITFILE"
  echo "$cmd" >"$CMDFILE"
  printf '=== %s %s start:%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(hostname)" "$cmd" >>"$LOG"
  cd "$HOME/$REMOTE_DIR"
  PATH="$HOME/$VENV_DIR/bin:$PATH" PYTHONUNBUFFERED=1 \
    nohup setsid bash "$SELF" --worker_job "$PIDFILE" "$EXITFILE" -- "$@" >>"$LOG" 2>&1 </dev/null &
  local _
  for _ in $(seq 100); do
    [[ -s "$PIDFILE" ]] && break
    sleep 0.1
  done
  echo "$(hostname): started (pid $(cat "$PIDFILE" 2>/dev/null || echo '?')), log $LOG"
}

worker_job() {
  # worker_job PIDFILE EXITFILE -- COMMAND...: the detached job (its own session and process
  # group): record the pid, run COMMAND, record its exit status.
  local pidfile="$1" exitfile="$2" rc=0
  shift 2
  [[ "${1:-}" == "--" ]] && shift
  echo "$$" >"$pidfile"
  trap 'echo "=== SIGTERM: stopping"' TERM   # a command trap: COMMAND still gets the default
  "$@" || rc=$?
  echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) exit status $rc"
  echo "$rc" >"$exitfile"
  return "$rc"
}

worker_main() {
  SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
  case "$1" in
    --worker_setup) worker_setup "$2" ;;
    --worker_start) shift; worker_start "$@" ;;
    --worker_job) shift; worker_job "$@" ;;
    --worker_running) worker_files "$2" "${3:-}"; pid_alive "$PIDFILE" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Launcher side: runs where gcloud is.

quote() {
  # Print the arguments as a line a shell reads back (plain words bare, others single-quoted).
  local a out=""
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
      out+=" $a"
    elif [[ "$a" != *"'"* ]]; then
      out+=" '$a'"
    else
      out+=" $(printf '%q' "$a")"
    fi
  done
  printf '%s\n' "${out# }"
}

run() {
  # Print a command, quoted so that it can be pasted; run it unless --dry_run.
  printf '+ %s\n' "$(quote "$@")"
  if [[ "$DRY_RUN" -eq 0 ]]; then
    "$@"
  fi
}

default_version() {
  case "$1" in
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

launcher_main() {
  local ARGS=() a
  for a in "$@"; do   # the command line minus --dry_run: what resumes the run
    [[ "$a" == --dry_run || "$a" == --dry-run ]] || ARGS+=("$a")
  done
  NAME=""
  ZONE=""
  ACCELERATOR=""
  PROJECT=""
  VERSION=""
  PYTHON_VERSION="3.11"
  LOG_DIR=""
  SPOT=0
  WAIT=0
  DRY_RUN=0
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) NAME="${2:-}"; shift 2 ;;
      --zone) ZONE="${2:-}"; shift 2 ;;
      --accelerator) ACCELERATOR="${2:-}"; shift 2 ;;
      --project) PROJECT="${2:-}"; shift 2 ;;
      --version) VERSION="${2:-}"; shift 2 ;;
      --python) PYTHON_VERSION="${2:-}"; shift 2 ;;
      --log_dir|--log-dir) LOG_DIR="${2:-}"; shift 2 ;;
      --spot) SPOT=1; shift ;;
      --wait) WAIT=1; shift ;;
      --dry_run|--dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage 0 ;;
      --) shift; break ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
  done

  [[ -n "$NAME" ]] || die "--name is required"
  [[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "--name '$NAME': lower-case letters, digits and '-', starting with a letter"
  [[ -n "$ZONE" ]] || die "--zone is required"
  [[ -n "$ACCELERATOR" ]] || die "--accelerator is required (e.g. v4-256, v5p-128, v5litepod-16)"
  if [[ -z "$VERSION" ]]; then
    VERSION="$(default_version "$ACCELERATOR")" \
      || die "--accelerator '$ACCELERATOR': no default runtime for it, give --version"
  fi
  [[ "$PYTHON_VERSION" =~ ^3\.[0-9]+$ ]] || die "--python '$PYTHON_VERSION': give a version such as 3.11"
  [[ -z "$LOG_DIR" || "$LOG_DIR" == /* ]] || die "--log_dir '$LOG_DIR': give an absolute path"
  [[ $# -gt 0 ]] || die "no command given after '--'"

  local COMMON=(--zone "$ZONE")
  [[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")
  # Paths as the workers' shell reads them: '~' is meant to expand there, not here.
  # shellcheck disable=SC2088
  local RLOG='~/dromedary_logs' RSCRIPT="~/$REMOTE_DIR/experiments/tpu/launch.sh"
  [[ -n "$LOG_DIR" ]] && RLOG="$(printf '%q' "$LOG_DIR")"

  # 1. create, start, re-create or reuse ------------------------------------------------------
  local STATE=""
  if [[ "$DRY_RUN" -eq 1 ]]; then
    echo "# (dry run) the TPU is created only if 'describe' finds none (re-created if PREEMPTED):"
    run gcloud compute tpus tpu-vm describe "$NAME" "${COMMON[@]}" --format='value(state)'
  else
    STATE="$(gcloud compute tpus tpu-vm describe "$NAME" "${COMMON[@]}" --format='value(state)' 2>/dev/null || true)"
  fi
  case "$STATE" in
    READY) echo "# reusing TPU '$NAME' (READY)" ;;
    STOPPED) run gcloud compute tpus tpu-vm start "$NAME" "${COMMON[@]}" ;;
    PREEMPTED|TERMINATED)
      echo "# TPU '$NAME' is $STATE: deleting and re-creating it; the run resumes from --workdir"
      run gcloud compute tpus tpu-vm delete "$NAME" "${COMMON[@]}" --quiet
      STATE="" ;;
    "") ;;
    *) die "TPU '$NAME' is $STATE; run this again once it is READY (or delete it)" ;;
  esac
  if [[ -z "$STATE" ]]; then
    local CREATE_ARGS=(--accelerator-type "$ACCELERATOR" --version "$VERSION")
    [[ "$SPOT" -eq 1 ]] && CREATE_ARGS+=(--spot)
    run gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" "${CREATE_ARGS[@]}"
  fi

  # 2. copy and install on every worker --------------------------------------------------------
  local ROOT TARBALL STASH
  ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
  TARBALL="${TMPDIR:-/tmp}/dromedary_jax.XXXXXX/dromedary_jax.tar.gz"
  if [[ "$DRY_RUN" -eq 0 ]]; then
    PACK_DIR="$(mktemp -d)"
    trap 'rm -rf "$PACK_DIR"' EXIT
    TARBALL="$PACK_DIR/dromedary_jax.tar.gz"
    if [[ -n "$(git -C "$ROOT" ls-files --others --exclude-standard)" ]]; then
      echo "# note: untracked files are not copied (git add them to include them)" >&2
    fi
    STASH="$(git -C "$ROOT" stash create || true)"
    git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" "${STASH:-HEAD}"
  else
    echo "# (dry run) would pack $ROOT into $TARBALL"
  fi
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:dromedary_jax.tar.gz" --worker=all "${COMMON[@]}"
  local INSTALL="if [ -f $RSCRIPT ] && bash $RSCRIPT --worker_running $NAME $RLOG; then"
  INSTALL+=" echo \"\$(hostname): $NAME is running: code and environment left as they are\"; else"
  INSTALL+=" mkdir -p ~/$REMOTE_DIR && tar -xzf ~/dromedary_jax.tar.gz -C ~/$REMOTE_DIR"
  INSTALL+=" && bash $RSCRIPT --worker_setup $PYTHON_VERSION; fi"
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${COMMON[@]}" --command "$INSTALL"

  # 3. start the same command, detached, on all workers ----------------------------------------
  local USER_CMD
  printf -v USER_CMD ' %q' "$@"
  local START="DROMEDARY_DISTRIBUTED=auto bash $RSCRIPT --worker_start $NAME $RLOG --${USER_CMD}"
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${COMMON[@]}" --command "$START"

  local W0=(gcloud compute tpus tpu-vm ssh "$NAME" --worker=0 "${COMMON[@]}" --command)
  local WALL=(gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${COMMON[@]}" --command)
  local FILES="$RLOG/$NAME-\$(hostname)"
  if [[ "$WAIT" -eq 1 ]]; then
    echo "# --wait: following worker 0's log until the run ends (Ctrl-C stops following, not the run)"
    run "${W0[@]}" "tail -n +1 --pid=\"\$(cat $FILES.pid)\" -F $FILES.log" || true
    if ! run "${WALL[@]}" "exit \"\$(cat $FILES.exit 2>/dev/null || echo 1)\""; then
      die "the run failed or has not finished on some worker (see its log: $(quote "${WALL[@]}" "tail -n 50 $FILES.log"))"
    fi
    return 0
  fi
  echo
  echo "# Started, detached: the run goes on if this connection drops. Follow worker 0's log:"
  echo "  $(quote "${W0[@]}" "tail -n 100 -F $FILES.log")"
  echo "# Stop it on every worker (SIGTERM: it stops cleanly, and can resume):"
  echo "  $(quote "${WALL[@]}" "kill -TERM -- -\"\$(cat $FILES.pid)\"")"
  echo "# Resume after a preemption, a crash or a stop (the same command):"
  echo "  $(quote "$0" "${ARGS[@]}")"
}

main() {
  case "${1:-}" in
    --worker_setup|--worker_start|--worker_job|--worker_running) worker_main "$@" ;;
    *) launcher_main "$@" ;;
  esac
}

# main and exit on one line: bash has read them before anything runs, so a copy of this file
# replaced while a job runs from it does not change what that job does.
main "$@"; exit $?
