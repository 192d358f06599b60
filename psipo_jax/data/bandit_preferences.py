"""TFDS builder `bandit_preferences`: preference pairs over K discrete actions.

The data of the finite-action experiments (Azar et al. 2023, §5.3): each
example is a (winner, loser) pair of action indices, either

- listed explicitly (`input.pairs`, one "train" split, in the given order),
  or
- sampled from a preference matrix P[i][j] = p*(y_i ≻ y_j) and a behaviour
  policy μ (`input.preference_matrix`, `input.behaviour_policy`,
  `input.num_pairs`, `input.data_seed`) by `finite_actions.sample_pairs`:
  the pairs the vmapped runner trains on for the same keys, split by split
  (a split's draws depend on data_seed and the split's name only, so adding
  a split leaves the others alone).

Validation is `finite_actions`' too: a pair whose winner equals its loser is
an error naming it, on this path as on every other. Features: chosen
(int32), rejected (int32).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from psipo_jax import finite_actions
from psipo_jax.data import config as config_lib
from psipo_jax.data import summaries


@dataclasses.dataclass(eq=False)
class BanditPreferencesConfig(tfds.core.BuilderConfig):
  num_actions: int = 2
  pairs: tuple[tuple[int, int], ...] | None = None
  preference_matrix: tuple[tuple[float, ...], ...] | None = None
  behaviour_policy: tuple[float, ...] | None = None
  num_pairs: tuple[tuple[str, int], ...] | None = None
  data_seed: int = 0


def builder_config(cfg: config_lib.InputConfig) -> BanditPreferencesConfig:
  options = dict(
    num_actions=cfg.num_actions,
    pairs=cfg.pairs,
    preference_matrix=cfg.preference_matrix,
    behaviour_policy=cfg.behaviour_policy,
    num_pairs=cfg.num_pairs,
    data_seed=cfg.data_seed,
  )
  digest = hashlib.sha256(json.dumps(options).encode()).hexdigest()
  return BanditPreferencesConfig(
    name=f"k{cfg.num_actions}_{digest[:16]}", **options
  )


class BanditPreferences(tfds.core.GeneratorBasedBuilder):
  """(winner, loser) action pairs over K actions."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
    "1.0.0": "First release.",
    "2.0.0": "Pairs sampled by finite_actions.sample_pairs (the runner's"
    " pairs); a self-pair is an error, no longer dropped.",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "chosen": tfds.features.Scalar(np.int32),
          "rejected": tfds.features.Scalar(np.int32),
        }
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    bc = self.builder_config
    k = bc.num_actions
    splits = {}
    if bc.pairs is not None:
      pairs = finite_actions.check_pairs(bc.pairs, k, key="input.pairs")
      splits["train"] = (pairs[:, 0], pairs[:, 1])
    else:
      pref = finite_actions.check_preference(
        bc.preference_matrix, k, key="input.preference_matrix"
      )
      mu = finite_actions.check_distribution(
        np.full(k, 1.0 / k)
        if bc.behaviour_policy is None
        else bc.behaviour_policy,
        k,
        key="input.behaviour_policy",
      )
      for split, n in bc.num_pairs:
        pairs = finite_actions.sample_pairs(
          pref, mu, num_pairs=n, data_seed=bc.data_seed, split=split
        )
        splits[split] = (pairs[:, 0], pairs[:, 1])
    summary = {
      "config": bc.name,
      "splits": {split: len(w) for split, (w, _) in splits.items()},
      # wins[i][j]: how often action i was preferred to action j.
      "wins": {
        split: np.bincount(w * k + l, minlength=k * k).reshape(k, k).tolist()
        for split, (w, l) in splits.items()
      },
    }
    summaries.write_json(
      os.path.join(self.data_dir, summaries.PREPARE_SUMMARY), summary
    )
    logging.info("%s: pairs per split %s", self.name, summary["splits"])
    return {
      split: self._generate_examples(winners=w, losers=l)
      for split, (w, l) in splits.items()
    }

  def _generate_examples(self, *, winners: np.ndarray, losers: np.ndarray):
    for i, (w, l) in enumerate(zip(winners.tolist(), losers.tolist())):
      yield i, {"chosen": w, "rejected": l}
