r"""Peak memory of the jitted log-prob loss + gradient: memory-lean vs naive.

    PYTHONPATH=. python benchmarks/logprobs_memory.py [--chunk_sizes=16,32,64] [--time]

For N rows of T positions, hidden size d and vocabulary V (default the
issue's N=16, T=1024, d=512, V=32,000), compiles

    (hidden [N, T, d], W [d, V], labels [N, T], mask [N, T])
        -> value_and_grad(Σ_n sequence log-prob_n) w.r.t. (hidden, W)

with `jax.ShapeDtypeStruct` inputs (nothing is allocated) through
`psipo_jax.logprobs.token_logps_naive` (full [N, T, V] logits) and
`token_logps_chunked` at each chunk size, and prints XLA's compiled memory
analysis: temporaries, arguments + outputs, and their total (the peak of
the program), with the lean/naive ratio of each. Chunk sizes count
positions per row; a chunk holds N × chunk_size tokens.

The memory of a compiled program does not depend on the values of the mask:
the lean path's buffers are the same whether half or all of the positions
are scored. What the mask changes is the work (the trip count of the chunk
loop); `--time` runs the lean path once with half and once with all
positions scored and prints the two times (expected ratio ≈ 0.5: only
scored positions reach the LM head). Float32 by default; `--dtype=bfloat16`
gives bf16 hidden states and W.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from psipo_jax import logprobs

_N = flags.DEFINE_integer("rows", 16, "N: sequences (rows) in the batch.")
_T = flags.DEFINE_integer("length", 1024, "T: positions per row.")
_D = flags.DEFINE_integer("embed_dim", 512, "d: hidden size.")
_V = flags.DEFINE_integer("vocab_size", 32_000, "V: vocabulary size.")
_CHUNKS = flags.DEFINE_list(
  "chunk_sizes",
  ["16", "32", "64"],
  "Lean path chunk sizes (positions per row).",
)
_DTYPE = flags.DEFINE_enum(
  "dtype", "float32", ["float32", "bfloat16"], "dtype of hidden states and W."
)
_TIME = flags.DEFINE_bool(
  "time", False, "Also time the lean path with half vs all positions scored."
)


def _loss_and_grad(token_fn):
  def loss(hidden, w, labels, mask):
    sums, _ = logprobs.sequence_sums(token_fn(hidden, w, labels, mask), mask)
    return jnp.sum(sums)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _memory(fn, shapes):
  stats = fn.lower(*shapes).compile().memory_analysis()
  io = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
  )
  return stats.temp_size_in_bytes, io, stats.temp_size_in_bytes + io


def _chunked(chunk_size):
  return lambda *args: logprobs.token_logps_chunked(
    *args, chunk_size=chunk_size
  )


def _time_lean(chunk_size, n, t, d, v, dtype):
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(n, t, d)), dtype)
  w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
  labels = jnp.asarray(rng.integers(0, v, size=(n, t)), jnp.int32)
  step = _loss_and_grad(_chunked(chunk_size))
  times = {}
  for fraction in (0.5, 1.0):
    mask = np.zeros((n, t), bool)
    mask[:, t - int(fraction * t) : t - 1] = (
      True  # a prompt then a response; last position never scored
    )
    mask = jnp.asarray(mask)
    jax.block_until_ready(
      step(hidden, w, labels, mask)
    )  # compile (same program for both)
    start = time.perf_counter()
    jax.block_until_ready(step(hidden, w, labels, mask))
    times[fraction] = time.perf_counter() - start
  return times


def main(argv):
  del argv
  n, t, d, v = _N.value, _T.value, _D.value, _V.value
  dtype = jnp.dtype(_DTYPE.value)
  shapes = (
    jax.ShapeDtypeStruct((n, t, d), dtype),
    jax.ShapeDtypeStruct((d, v), dtype),
    jax.ShapeDtypeStruct((n, t), jnp.int32),
    jax.ShapeDtypeStruct((n, t), jnp.bool_),
  )
  print(
    f"jax {jax.__version__} on {jax.devices()[0].platform}; N={n} T={t} d={d} V={v} {dtype.name}"
  )
  gb = 1e9
  naive = _memory(_loss_and_grad(logprobs.token_logps_naive), shapes)
  print(
    f"{'path':<28}{'temp GB':>9}{'args+out GB':>13}{'total GB':>10}{'temp ratio':>12}{'total ratio':>13}"
  )
  print(
    f"{'naive':<28}{naive[0] / gb:>9.3f}{naive[1] / gb:>13.3f}{naive[2] / gb:>10.3f}"
  )
  for chunk in map(int, _CHUNKS.value):
    lean = _memory(_loss_and_grad(_chunked(chunk)), shapes)
    name = f"chunked {chunk}/row ({n * chunk} tok)"
    print(
      f"{name:<28}{lean[0] / gb:>9.3f}{lean[1] / gb:>13.3f}{lean[2] / gb:>10.3f}"
      f"{lean[0] / naive[0]:>11.1%}{lean[2] / naive[2]:>13.1%}"
    )
  print(
    "(compiled memory is independent of the mask: the same for half or all positions scored)"
  )
  if _TIME.value:
    chunk = int(_CHUNKS.value[-1])
    times = _time_lean(chunk, n, t, d, v, dtype)
    print(
      f"lean path, chunk {chunk}/row, run time: half the positions scored {times[0.5]:.2f} s,"
      f" all {times[1.0]:.2f} s (ratio {times[0.5] / times[1.0]:.2f})"
    )


if __name__ == "__main__":
  app.run(main)
