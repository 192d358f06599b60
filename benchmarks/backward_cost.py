r"""What the policy's backward pass costs, in forward passes, per layer loop.

The jitted forward (summed response log-probs of 2·pairs rows) and the
jitted gradient of their sum with respect to every parameter, on the same
batch of the same model, for layers scanned (`model.scan_layers=True`, the
default) and unrolled (`False`), all in this one process; best of
`--rounds` rounds of `--calls` calls each. A backward pass costs about two
forward passes of matmul work (one for the activations' gradients, one for
the weights'), so gradient / forward ≈ 3 is the healthy figure; it bounds
what a precomputed reference can save (benchmarks/reference_speed.py:
at most 1 + forward / step).

Usage (repository root):

  PYTHONPATH=. python benchmarks/backward_cost.py [--preset=small]
      [--pairs=8] [--length=256] [--attention=xla] [--calls=5] [--rounds=3]
      [--variants=scanned,unrolled] [--remat-policy=dots_saveable]
      [--compare-allocators]

--remat-policy=P rematerialises each block in both variants
(`model.remat=True`, `model.remat_policy=P`). The minor page faults per
call count the memory the call touches for the first time (4 KiB each).
--compare-allocators runs the rest of the command in fresh processes
without and with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
(psipo_jax/host_allocator.py), alternately, --rounds times each, and prints
the ratio of the best gradients and each process's peak resident memory.
"""

import argparse
import os
import re
import resource
import subprocess
import sys
import time

import jax
import ml_collections
from flax import nnx

from psipo_jax import host_allocator
from psipo_jax import models
from psipo_jax.train_step import pair_inputs
from lm_device import random_pairs  # benchmarks/, this script's directory


def _best_ms(fn, args, calls, rounds):
  """(best ms per call, minor page faults per call over all rounds)."""
  jax.block_until_ready(fn(*args))  # compiles
  best = float("inf")
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / calls)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
  return 1e3 * best, faults / (calls * rounds)


def measure(block, inputs, calls, rounds):
  """((forward ms, faults), (gradient ms, faults)) of the model `block` builds."""
  graphdef, params = nnx.split(models.build_model(block, rngs=nnx.Rngs(0)))

  def total_logp(params, inputs):
    return nnx.merge(graphdef, params)(inputs).logps.sum()

  forward = jax.jit(total_logp)
  gradient = jax.jit(jax.grad(total_logp))
  return (
    _best_ms(forward, (params, inputs), calls, rounds),
    _best_ms(gradient, (params, inputs), calls, rounds),
  )


def compare_allocators(argv, rounds):
  """This script's own measurement in fresh processes, alternately without
  and with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc reads it at start-up
  only, so one process cannot switch), `rounds` times each; prints the best
  gradient of each, their ratio and each process's peak resident memory."""
  script = os.path.abspath(__file__)
  plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  setups = {
    "default malloc": plain,
    f"GLIBC_TUNABLES={host_allocator.TUNABLE}": dict(
      plain, GLIBC_TUNABLES=host_allocator.TUNABLE
    ),
  }
  best, peaks = {}, []
  for _ in range(rounds):
    for name, env in setups.items():
      out = subprocess.run(
        [sys.executable, script, *argv],
        env=env,
        check=True,
        capture_output=True,
        text=True,
      ).stdout
      print(f"-- {name}\n{out}", end="", flush=True)
      peaks.append((name, re.search(r"memory of this process: (\S+)", out)[1]))
      for variant, gradient in re.findall(
        r"^(\w+) +forward .*? gradient +([\d.]+) ms", out, re.MULTILINE
      ):
        key = (variant, name)
        best[key] = min(best.get(key, float(gradient)), float(gradient))
  plain_name, tuned_name = setups
  for variant in sorted({v for v, _ in best}):
    before, after = best[variant, plain_name], best[variant, tuned_name]
    print(
      f"{variant:9s} best gradient {before:8.1f} ms -> {after:8.1f} ms with"
      f" {tuned_name}: {after / before:.2f}x the time"
    )
  for name in setups:
    print(
      f"peak resident memory, {name}:"
      f" {', '.join(p + ' MiB' for n, p in peaks if n == name)}"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="small")
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--attention", default="xla")
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--variants", default="scanned,unrolled")
  parser.add_argument(
    "--remat-policy",
    default=None,
    help="model.remat=True with this model.remat_policy (e.g. dots_saveable)",
  )
  parser.add_argument(
    "--compare-allocators",
    action="store_true",
    help="run the rest of the command line in fresh processes, without and"
    " with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, --rounds times each",
  )
  args = parser.parse_args()
  if args.compare_allocators:
    argv = [a for a in sys.argv[1:] if a != "--compare-allocators"]
    compare_allocators(argv, args.rounds)
    return

  print(f"preset {args.preset}; {host_allocator.describe()}", flush=True)
  results = {}
  for variant in args.variants.split(","):
    if variant not in ("scanned", "unrolled"):
      parser.error(f"--variants: {variant!r} is not scanned or unrolled")
    block = ml_collections.ConfigDict(
      {"name": "transformer", "preset": args.preset}
    )
    block.attention = args.attention
    if variant == "unrolled":
      block.scan_layers = False
    if args.remat_policy:
      block.remat, block.remat_policy = True, args.remat_policy
    inputs = pair_inputs(
      random_pairs(args.pairs, args.length, models.vocab_size(block))
    )
    (forward, forward_faults), (gradient, gradient_faults) = measure(
      block, inputs, args.calls, args.rounds
    )
    results[variant] = gradient
    print(
      f"{variant:9s} forward {forward:8.1f} ms  gradient {gradient:8.1f} ms"
      f"  gradient / forward {gradient / forward:.2f}"
      f"  (backward = {(gradient - forward) / forward:.2f} forwards);"
      f" minor page faults per call: forward {forward_faults:,.0f},"
      f" gradient {gradient_faults:,.0f}",
      flush=True,
    )
  if len(results) == 2:
    print(
      "unrolled / scanned gradient time:"
      f" {results['unrolled'] / results['scanned']:.2f}x"
    )
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
  print(f"peak resident memory of this process: {peak:,.0f} MiB")


if __name__ == "__main__":
  main()
