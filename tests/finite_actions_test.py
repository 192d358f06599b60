"""One finite-action dataset, validator and sampler for every path.

The vmapped runner (`bandit.experiment.dataset_from_config`), the trainer's
`pairs` input and the `bandit_preferences` TFDS builder must see the same
pairs for the same config and seed, and refuse a self-pair the same way.
"""

import numpy as np
import pytest

from psipo_jax import bandit
from psipo_jax import finite_actions
from psipo_jax.bandit import experiment
from psipo_jax.data import make_preference_iterator
from psipo_jax.data.testing import experiment_config

PREF = [[0.5, 0.9, 0.2], [0.1, 0.5, 0.6], [0.8, 0.4, 0.5]]


def _uniform(k):
  return np.full(k, 1.0 / k)


def test_sample_pairs_follows_preference_and_mu():
  pref, mu = np.array(PREF), np.array([0.5, 0.3, 0.2])
  pairs = finite_actions.sample_pairs(pref, mu, num_pairs=40_000, data_seed=1)
  assert pairs.shape == (40_000, 2) and np.all(pairs[:, 0] != pairs[:, 1])
  wins = np.zeros((3, 3))
  np.add.at(wins, (pairs[:, 0], pairs[:, 1]), 1)
  compared = wins + wins.T
  weight = np.outer(mu, mu)  # μ ⊗ μ conditioned on y ≠ y'
  np.fill_diagonal(weight, 0)
  np.testing.assert_allclose(
    compared / compared.sum(), weight / weight.sum(), atol=0.01
  )
  off = ~np.eye(3, dtype=bool)
  np.testing.assert_allclose(wins[off] / compared[off], pref[off], atol=0.02)


def test_splits_are_seeded_independently():
  pref, mu = np.array(PREF), _uniform(3)
  draw = lambda **kw: finite_actions.sample_pairs(pref, mu, num_pairs=50, **kw)
  np.testing.assert_array_equal(
    draw(data_seed=3), draw(data_seed=3, split="train")
  )
  assert not np.array_equal(draw(data_seed=3), draw(data_seed=4))
  assert not np.array_equal(draw(data_seed=3), draw(data_seed=3, split="test"))


def _builder_pairs(tmp_path, split="train", **input_keys):
  cfg = experiment_config(
    name="bandit_preferences",
    data_dir=tmp_path / "tfds",
    num_actions=3,
    batch_size=1,
    shuffle=False,
    **input_keys,
  )
  return np.array(
    [
      [int(b["chosen"][0]), int(b["rejected"][0])]
      for b in make_preference_iterator(cfg, split, num_epochs=1)
    ]
  )


def test_runner_and_tfds_builder_sample_the_same_pairs(tmp_path):
  runner_data = experiment.dataset_from_config(
    "d",
    {
      "preference": PREF,
      "mu": [0.2, 0.3, 0.5],
      "num_pairs": 40,
      "data_seed": 11,
    },
  )
  tfds_pairs = _builder_pairs(
    tmp_path,
    preference_matrix=PREF,
    behaviour_policy=[0.2, 0.3, 0.5],
    num_pairs=40,
    data_seed=11,
  )
  np.testing.assert_array_equal(runner_data.pairs, tfds_pairs)


def test_runner_and_tfds_builder_keep_explicit_pairs_as_given(tmp_path):
  pairs = [[0, 1], [2, 0], [1, 2], [0, 1]]
  np.testing.assert_array_equal(
    experiment.dataset_from_config("d", {"pairs": pairs}).pairs, pairs
  )
  np.testing.assert_array_equal(_builder_pairs(tmp_path, pairs=pairs), pairs)


def test_a_self_pair_is_the_same_error_on_every_path(tmp_path):
  pairs = [[0, 1], [2, 2]]
  message = r"pairs\[1\] = \(2, 2\) compares an action with itself"
  with pytest.raises(ValueError, match=message):
    experiment.dataset_from_config("d", {"pairs": pairs})
  with pytest.raises(ValueError, match="input." + message):
    finite_actions.check_pairs(pairs, 3, key="input.pairs")  # the `pairs` input
  with pytest.raises(ValueError, match="input." + message):
    _builder_pairs(tmp_path, pairs=pairs)


@pytest.mark.parametrize(
  "make, match",
  [
    (
      lambda: bandit.Dataset("x", 3, _uniform(3), pairs=np.array([[0, 3]])),
      r"dataset 'x': pairs\[0\] = \(0, 3\) has an action index outside",
    ),
    (
      lambda: bandit.Dataset(
        "x", 3, np.array([0.5, 0.5, 0.0]), pairs=np.array([[0, 1]])
      ),
      "dataset 'x': pi_ref must be 3 positive probabilities",
    ),
    (
      lambda: bandit.Dataset(
        "x", 2, _uniform(2), preference=np.array([[0.5, 0.7], [0.7, 0.5]])
      ),
      r"dataset 'x': preference\[0, 1\] \+ dataset 'x': preference\[1, 0\]",
    ),
    (
      lambda: bandit.Dataset("x", 3, _uniform(3)),
      "give `pairs` or `preference`",
    ),
    (
      lambda: finite_actions.sample_pairs(
        np.array(PREF), np.array([1.0, 0, 0]), num_pairs=4, data_seed=0
      ),
      "puts no mass on two different actions",
    ),
  ],
)
def test_bad_data_names_the_culprit(make, match):
  with pytest.raises(ValueError, match=match):
    make()
