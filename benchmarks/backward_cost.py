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

--remat-policy=P rematerialises each block in both variants
(`model.remat=True`, `model.remat_policy=P`).
"""

import argparse
import time

import jax
import ml_collections
from flax import nnx

from psipo_jax import models
from psipo_jax.train_step import pair_inputs
from lm_device import random_pairs  # benchmarks/, this script's directory


def _best_ms(fn, args, calls, rounds):
  jax.block_until_ready(fn(*args))  # compiles
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / calls)
  return 1e3 * best


def measure(block, inputs, calls, rounds):
  """(forward ms, gradient ms) of the model `block` builds."""
  graphdef, params = nnx.split(models.build_model(block, rngs=nnx.Rngs(0)))

  def total_logp(params, inputs):
    return nnx.merge(graphdef, params)(inputs).logps.sum()

  forward = jax.jit(total_logp)
  gradient = jax.jit(jax.grad(total_logp))
  return (
    _best_ms(forward, (params, inputs), calls, rounds),
    _best_ms(gradient, (params, inputs), calls, rounds),
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
  args = parser.parse_args()

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
    forward, gradient = measure(block, inputs, args.calls, args.rounds)
    results[variant] = gradient
    print(
      f"{variant:9s} forward {forward:8.1f} ms  gradient {gradient:8.1f} ms"
      f"  gradient / forward {gradient / forward:.2f}"
      f"  (backward = {(gradient - forward) / forward:.2f} forwards)",
      flush=True,
    )
  if len(results) == 2:
    print(
      "unrolled / scanned gradient time:"
      f" {results['unrolled'] / results['scanned']:.2f}x"
    )


if __name__ == "__main__":
  main()
