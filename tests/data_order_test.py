"""Tests of the data order (psipo_jax.data_order): the Threefry block,
the run keys and the counter-based mini-batch indices."""

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np

from psipo_jax import data_order

# Eager calls would compile every primitive anew for each call.
indices = jax.jit(data_order.minibatch_indices, static_argnames="batch_size")


def test_threefry_block_matches_known_answer_and_jax():
  # Random123's known-answer vector for Threefry-2x32, 20 rounds.
  threefry = jax.jit(data_order.threefry2x32)
  out = threefry(
    jnp.uint32(0x13198A2E),
    jnp.uint32(0x03707344),
    jnp.uint32(0x243F6A88),
    jnp.uint32(0x85A308D3),
  )
  assert [int(x) for x in out] == [0xC4923A9C, 0x483DF7A0]
  # And jax's own block function on random inputs.
  words = jax.random.bits(jax.random.key(1), (4, 1000), jnp.uint32)
  np.testing.assert_array_equal(
    jnp.stack(threefry(*words)),
    jnp.stack(jex_random.threefry2x32_p.bind(*words)),
  )


def test_data_key_is_the_training_systems_data_key():
  # The trainer's (init, state, data) keys are split(PRNGKey(seed), 3).
  for seed in (0, 7, 2**31 - 1):
    np.testing.assert_array_equal(
      jax.random.key_data(data_order.data_key(seed)),
      jax.random.split(jax.random.PRNGKey(seed), 3)[2],
    )
    for got, want in zip(
      data_order.run_keys(seed), jax.random.split(jax.random.PRNGKey(seed), 3)
    ):
      np.testing.assert_array_equal(got, want)


def test_mul_high_is_exact():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 2**32, size=10_000, dtype=np.uint64)
  b = rng.integers(0, 2**32, size=10_000, dtype=np.uint64)
  b[:4] = [1, 3, 2**16, 2**32 - 1]
  a[:4] = 2**32 - 1
  got = data_order.mul_high_u32(
    jnp.asarray(a, jnp.uint32), jnp.asarray(b, jnp.uint32)
  )
  np.testing.assert_array_equal(np.asarray(got), (a * b) >> np.uint64(32))


def test_minibatch_indices_do_not_depend_on_chunking_or_vmap():
  key = data_order.data_key(7)
  chunk = indices(key, jnp.arange(40, 60), batch_size=9, dataset_size=5)
  assert chunk.shape == (20, 9) and chunk.dtype == jnp.int32
  for i, step in enumerate(range(40, 60)):
    alone = indices(key, step, batch_size=9, dataset_size=5)
    np.testing.assert_array_equal(chunk[i], alone)
  # Raw key data and a typed key give the same stream.
  np.testing.assert_array_equal(
    chunk,
    indices(
      jax.random.key_data(key), jnp.arange(40, 60), batch_size=9, dataset_size=5
    ),
  )
  # Inside vmap over keys and sizes, each run sees its own stream.
  keys = jax.random.key_data(jax.vmap(data_order.data_key)(jnp.arange(4)))
  sizes = jnp.array([5, 3, 5, 2], jnp.uint32)
  batched = jax.jit(
    jax.vmap(
      lambda k, n: data_order.minibatch_indices(
        k, jnp.arange(40, 60), batch_size=9, dataset_size=n
      )
    )
  )(keys, sizes)
  for seed in range(4):
    np.testing.assert_array_equal(
      batched[seed],
      indices(
        data_order.data_key(seed),
        jnp.arange(40, 60),
        batch_size=9,
        dataset_size=int(sizes[seed]),
      ),
    )
  # A batch of 8 is the first 8 of a batch of 9.
  np.testing.assert_array_equal(
    indices(key, 3, batch_size=8, dataset_size=5),
    indices(key, 3, batch_size=9, dataset_size=5)[:8],
  )


def test_minibatch_indices_are_uniform():
  idx = np.asarray(
    indices(
      data_order.data_key(0), jnp.arange(20_000), batch_size=9, dataset_size=3
    )
  )
  assert idx.min() == 0 and idx.max() == 2
  freq = np.bincount(idx.ravel(), minlength=3) / idx.size
  # 180,000 draws: the standard error of each frequency is 0.0011.
  np.testing.assert_allclose(freq, 1 / 3, atol=0.005)
  # Steps and slots are not correlated: slot 0 of step s vs slot 0 of s+1.
  same = np.mean(idx[1:, 0] == idx[:-1, 0])
  assert abs(same - 1 / 3) < 0.02
