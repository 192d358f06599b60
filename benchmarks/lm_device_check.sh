#!/usr/bin/env bash
# One-shot MFU check of the language model on a GPU or TPU machine (run from
# the repository root; issue 17's accelerator figures): benchmarks/lm_device.py
# for the 125m and 1b presets in bf16 with XLA attention, then with the cuDNN
# fused kernel where the device is an NVIDIA GPU, then the 1b preset with
# per-block remat (a larger batch fits). Each run's output goes to $OUT.
# Wheels for packages the machine's image lacks (ml_collections, absl-py,
# ...) may be placed in .whl/ beforehand, as for benchmarks/device_check.sh.
#
# Usage: OUT=/some/dir bash benchmarks/lm_device_check.sh
# On CPU, as a smoke run of this script: PRESETS=tiny BATCH_SIZES=2 STEPS=1
#   SEQ_LEN=16 PEAK_TFLOPS=1 PYTHON=venv/bin/python OUT=/tmp/x \
#   bash benchmarks/lm_device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/lm_device_check}
PRESETS=${PRESETS:-125m,1b}
SEQ_LEN=${SEQ_LEN:-1024}
BATCH_SIZES=${BATCH_SIZES:-64,32,16,8,4}
STEPS=${STEPS:-10}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
peak=()
if [ -n "${PEAK_TFLOPS:-}" ]; then peak=(--peak_tflops="$PEAK_TFLOPS"); fi
{
  nvidia-smi -L 2>/dev/null || true
  "$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
run() {  # name, then lm_device.py's flags
  local name=$1
  shift
  timeout 600 "$PYTHON" benchmarks/lm_device.py --presets="$PRESETS" \
    --seq_len="$SEQ_LEN" --batch_sizes="$BATCH_SIZES" --steps="$STEPS" \
    "${peak[@]}" "$@" 2>&1 | tee "$OUT/$name.txt"
}
run xla --attention=xla
if "$PYTHON" -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')"; then
  run cudnn --attention=cudnn
fi
PRESETS=${PRESETS##*,} run remat --attention=xla --remat
