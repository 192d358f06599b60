r"""Wall time of the paper's Figure 1 + Figure 2 sweep, and its speed-up.

The sweep: D1 and the printed D3, sampled DPO and IPO, 6 τ, 10 seeds,
18,000 Adam steps of batch 9 — 240 runs, 4.32 million steps.

1. A FRESH Python process imports psipo_jax.bandit, builds and compiles the
   sweep and runs it; its wall time (import, compilation and run included) is
   the number to beat (target: < 20 s on a 2-core CPU). It then runs the
   sweep again with new τ values (no recompilation) to time the run alone,
   and times drawing the same mini-batch indices on their own (the random
   numbers' share of the run).
2. The baseline, measured in this process: ``bandit.run_stepwise``, one
   jitted step per Python iteration, on a subset of runs; its per-step cost
   (compilation excluded) is scaled to 240 × 18,000 steps.

3. With `--compare_with=DIR` (another checkout, e.g. a `git worktree` of an
   older commit), the fresh-process sweep of both trees runs alternately
   `--rounds` times in this one invocation and the ratio of their best
   run-only times is printed: a refactoring must not slow the runner down.

Usage (repository root):

  python benchmarks/bandit_benchmark.py [--baseline_steps=3000] \
      [--compare_with=/path/to/other/checkout --rounds=3]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NUM_RUNS, TOTAL_STEPS = 240, 18_000

# Runs in a fresh interpreter: everything a user's first run pays.
_CHILD = r"""
import json, time
start = time.perf_counter()
import numpy as np
import jax, jax.numpy as jnp
from psipo_jax import bandit
try:
  from psipo_jax import data_order
except ImportError:  # A checkout from before psipo_jax.data_order existed.
  data_order = bandit
imported = time.perf_counter()
uniform = np.full(3, 1 / 3)
datasets = [
    bandit.Dataset("D1", 3, uniform, pairs=np.array([[0, 1], [1, 2], [0, 2]])),
    bandit.Dataset("D3", 3, uniform, pairs=np.array([[0, 1], [1, 0]])),
]
losses = [bandit.LossSpec("dpo"), bandit.LossSpec("ipo")]
taus = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0]
protocol = dict(total_steps=18_000, batch_size=9, record_every=100,
                optimizer=bandit.OptimizerSpec("adam", (("learning_rate", 0.01),)))
result = bandit.run_sweep(datasets, losses, taus, range(10), **protocol)
first = time.perf_counter()
assert len(result.runs) == 240
rerun = []
for scale in (1.01, 1.02):
  t = time.perf_counter()
  bandit.run_sweep(datasets, losses, [x * scale for x in taus], range(10), **protocol)
  rerun.append(time.perf_counter() - t)

# The random numbers alone: the same indices, drawn the same chunked way.
keys = jax.random.key_data(jax.vmap(data_order.data_key)(jnp.tile(jnp.arange(10), 24)))
sizes = jnp.asarray(np.repeat([3, 2], 120), jnp.uint32)
@jax.jit
def draw_all(keys, sizes):
  def chunk(total, c):
    steps = c * 100 + jnp.arange(100)
    idx = jax.vmap(lambda k, n: data_order.minibatch_indices(
        k, steps, batch_size=9, dataset_size=n))(keys, sizes)
    return total + idx.sum(), None
  return jax.lax.scan(chunk, jnp.int32(0), jnp.arange(180))[0]
draw_all(keys, sizes).block_until_ready()
t = time.perf_counter()
draw_all(keys, sizes).block_until_ready()
rng = time.perf_counter() - t
print(json.dumps(dict(import_s=imported - start, first_s=first - imported,
                      fresh_total_s=first - start, run_s=min(rerun), rng_s=rng)))
"""


def fresh_process_sweep(root: str = ROOT) -> dict:
  out = subprocess.run(
    [sys.executable, "-c", _CHILD],
    cwd=root,
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, "PYTHONPATH": root},
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def baseline_seconds_per_step(steps: int) -> float:
  """Per-step cost of the jitted-step Python loop, compilation excluded."""
  from psipo_jax import bandit  # pylint: disable=g-import-not-at-top

  uniform = np.full(3, 1 / 3)
  d1 = bandit.Dataset(
    "D1", 3, uniform, pairs=np.array([[0, 1], [1, 2], [0, 2]])
  )
  costs = []
  protocol = dict(
    batch_size=9,
    record_every=100,
    optimizer=bandit.OptimizerSpec("adam", (("learning_rate", 0.01),)),
  )
  for loss in ("dpo", "ipo"):
    spec = bandit.LossSpec(loss)
    bandit.run_stepwise(
      d1, spec, 0.1, 0, total_steps=100, **protocol
    )  # Compiles.
    t = time.perf_counter()
    bandit.run_stepwise(d1, spec, 0.1, 0, total_steps=steps, **protocol)
    costs.append((time.perf_counter() - t) / steps)
  return float(np.mean(costs))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--baseline_steps", type=int, default=3000)
  parser.add_argument(
    "--compare_with", help="another checkout to time alongside"
  )
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  if args.compare_with:
    compare(args.compare_with, args.rounds)
    return

  fresh = fresh_process_sweep()
  per_step = baseline_seconds_per_step(args.baseline_steps)
  baseline = per_step * NUM_RUNS * TOTAL_STEPS
  print(
    f"Figure 1 + Figure 2 sweep: {NUM_RUNS} runs × {TOTAL_STEPS} steps"
    f" (2 losses × 6 τ × 10 seeds × 2 datasets), CPU cores:"
    f" {os.cpu_count()}"
  )
  print(
    f"  fresh process, import + compile + run: {fresh['fresh_total_s']:6.2f} s"
    f"   (import {fresh['import_s']:.2f} s, build + compile + run"
    f" {fresh['first_s']:.2f} s; target < 20 s)"
  )
  print(
    f"  run only (compiled, new τ values):     {fresh['run_s']:6.2f} s"
    f"   of which drawing the mini-batch indices ≈ {fresh['rng_s']:.2f} s"
  )
  print(
    f"  baseline, jitted step per Python iteration: {per_step * 1e6:.0f} µs"
    f"/step → {baseline:,.0f} s for the sweep (measured on"
    f" 2 × {args.baseline_steps} steps, scaled)"
  )
  print(
    f"  speed-up: {baseline / fresh['run_s']:,.0f}× (run only),"
    f" {baseline / fresh['fresh_total_s']:,.0f}× (fresh process, compile"
    " included); target ≥ 100×"
  )


def compare(other: str, rounds: int) -> None:
  """This tree's sweep against another checkout's, alternately, in one sitting."""
  times = {ROOT: [], other: []}
  for _ in range(rounds):
    for root in times:
      times[root].append(fresh_process_sweep(root))
  best = {root: min(r["run_s"] for r in runs) for root, runs in times.items()}
  for root, runs in times.items():
    run_only = ", ".join(f"{r['run_s']:.2f}" for r in runs)
    fresh = ", ".join(f"{r['fresh_total_s']:.2f}" for r in runs)
    print(
      f"{root}: run only {run_only} s (best {best[root]:.2f} s);"
      f" fresh process {fresh} s"
    )
  print(
    f"run-only time, this tree / {other}: {best[ROOT] / best[other]:.3f}"
    " (target ≤ 1.10)"
  )


if __name__ == "__main__":
  main()
