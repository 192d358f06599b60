#!/usr/bin/env bash
# Per-host set-up on a Cloud TPU VM, then `python -m "$@"`.
#
#   bash launch/run_tpu.sh <module> [flags...]      # from the code directory
#   bash launch/run_tpu.sh                          # set-up only
#
# First use on a host: a virtualenv in $PSIPO_VENV (default ~/psipo_venv,
# outside the code directory so that a fresh copy of the code keeps it) with
# jax[tpu], then `pip install -e .` of this checkout. Later uses reinstall
# only when setup.py changed. launch/tpu_pod.sh runs this on every host.
set -euo pipefail

cd "$(dirname "$0")/.."
venv=${PSIPO_VENV:-$HOME/psipo_venv}
stamp="$venv/.psipo_setup_sha"
setup_sha=$(sha1sum setup.py | cut -d' ' -f1)

if [[ ! -x $venv/bin/python ]]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then  # Bare TPU images lack venv.
    sudo apt-get update -q && sudo apt-get install -y -q python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q -U pip
  "$venv/bin/pip" install -q -U "jax[tpu]"
fi
if [[ ! -f $stamp || $(cat "$stamp") != "$setup_sha" ]]; then
  "$venv/bin/pip" install -q -e ".[gcs]"  # gcsfs: gs:// workdirs
  echo "$setup_sha" > "$stamp"
fi

if [[ $# -gt 0 ]]; then
  exec "$venv/bin/python" -m "$@"
fi
