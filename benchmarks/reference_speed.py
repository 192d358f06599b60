r"""Train-step time with a precomputed reference vs the reference on device.

The same jitted IPO step of the training system (`train_step.make_train_step`)
on the same batches of a Llama-style transformer, twice: with the frozen
reference in the state (its forward pass every step), and with the batch
carrying the reference's summed log-probs (`input.ref_logps_file`, written
by `python -m psipo_jax.precompute_reference`; `state.ref_params` is None).
Both are timed alternately in this one process; the ratio is printed. The
limit is about 1.33×: the reference's forward pass is about a third of a
step's work (forward + backward of the policy is about three forwards).

Usage (repository root):

  PYTHONPATH=. python benchmarks/reference_speed.py [--preset=small] \
      [--pairs=8] [--length=256] [--steps=20] [--rounds=3]
"""

import argparse
import time

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from psipo_jax import models
from psipo_jax.loss_config import LossConfig
from psipo_jax.train_state import TrainState
from psipo_jax.train_step import make_train_step, pair_inputs


def _batch(rng, pairs, length, vocab):
  batch = {}
  for side in ("chosen", "rejected"):
    batch[f"{side}_input_ids"] = rng.integers(
      3, vocab, (pairs, length), dtype=np.int32
    )
    mask = np.zeros((pairs, length), np.int32)
    mask[:, length // 2 :] = 1  # the second half of each row is the response
    batch[f"{side}_loss_mask"] = mask
    batch[f"{side}_attention_mask"] = np.ones((pairs, length), np.int32)
  return batch


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="small")
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()

  block = ml_collections.ConfigDict(
    {"name": "transformer", "preset": args.preset}
  )
  model = models.build_model(block, rngs=nnx.Rngs(0))
  optimizer = optax.adamw(1e-4)
  graphdef, with_ref = TrainState.create(
    model, optimizer, rng=jax.random.PRNGKey(0)
  )
  without_ref = with_ref.replace(ref_params=None)
  step = jax.jit(
    make_train_step(graphdef, LossConfig("ipo", tau=0.1), optimizer)
  )
  batch = _batch(
    np.random.default_rng(0), args.pairs, args.length, models.vocab_size(block)
  )
  ref_out = jax.jit(
    lambda params, b: nnx.merge(graphdef, params)(pair_inputs(b))
  )(with_ref.ref_params, batch)
  precomputed = dict(
    batch,
    ref_chosen_logps=ref_out.logps[: args.pairs],
    ref_rejected_logps=ref_out.logps[args.pairs :],
  )

  def seconds_per_step(state, batch):
    state, metrics = step(state, batch)  # compiles on the first call
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / args.steps

  times = {"on device": [], "precomputed": []}
  for _ in range(args.rounds):
    times["on device"].append(seconds_per_step(with_ref, batch))
    times["precomputed"].append(seconds_per_step(without_ref, precomputed))
  best = {k: min(v) for k, v in times.items()}
  print(
    f"preset {args.preset}, {args.pairs} pairs x {args.length} tokens, CPU"
    f" devices {jax.device_count()}"
  )
  for name, values in times.items():
    print(
      f"  reference {name:12s}: {best[name] * 1e3:8.1f} ms/step (best of"
      f" {', '.join(f'{v * 1e3:.1f}' for v in values)})"
    )
  print(
    f"  speed-up with the precomputed reference: "
    f"{best['on device'] / best['precomputed']:.2f}x (target >= 1.3x)"
  )


if __name__ == "__main__":
  main()
