r"""Blocked vs XLA attention: forward + backward time of one attention layer.

    PYTHONPATH=. python benchmarks/attention_speed.py \
        [--lengths=256,512,1024] [--rows=16] [--block_sizes=64,128] [--repeats=3]

Shapes of the `small` preset's attention (H 4 query heads, K 2 key/value
heads, Dh 64), float32, --rows rows of T tokens, for two layouts:

  causal   one sequence filling each row (no padding)
  packed   rows of the packed input layout on real preference lengths: the
           2,312 Anthropic HH-RLHF harmless-base test pairs
           (../shared/data/hh_harmless_test_lengths.json, bytes = byte-
           tokenizer tokens), truncated as the pipeline does
           (max_prompt_length = T / 2), shuffled with a fixed seed, placed in
           batches of 64 pairs by `packing.place_pairs` (the pipeline's
           placement); the first --rows rows.

For each it times the jitted gradient of sum(attention(q, k, v) · w) in q,
k and v (one forward and one backward of the attention op alone, no
projections) with `jax.nn.dot_product_attention(implementation="xla")` and
with `blocked_attention` for each --block_sizes, both in this run, and
prints the best of --repeats wall-clock seconds (and process CPU seconds,
steadier on a shared machine) and the ratios xla / blocked (> 1: blocked
is faster). It also checks that both give the same output on
non-padding queries. The packed rows' "block pairs" column is the fraction
of the causal block pairs the blocked kernel computes.

Then, for each --model_lengths T, the whole `small` model (4 layers, V
4,096) on the packed rows: the jitted gradient in the parameters of the
summed per-sequence response log-probs (`segment_logps`; loss mask = every
real token), model.attention "xla" vs "blocked" (default block size), the
best of --repeats seconds and the ratio.
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from benchmarks import hh_lengths
from psipo_jax import models
from psipo_jax.data import packing
from psipo_jax.models import blocked_attention

_LENGTHS = flags.DEFINE_list("lengths", ["256", "512", "1024"], "T values.")
_ROWS = flags.DEFINE_integer("rows", 16, "Rows per batch.")
_BLOCK_SIZES = flags.DEFINE_list(
  "block_sizes", ["64", "128"], "Blocked kernel blocks."
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (best kept).")
_SEED = flags.DEFINE_integer("seed", 0, "Shuffle seed of the HH pairs.")
_MODEL_LENGTHS = flags.DEFINE_list(
  "model_lengths", ["1024"], "T values of the whole-model comparison."
)

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64  # the small preset's attention


def hh_sequence_lengths(max_length: int, seed: int) -> np.ndarray:
  """[n, 2] (chosen, rejected) sequence tokens of the HH pairs, truncated as
  the pipeline does (BOS before the prompt, EOS after each response), in a
  seeded shuffled order; pairs with an empty response (dropped by the
  pipeline) left out."""
  kept = hh_lengths.kept_lengths(
    hh_lengths.pairs(),
    max_length=max_length,
    max_prompt_length=max_length // 2,
  )
  out = np.stack([kept[:, 0] + kept[:, 1], kept[:, 0] + kept[:, 2]], axis=1)
  return out[np.random.default_rng(seed).permutation(len(out))]


def packed_segments(rows: int, max_length: int, seed: int) -> np.ndarray:
  """[rows, T] int32 segment ids (1, 2, ... per sequence, 0 on padding) of
  the first `rows` packed rows of the HH pairs in batches of 64 pairs."""
  lengths = hh_sequence_lengths(max_length, seed)
  out = []
  for start in range(0, len(lengths), 64):
    batch = lengths[start : start + 64]
    placed = packing.place_pairs(
      batch[:, 0], batch[:, 1], max_length=max_length
    )
    segments = np.zeros((placed.num_rows, max_length), np.int32)
    spans = [
      (row, begin, length)
      for rows_, starts, side in (
        (placed.chosen_row, placed.chosen_start, batch[:, 0]),
        (placed.rejected_row, placed.rejected_start, batch[:, 1]),
      )
      for row, begin, length in zip(rows_, starts, side)
    ]
    next_id = np.ones(placed.num_rows, np.int32)
    for row, begin, length in sorted(spans, key=lambda s: (s[0], s[1])):
      segments[row, begin : begin + length] = next_id[row]
      next_id[row] += 1
    out.extend(segments)
    if len(out) >= rows:
      return np.stack(out[:rows])
  raise ValueError(f"the HH pairs fill fewer than {rows} rows")


def xla_attention(q, k, v, segments):
  mask = segments[:, None, :, None] == segments[:, None, None, :]
  return jax.nn.dot_product_attention(
    q, k, v, mask=mask, is_causal=True, implementation="xla"
  )


def timed_grad(attend, q, k, v, segments, repeats):
  """Best wall-clock and best process CPU seconds of one jitted forward +
  backward, and the output. CPU time (all threads) is the steadier figure
  on a machine shared with other processes."""
  w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)

  def loss(q, k, v):
    return jnp.sum(attend(q, k, v, segments) * w)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  jax.block_until_ready(grad(q, k, v))  # compile
  wall = cpu = float("inf")
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(grad(q, k, v))
    wall = min(wall, time.perf_counter() - start)
    cpu = min(cpu, time.process_time() - start_cpu)
  return (wall, cpu), jax.jit(attend)(q, k, v, segments)


def computed_fraction(segments: np.ndarray, block: int) -> float:
  """Block pairs the blocked kernel computes / causal block pairs."""
  lo, hi = blocked_attention._block_ranges(jnp.asarray(segments), block)
  lo, hi = np.asarray(lo), np.asarray(hi)
  nb = lo.shape[1]
  causal = np.tril(np.ones((nb, nb), bool))
  real = lo <= hi
  overlap = (lo[:, :, None] <= hi[:, None, :]) & (
    lo[:, None, :] <= hi[:, :, None]
  )
  needed = overlap & causal & real[:, :, None] & real[:, None, :]
  return needed.sum() / (causal.sum() * len(segments))


def model_step_seconds(attention, segments, repeats):
  """Best seconds of the small model's parameter gradient on packed rows."""
  config = ml_collections.ConfigDict(
    {"name": "transformer", "preset": "small", "attention": attention}
  )
  model = models.build_model(config, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  inputs = {
    "input_ids": rng.integers(0, 4096, segments.shape).astype(np.int32),
    "loss_mask": (segments != 0).astype(np.int32),
    "segment_ids": segments,
  }
  num_segments = int(segments.max())

  def loss(m):
    logps, _ = m.segment_logps(inputs, num_segments=num_segments)
    return jnp.sum(logps)

  grad = nnx.jit(nnx.grad(loss))
  jax.block_until_ready(grad(model))  # compile
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(grad(model))
    best = min(best, time.perf_counter() - start)
  return best


def main(argv):
  del argv
  print(
    f"{jax.default_backend()} ({jax.device_count()} devices), {_ROWS.value}"
    f" rows, H {HEADS}, K {KV_HEADS}, Dh {HEAD_DIM}, float32, forward +"
    f" backward, best of {_REPEATS.value}"
  )
  print(
    "layout  T     real   block  xla s (cpu s)    blocked s (cpu s)"
    "  xla/blocked (cpu)  block pairs"
  )
  rng = np.random.default_rng(0)
  for t in map(int, _LENGTHS.value):
    n = _ROWS.value
    q = jnp.asarray(rng.normal(size=(n, t, HEADS, HEAD_DIM)), jnp.float32)
    k, v = (
      jnp.asarray(rng.normal(size=(n, t, KV_HEADS, HEAD_DIM)), jnp.float32)
      for _ in range(2)
    )
    layouts = {
      "causal": np.ones((n, t), np.int32),
      "packed": packed_segments(n, t, _SEED.value),
    }
    for name, segments_np in layouts.items():
      segments = jnp.asarray(segments_np)
      real = segments_np != 0
      xla_s, want = timed_grad(xla_attention, q, k, v, segments, _REPEATS.value)
      for block in map(int, _BLOCK_SIZES.value):

        def blocked(q, k, v, s, block=block):
          return blocked_attention.blocked_attention(
            q, k, v, s, block_size=block
          )

        blocked_s, got = timed_grad(blocked, q, k, v, segments, _REPEATS.value)
        error = float(np.abs(np.asarray(got - want))[real].max())
        if error > 1e-4:
          raise AssertionError(f"blocked differs from xla by {error}")
        print(
          f"{name:<7} {t:<5} {real.mean():>5.1%}  {block:>5}"
          f"  {xla_s[0]:>6.3f} ({xla_s[1]:>6.3f})"
          f"  {blocked_s[0]:>8.3f} ({blocked_s[1]:>6.3f})"
          f"  {xla_s[0] / blocked_s[0]:>7.2f}x ({xla_s[1] / blocked_s[1]:.2f}x)"
          f"  {computed_fraction(segments_np, min(block, t)):>10.1%}"
        )

  print(
    "whole small model, packed rows: gradient of the summed log-probs;"
    " T  xla s  blocked s  xla/blocked"
  )
  for t in map(int, _MODEL_LENGTHS.value):
    segments = packed_segments(_ROWS.value, t, _SEED.value)
    xla_s = model_step_seconds("xla", segments, _REPEATS.value)
    blocked_s = model_step_seconds("blocked", segments, _REPEATS.value)
    print(
      f"  {t:<5} {xla_s:>7.3f}  {blocked_s:>7.3f}  {xla_s / blocked_s:.2f}x"
    )


if __name__ == "__main__":
  app.run(main)
