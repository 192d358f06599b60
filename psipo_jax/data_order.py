"""Which pairs each step trains on: counter-based mini-batch indices.

One definition below every finite-action training path — the vmapped sweep
runner (`psipo_jax.bandit`) and the training system's in-memory `pairs`
input (`psipo_jax.pair_sampler`) — so that a run of either draws the same
pairs for the same seed, and any step's batch can be recomputed alone (a
resumed run continues with exactly the batches an uninterrupted one sees).

    init_key, state_key, data_key = run_keys(seed)
    indices_s = minibatch_indices(data_key, s, batch_size=B, dataset_size=N)

Step s (0-based) trains on `pairs[indices_s]`: B pairs drawn uniformly with
replacement, as in the paper's illustrative experiments (Azar et al.,
arXiv:2310.12036, §5.4).
"""

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def run_keys(seed: int) -> tuple[Array, Array, Array]:
  """The (init, state, data) raw keys of run `seed`, each `uint32[2]`.

  `split(key(seed), 3)` of the Threefry-2x32 implementation, whatever
  `jax_default_prng_impl` says, because :func:`minibatch_indices` hashes the
  data key with Threefry directly.
  """
  init_key, state_key, data = map(jax.random.key_data, _split(seed))
  return init_key, state_key, data


def data_key(seed: int) -> Array:
  """The typed key that fixes run `seed`'s data order: `run_keys(seed)[2]`."""
  return _split(seed)[2]


def _split(seed: int) -> Array:
  return jax.random.split(jax.random.key(seed, impl="threefry2x32"), 3)


def raw_key(key: Any) -> Array:
  """A typed or raw Threefry key as raw `uint32[2]` key data."""
  if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  key = jnp.asarray(key, jnp.uint32)
  if key.shape != (2,):
    raise ValueError(
      f"key must be one Threefry key (raw shape (2,)); got shape {key.shape}."
    )
  return key


# Threefry-2x32 rotation constants (Salmon et al., SC'11, Table 4), applied
# in groups of four rounds, alternating.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(
  key_0: Array, key_1: Array, count_0: Array, count_1: Array
) -> tuple[Array, Array]:
  """The Threefry-2x32 block function, 20 rounds, elementwise on uint32.

  Bit-identical to `jax.extend.random.threefry2x32_p` (and so to
  `jax.random`'s default generator), but written out round by round: XLA
  fuses it into one vectorised loop, where the primitive's CPU lowering loops
  over the rounds and was about ten times slower here, and slower to compile.

  Reference: Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy
  as 1, 2, 3", SC 2011.
  """
  key_2 = key_0 ^ key_1 ^ jnp.uint32(0x1BD11BDA)
  schedule = (key_0, key_1, key_2)
  x_0, x_1 = count_0 + key_0, count_1 + key_1
  for group in range(5):
    for rotation in _THREEFRY_ROTATIONS[group % 2]:
      x_0 = x_0 + x_1
      x_1 = (x_1 << jnp.uint32(rotation)) | (x_1 >> jnp.uint32(32 - rotation))
      x_1 = x_1 ^ x_0
    x_0 = x_0 + schedule[(group + 1) % 3]
    x_1 = x_1 + schedule[(group + 2) % 3] + jnp.uint32(group + 1)
  return x_0, x_1


def mul_high_u32(a: Array, b: Array) -> Array:
  """⌊a·b / 2³²⌋ for uint32 a, b, exactly, without 64-bit integers."""
  mask = jnp.uint32(0xFFFF)
  sixteen = jnp.uint32(16)
  a_hi, a_lo = a >> sixteen, a & mask
  b_hi, b_lo = b >> sixteen, b & mask
  lo_lo, lo_hi, hi_lo = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo
  # The middle column's carry into the high word; each term is < 2¹⁶.
  middle = (lo_lo >> sixteen) + (lo_hi & mask) + (hi_lo & mask)
  return (
    a_hi * b_hi + (lo_hi >> sixteen) + (hi_lo >> sixteen) + (middle >> sixteen)
  )


def minibatch_indices(
  key: Array, step: Any, *, batch_size: int, dataset_size: Any
) -> Array:
  """Dataset indices of the mini-batch that step `step` trains on.

  Counter-based, so the indices of a step depend only on
  `(key, step, batch_size, dataset_size)` — never on how many steps are
  drawn at once, on other runs, or on vmap. Slot `j` of step `s` takes the
  32-bit word

      w = Threefry-2x32(key, counter=(s, j))[0]

  (the first output word of the raw 20-round block function,
  :func:`threefry2x32`) and maps it to `⌊w · N / 2³²⌋` (multiply-shift), a
  uniform draw from {0, …, N−1} up to a bias below N / 2³². Sampling is with
  replacement, as in the paper.

  Why not `jax.random.randint(jax.random.fold_in(key, s), ...)`: it is
  counter-based too, but costs about ten times more here (a split and two
  draws per index, the hash's CPU lowering looping over rounds), and the
  random numbers dominate the cost of a bandit sweep. The `rbg` generator
  is cheap but its batched form under `vmap` reads only the first key, so a
  run inside a sweep would not equal the same run alone.

  Args:
    key: a Threefry key (`data_key(seed)`), typed or raw `uint32[2]`.
    step: integer step, or an integer array of steps of any shape.
    batch_size: B, static.
    dataset_size: N ≥ 1, may be traced (≤ 2³² − 1).

  Returns:
    `int32` indices of shape `step.shape + (batch_size,)`.

  Examples:
    >>> from psipo_jax import data_order
    >>> idx = data_order.minibatch_indices(
    ...     data_order.data_key(0), 5, batch_size=4, dataset_size=3)
    >>> idx.shape, bool(((idx >= 0) & (idx < 3)).all())
    ((4,), True)
  """
  key = raw_key(key)
  step = jnp.asarray(step, jnp.uint32)
  shape = step.shape + (batch_size,)
  counter_hi = jnp.broadcast_to(step[..., None], shape)
  counter_lo = jnp.broadcast_to(jnp.arange(batch_size, dtype=jnp.uint32), shape)
  # One word per block: pairing both words of a block into adjacent slots
  # would interleave two arrays, which XLA's CPU backend does not fuse and
  # which cost 8× the hash itself.
  words, _ = threefry2x32(key[0], key[1], counter_hi, counter_lo)  # [..., B]
  size = jnp.asarray(dataset_size, jnp.uint32)
  return mul_high_u32(words, size).astype(jnp.int32)
