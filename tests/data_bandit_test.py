"""`bandit_preferences`: explicit and sampled action pairs, through the pipeline."""

import collections

import numpy as np
import pytest

from psipo_jax.data import bandit_preferences
from psipo_jax.data import make_preference_iterator
from psipo_jax.data.testing import experiment_config

PREF = [[0.5, 0.9, 0.7], [0.1, 0.5, 0.4], [0.3, 0.6, 0.5]]


def bandit_config(tmp_path, **kw):
  options = dict(name="bandit_preferences", data_dir=tmp_path / "tfds", num_actions=3, batch_size=4)
  options.update(kw)
  return experiment_config(**options)


def test_explicit_pairs_come_back_exactly_and_ties_are_dropped(tmp_path):
  pairs = [[0, 1], [0, 2], [1, 2], [2, 2], [0, 1], [2, 0], [1, 1], [1, 0], [0, 2], [2, 1]]
  it = make_preference_iterator(bandit_config(tmp_path, pairs=pairs), "train", num_epochs=1)
  batches = list(it)
  assert len(batches) == 2
  assert set(batches[0]) == {"chosen", "rejected"}
  assert batches[0]["chosen"].dtype == np.int32 and batches[0]["chosen"].shape == (4,)
  got = collections.Counter(
      (int(w), int(l)) for b in batches for w, l in zip(b["chosen"], b["rejected"])
  )
  distinct = collections.Counter(tuple(p) for p in pairs if p[0] != p[1])
  assert sum(got.values()) == 8 and not got - distinct  # 8 of the 8 distinct pairs
  assert it.summary["prepare"]["identical_dropped"] == {"train": 2}
  assert it.summary["prepare"]["wins"]["train"][0][1] == 2


def test_sampled_pair_frequencies_match_the_preference_model():
  # P(winner=i, loser=j) = 2 mu_i mu_j P[i][j] / (1 - sum mu^2): draws y, y' ~ mu
  # conditioned on y != y', either order, and i wins with probability P[i][j].
  pref, mu, n = np.asarray(PREF), np.array([0.5, 0.3, 0.2]), 20_000
  winners, losers, dropped = bandit_preferences.sample_pairs(pref, mu, n, np.random.default_rng(0))
  assert winners.shape == losers.shape == (n,) and (winners != losers).all()
  counts = np.zeros((3, 3))
  np.add.at(counts, (winners, losers), 1)
  tie = np.sum(mu**2)
  expected = 2 * np.outer(mu, mu) * pref / (1 - tie)
  np.fill_diagonal(expected, 0)
  sigma = np.sqrt(n * expected * (1 - expected)) + 1e-9
  assert np.all(np.abs(counts - n * expected) < 5 * sigma)
  # Ties drawn on the way: geometric, mean n * tie / (1 - tie).
  mean = n * tie / (1 - tie)
  assert abs(dropped - mean) < 5 * np.sqrt(n * tie) / (1 - tie)


def test_sampled_splits_are_seeded_and_independent(tmp_path):
  cfg = bandit_config(tmp_path, preference_matrix=PREF, num_pairs={"train": 64, "test": 16},
                      behaviour_policy=[0.2, 0.3, 0.5], data_seed=7, shuffle=False)

  def actions(config, split):
    return [
        (int(w), int(l))
        for b in make_preference_iterator(config, split, num_epochs=1)
        for w, l in zip(b["chosen"], b["rejected"])
    ]

  train, test = actions(cfg, "train"), actions(cfg, "test")
  assert (len(train), len(test)) == (64, 16)
  assert actions(cfg, "train") == train
  cfg.input.num_pairs = {"a_split": 8, "train": 64, "test": 16}  # adds a split
  assert actions(cfg, "train") == train and actions(cfg, "test") == test
  assert actions(cfg, "a_split") != test[:8]
  cfg.input.data_seed = 8
  assert actions(cfg, "train") != train


def test_a_policy_on_one_action_cannot_make_pairs():
  with pytest.raises(ValueError, match="input.behaviour_policy must put mass on at least two"):
    bandit_preferences.sample_pairs(np.asarray(PREF), np.array([1.0, 0, 0]), 4, np.random.default_rng(0))
