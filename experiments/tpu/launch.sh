#!/usr/bin/env bash
# Launch a dromedary_jax command on every worker of a Cloud TPU VM / pod slice.
#
#   experiments/tpu/launch.sh --name dromedary --zone us-central2-b --accelerator v4-256 \
#       [--project P] [--version tpu-ubuntu2204-base] [--spot] [--dry_run] \
#       -- python -m dromedary_jax.run --config configs/dromedary_65b.py --workdir /mnt/runs/run1
#
# 1. creates the TPU VM / slice if it does not exist (reuses it otherwise),
# 2. copies this checkout (git archive of HEAD plus uncommitted changes) to every worker and
#    installs it with jax[tpu],
# 3. runs the command after `--` on all workers at once (--worker=all); every worker runs the
#    same program and jax.distributed initialises itself from the TPU environment
#    (DROMEDARY_DISTRIBUTED=auto is read by dromedary_jax.distributed).
# With --dry_run the gcloud commands are printed, not run. --workdir must be a folder every
# worker sees (a Filestore share or a gcsfuse-mounted bucket), not a gs:// URL.
set -euo pipefail

NAME=""
ZONE=""
ACCELERATOR=""
PROJECT=""
VERSION="tpu-ubuntu2204-base"
SPOT=0
DRY_RUN=0
REMOTE_DIR="dromedary_jax"

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

die() {
  echo "error: $*" >&2
  exit 2
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2:-}"; shift 2 ;;
    --zone) ZONE="${2:-}"; shift 2 ;;
    --accelerator) ACCELERATOR="${2:-}"; shift 2 ;;
    --project) PROJECT="${2:-}"; shift 2 ;;
    --version) VERSION="${2:-}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --dry_run|--dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ -n "$ACCELERATOR" ]] || die "--accelerator is required (e.g. v4-256, v5p-128, v5litepod-16)"
[[ $# -gt 0 ]] || die "no command given after '--'"

COMMON=(--zone "$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")

run() {
  # Print a command, quoted so that it can be pasted; run it unless --dry_run.
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" -eq 0 ]]; then
    "$@"
  fi
}

# 1. create or reuse ---------------------------------------------------------------------------
if [[ "$DRY_RUN" -eq 1 ]]; then
  echo "# (dry run) the TPU is created only if 'describe' fails:"
  run gcloud compute tpus tpu-vm describe "$NAME" "${COMMON[@]}"
  CREATE=1
elif gcloud compute tpus tpu-vm describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
  echo "# reusing existing TPU '$NAME'"
  CREATE=0
else
  CREATE=1
fi
if [[ "$CREATE" -eq 1 ]]; then
  CREATE_ARGS=(--accelerator-type "$ACCELERATOR" --version "$VERSION")
  [[ "$SPOT" -eq 1 ]] && CREATE_ARGS+=(--spot)
  run gcloud compute tpus tpu-vm create "$NAME" "${COMMON[@]}" "${CREATE_ARGS[@]}"
fi

# 2. copy and install on every worker ----------------------------------------------------------
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TARBALL="$(mktemp -d)/dromedary_jax.tar.gz"
if [[ "$DRY_RUN" -eq 0 ]]; then
  STASH="$(git -C "$ROOT" stash create || true)"
  git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" "${STASH:-HEAD}"
else
  echo "# (dry run) would pack $ROOT into $TARBALL"
fi
run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:dromedary_jax.tar.gz" --worker=all "${COMMON[@]}"
INSTALL="mkdir -p ~/$REMOTE_DIR && tar -xzf ~/dromedary_jax.tar.gz -C ~/$REMOTE_DIR"
INSTALL+=" && cd ~/$REMOTE_DIR && python3 -m pip install -q 'jax[tpu]>=0.10,<0.11' -e ."
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${COMMON[@]}" --command "$INSTALL"

# 3. run the same command on all workers -------------------------------------------------------
printf -v USER_CMD ' %q' "$@"
REMOTE="cd ~/$REMOTE_DIR && DROMEDARY_DISTRIBUTED=auto${USER_CMD}"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${COMMON[@]}" --command "$REMOTE"
