#!/usr/bin/env bash
# One-shot accelerator check (run on a GPU machine from the repository root):
# the Figure 1 + 2 benchmark, the main job, and the numerics tests that need
# no fake CPU devices. Wheels for packages the machine's image lacks
# (ml_collections, tensorboardX) may be placed in .whl/ beforehand.
# Usage: OUT=/some/dir bash benchmarks/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
# Several pytest workers share the GPU: no up-front 75% grab per process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi -L
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
timeout 200 python3 benchmarks/bandit_benchmark.py --baseline_steps=2000 2>&1 | tee "$OUT/bandit_benchmark.txt"
{ time timeout 90 python3 -m psipo_jax.bandit --config=experiments/paper_figures.py \
    --workdir=/tmp/paper_figures; } 2>&1 | tail -25 | tee "$OUT/paper_figures.txt"
timeout 200 python3 -m pytest -q -n 4 -p no:cacheprovider tests/losses_test.py \
  tests/metrics_test.py tests/psi_test.py tests/bandit_test.py 2>&1 | tail -25 | tee "$OUT/tests.txt"
