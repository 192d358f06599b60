"""Tests of the in-memory pair sampler of the finite-action experiments."""

import collections

import jax
import numpy as np
import pytest

from psipo_jax import data_order
from psipo_jax import finite_actions
from psipo_jax import pair_sampler

PAIRS = np.array([[0, 1], [1, 2], [0, 2]], np.int32)


def _sampler(**kwargs):
  return pair_sampler.PairSampler(
    PAIRS, batch_size=8, data_key=jax.random.PRNGKey(1), **kwargs
  )


def test_batches_follow_the_documented_formula():
  sampler = _sampler()
  for step in range(3):
    batch = next(sampler)
    idx = np.asarray(
      data_order.minibatch_indices(
        jax.random.PRNGKey(1), step, batch_size=8, dataset_size=3
      )
    )
    np.testing.assert_array_equal(batch["chosen"], PAIRS[idx, 0])
    np.testing.assert_array_equal(batch["rejected"], PAIRS[idx, 1])


def test_set_state_resumes_the_same_sequence():
  uninterrupted = _sampler()
  batches = [next(uninterrupted) for _ in range(5)]
  first = _sampler()
  next(first), next(first)
  resumed = _sampler()
  resumed.set_state(first.get_state())
  assert resumed.get_state()["step"] == 2
  for expected in batches[2:]:
    np.testing.assert_array_equal(next(resumed)["chosen"], expected["chosen"])


@pytest.mark.parametrize(
  "change",
  [
    dict(pairs=PAIRS[::-1].copy()),
    dict(batch_size=4),
    dict(data_key=jax.random.PRNGKey(2)),
  ],
)
def test_set_state_refuses_the_position_of_another_data_order(change):
  saved = _sampler()
  next(saved)
  kwargs = dict(pairs=PAIRS, batch_size=8, data_key=jax.random.PRNGKey(1))
  kwargs.update(change)
  other = pair_sampler.PairSampler(kwargs.pop("pairs"), **kwargs)
  with pytest.raises(ValueError, match="another data order"):
    other.set_state(saved.get_state())


def test_process_rows_partition_the_global_batch():
  whole = next(_sampler())
  halves = [next(_sampler(rows=slice(0, 4))), next(_sampler(rows=slice(4, 8)))]
  np.testing.assert_array_equal(
    np.concatenate([h["chosen"] for h in halves]), whole["chosen"]
  )


def test_all_pairs_batch_weights_every_pair_equally():
  batch = pair_sampler.all_pairs_batch(PAIRS, multiple=8)
  assert len(batch["chosen"]) % 8 == 0
  counts = collections.Counter(
    zip(batch["chosen"].tolist(), batch["rejected"].tolist())
  )
  assert (
    set(counts) == {(0, 1), (1, 2), (0, 2)} and len(set(counts.values())) == 1
  )


@pytest.mark.parametrize(
  "pairs, message",
  [([[0, 3]], r"input.pairs\[0\]"), ([[1, 1]], "itself"), ([], "non-empty")],
)
def test_bad_pairs_are_named(pairs, message):
  with pytest.raises(ValueError, match=message):
    finite_actions.check_pairs(pairs, 3, key="input.pairs")
