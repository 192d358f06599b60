#!/usr/bin/env bash
# Runs `python -m <module> <flags>` on every host of a Cloud TPU VM or pod.
#
#   launch/tpu_pod.sh [--no-copy] [--queued] NAME ZONE -- <module> [flags...]
#   launch/tpu_pod.sh [--queued] NAME ZONE --      # copy and set up only
#
# 1. Copies this checkout (tracked and untracked, not git-ignored files) to
#    ~/psipo_jax on every worker, replacing the previous copy (--no-copy: keep
#    the code already there, e.g. for the second point of a sweep).
# 2. Runs `bash launch/run_tpu.sh <module> <flags>` in ~/psipo_jax on every
#    worker at once; run_tpu.sh makes the venv on first use and then runs
#    `python -m <module> <flags>`. The command returns when all hosts have.
#
# NAME is a TPU VM (`gcloud compute tpus tpu-vm ...`). With --queued, NAME is
# a queued resource and the code runs on all workers of all its nodes
# (`gcloud compute tpus queued-resources ... --node=all`): that is how a
# multi-slice job runs, JAX reading the slice topology from each host.
#
# Environment: GCLOUD_FLAGS (e.g. "--project=my-project") is added to every
# gcloud call; TFDS_DATA_DIR, XLA_FLAGS and LIBTPU_INIT_ARGS, when set, are
# passed on to the hosts.
set -euo pipefail

usage() {
  echo "usage: $0 [--no-copy] [--queued] NAME ZONE -- [<module> [flags...]]" >&2
  exit 2
}

copy=1
group=(tpu-vm)
targets=(--worker=all)
while [[ $# -gt 0 && $1 == --* && $1 != -- ]]; do
  case $1 in
    --no-copy) copy=0 ;;
    --queued) group=(queued-resources); targets=(--worker=all --node=all) ;;
    *) usage ;;
  esac
  shift
done
[[ $# -ge 3 && $3 == -- ]] || usage
name=$1
zone=$2
shift 3

read -r -a gcloud_flags <<< "${GCLOUD_FLAGS:-}"
tpu_gcloud() {  # tpu_gcloud ssh|scp ARGS...: the same target every time.
  local verb=$1
  shift
  gcloud compute tpus "${group[@]}" "$verb" "$@" --zone="$zone" "${targets[@]}" \
    "${gcloud_flags[@]}"
}

repo=$(cd "$(dirname "$0")/.." && pwd)
remote_dir=psipo_jax

if [[ $copy == 1 ]]; then
  tarball=$(mktemp "${TMPDIR:-/tmp}/psipo_code.XXXXXX")
  trap 'rm -f "$tarball"' EXIT
  # Files git would commit, as they are on disk now (uncommitted edits
  # included); tracked files deleted from disk are left out.
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done |
    tar --null -T - -czf "$tarball")
  echo "tpu_pod.sh: copying $repo to ~/$remote_dir on all hosts of $name" >&2
  tpu_gcloud scp "$tarball" "$name:psipo_code.tgz"
  unpack="rm -rf ~/$remote_dir && mkdir -p ~/$remote_dir"
  unpack+=" && tar -xzf ~/psipo_code.tgz -C ~/$remote_dir"
  tpu_gcloud ssh "$name" --command="$unpack"
fi

env_prefix=""
for var in TFDS_DATA_DIR XLA_FLAGS LIBTPU_INIT_ARGS; do
  if [[ -n ${!var:-} ]]; then
    env_prefix+="$var=$(printf '%q' "${!var}") "
  fi
done
command="cd ~/$remote_dir && ${env_prefix}bash launch/run_tpu.sh"
if [[ $# -gt 0 ]]; then
  command+=$(printf ' %q' "$@")
fi
echo "tpu_pod.sh: running on all hosts of $name: $command" >&2
tpu_gcloud ssh "$name" --command="$command"
