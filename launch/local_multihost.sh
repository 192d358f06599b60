#!/usr/bin/env bash
# A multi-host JAX run on this machine: N_PROCS processes on 127.0.0.1, each
# with DEVICES_PER_PROC CPU devices, so that the multi-host code path (global
# mesh, per-process batch rows, multi-host checkpointing) can be run and
# debugged without a pod.
#
#   launch/local_multihost.sh N_PROCS DEVICES_PER_PROC -- <module> [flags...]
#   launch/local_multihost.sh 2 4 -- psipo_jax.main \
#       --config=experiments/bandit_train.py:runlocal --workdir=/tmp/mh
#
# Process i gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>,
# JAX_NUM_PROCESSES=N_PROCS, JAX_PROCESS_ID=i (read by
# psipo_jax.sharding.initialize_distributed, which calls
# jax.distributed.initialize), JAX_NUM_CPU_DEVICES=DEVICES_PER_PROC and
# JAX_PLATFORMS=cpu. Output lines are prefixed with [i]. If one process
# fails, the others are stopped and its exit code is returned.
set -euo pipefail

usage() {
  echo "usage: $0 N_PROCS DEVICES_PER_PROC -- <module> [flags...]" >&2
  exit 2
}
[[ $# -ge 4 && $3 == -- ]] || usage
num_procs=$1
devices=$2
shift 3
[[ $num_procs =~ ^[1-9][0-9]*$ && $devices =~ ^[1-9][0-9]*$ ]] || usage

python=${PYTHON:-python3}
port=${JAX_COORDINATOR_PORT:-$("$python" -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for ((i = 0; i < num_procs; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES=$num_procs \
    JAX_PROCESS_ID=$i JAX_NUM_CPU_DEVICES=$devices JAX_PLATFORMS=cpu \
    "$python" -u -m "$@" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done

status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  # Returns as soon as any process exits (bash >= 5.1 for -p); the first
  # failure stops the rest instead of leaving them blocked in a collective
  # until JAX's timeout.
  wait -n -p finished "${running[@]}" || { status=$?; break; }
  for k in "${!running[@]}"; do
    [[ ${running[k]} == "$finished" ]] && unset 'running[k]'
  done
done
if [[ $status -ne 0 ]]; then
  echo "local_multihost.sh: a process failed with exit code $status; stopping the others" >&2
fi
cleanup
wait 2>/dev/null || true
exit "$status"
