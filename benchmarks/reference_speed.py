r"""Train-step time with a precomputed reference vs the reference on device.

The same jitted IPO step of the training system (`train_step.make_train_step`)
on the same batches of a Llama-style transformer, twice: with the frozen
reference in the state (its forward pass every step), and with the batch
carrying the reference's summed log-probs (`input.ref_logps_file`, written
by `python -m psipo_jax.precompute_reference`; `state.ref_params` is None).
Both are timed in this one process, one call of each in turn
(`--rounds` × `--steps` calls each, after a compiling call), and the ratio
of their medians and of their minima is printed: alternating single calls
makes a burst of load from elsewhere hit both alike. The
limit is about 1.33×: the reference's forward pass is about a third of a
step's work (forward + backward of the policy is about three forwards).

The reference's forward pass alone (the same jitted scoring, the same
batch) is timed too, giving this machine's own ceiling,
1 + forward / precomputed step: what removing exactly one forward pass can
save. The speed-up falls short of 1.33× by as much as the policy's
backward pass here costs more than twice its forward.

Usage (repository root):

  PYTHONPATH=. python benchmarks/reference_speed.py [--preset=small] \
      [--pairs=8] [--length=256] [--steps=20] [--rounds=3] [--unrolled] \
      [--remat-policy=dots_saveable]

--unrolled runs the layers one after another (`model.scan_layers=False`);
--remat-policy=P rematerialises each block (`model.remat=True`,
`model.remat_policy=P`). Which backward pass is the cheapest on XLA:CPU
is measured in BENCHMARKS.md ("Backward pass").
"""

import argparse
import time

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from psipo_jax import host_allocator
from psipo_jax import models
from psipo_jax.loss_config import LossConfig
from psipo_jax.train_state import TrainState
from psipo_jax.train_step import make_train_step, pair_inputs
from lm_device import random_pairs  # benchmarks/, this script's directory


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="small")
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument(
    "--unrolled", action="store_true", help="model.scan_layers=False"
  )
  parser.add_argument(
    "--remat-policy",
    default=None,
    help="model.remat=True with this model.remat_policy (e.g. dots_saveable)",
  )
  args = parser.parse_args()

  block = ml_collections.ConfigDict(
    {
      "name": "transformer",
      "preset": args.preset,
      "scan_layers": not args.unrolled,
    }
  )
  if args.remat_policy:
    block.remat, block.remat_policy = True, args.remat_policy
  model = models.build_model(block, rngs=nnx.Rngs(0))
  optimizer = optax.adamw(1e-4)
  graphdef, with_ref = TrainState.create(
    model, optimizer, rng=jax.random.PRNGKey(0)
  )
  without_ref = with_ref.replace(ref_params=None)
  step = jax.jit(
    make_train_step(graphdef, LossConfig("ipo", tau=0.1), optimizer)
  )
  batch = random_pairs(args.pairs, args.length, models.vocab_size(block))
  forward = jax.jit(
    lambda params, b: nnx.merge(graphdef, params)(pair_inputs(b))
  )
  ref_out = forward(with_ref.ref_params, batch)
  precomputed = dict(
    batch,
    ref_chosen_logps=ref_out.logps[: args.pairs],
    ref_rejected_logps=ref_out.logps[args.pairs :],
  )

  def seconds(call, first, second):
    """(wall, CPU) seconds of one `call(first, second)`, waited for. CPU
    time is this process's, all threads: on a shared machine it counts the
    work done, not the waiting for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(call(first, second))
    return time.perf_counter() - wall, time.process_time() - cpu

  runs = {
    "reference on device": (step, with_ref, batch),
    "reference precomputed": (step, without_ref, precomputed),
    "forward only": (forward, with_ref.ref_params, batch),
  }
  for run in runs.values():
    seconds(*run)  # compiles
  times = {name: [] for name in runs}
  names = list(runs)
  for i in range(args.rounds * args.steps):
    # One call of each in turn, starting from a different one each time,
    # so that a burst of load from elsewhere hits all three alike.
    for name in names[i % 3 :] + names[: i % 3]:
      times[name].append(seconds(*runs[name]))
  print(
    f"preset {args.preset}, {args.pairs} pairs x {args.length} tokens, CPU"
    f" devices {jax.device_count()}; {host_allocator.describe()};"
    f" {len(times['forward only'])} calls of each, alternating"
  )
  for clock, i in (("wall", 0), ("CPU", 1)):
    stats = {
      name: (np.median([t[i] for t in values]), min(t[i] for t in values))
      for name, values in times.items()
    }
    for name, (median, least) in stats.items():
      print(
        f"  {clock:4s} {name:22s}: median {median * 1e3:8.1f} ms, min"
        f" {least * 1e3:8.1f} ms"
      )
    for k, statistic in enumerate(("median", "min")):
      on, pre, fwd = (stats[name][k] for name in names)
      print(
        f"  {clock:4s} speed-up with the precomputed reference ({statistic}s):"
        f" {on / pre:.2f}x (target >= 1.3x); ceiling 1 + forward /"
        f" precomputed step = {1 + fwd / pre:.2f}x (a policy step ="
        f" {pre / fwd:.2f} forwards)"
      )


if __name__ == "__main__":
  main()
