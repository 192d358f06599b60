"""`bandit_preferences`: explicit and sampled action pairs, through the pipeline."""

import collections

import numpy as np

from psipo_jax.data import make_preference_iterator
from psipo_jax.data.testing import experiment_config

PREF = [[0.5, 0.9, 0.7], [0.1, 0.5, 0.4], [0.3, 0.6, 0.5]]


def bandit_config(tmp_path, **kw):
  options = dict(
    name="bandit_preferences",
    data_dir=tmp_path / "tfds",
    num_actions=3,
    batch_size=4,
  )
  options.update(kw)
  return experiment_config(**options)


def test_explicit_pairs_come_back_exactly(tmp_path):
  pairs = [[0, 1], [0, 2], [1, 2], [2, 1], [0, 1], [2, 0], [1, 0], [0, 2]]
  it = make_preference_iterator(
    bandit_config(tmp_path, pairs=pairs), "train", num_epochs=1
  )
  batches = list(it)
  assert len(batches) == 2
  assert set(batches[0]) == {"chosen", "rejected"}
  assert batches[0]["chosen"].dtype == np.int32 and batches[0][
    "chosen"
  ].shape == (4,)
  got = collections.Counter(
    (int(w), int(l))
    for b in batches
    for w, l in zip(b["chosen"], b["rejected"])
  )
  assert got == collections.Counter(tuple(p) for p in pairs)
  assert it.summary["prepare"]["wins"]["train"][0][1] == 2


def test_sampled_splits_are_seeded_and_independent(tmp_path):
  cfg = bandit_config(
    tmp_path,
    preference_matrix=PREF,
    num_pairs={"train": 64, "test": 16},
    behaviour_policy=[0.2, 0.3, 0.5],
    data_seed=7,
    shuffle=False,
  )

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
