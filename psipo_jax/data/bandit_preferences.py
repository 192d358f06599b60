"""TFDS builder `bandit_preferences`: preference pairs over K discrete actions.

The data of the finite-action experiments (Azar et al. 2023, §5.3): each
example is a (winner, loser) pair of action indices, either

- listed explicitly (`input.pairs`, one "train" split), or
- sampled from a preference matrix P[i][j] = p*(y_i ≻ y_j) and a behaviour
  policy μ: y, y' ~ μ independently, then y wins with probability P[y][y']
  (`input.preference_matrix`, `input.behaviour_policy`, `input.num_pairs`,
  `input.data_seed`; a split's seed is derived from data_seed and the split's
  name, so adding a split leaves the others alone).

A pair with winner == loser carries no preference: it is dropped and counted
(and, when sampling, not replaced by a draw that could bias μ ⊗ μ: sampling
continues until `num_pairs` distinct pairs are kept, i.e. it samples
μ ⊗ μ conditioned on y ≠ y'). Features: chosen (int32), rejected (int32).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

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
  return BanditPreferencesConfig(name=f"k{cfg.num_actions}_{digest[:16]}", **options)


def sample_pairs(
    pref: np.ndarray, mu: np.ndarray, num_pairs: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
  """Samples `num_pairs` (winner, loser) pairs with distinct actions.

  Args:
    pref: [K, K] p(y_i ≻ y_j).
    mu: [K] behaviour policy.
    num_pairs: pairs to return.
    rng: NumPy generator.

  Returns:
    (winners [num_pairs] int32, losers [num_pairs] int32, number of draws with
    y == y' that were dropped on the way).
  """
  if np.sum(mu > 0) < 2:
    raise ValueError("input.behaviour_policy must put mass on at least two actions")
  k = len(mu)
  winners, losers, dropped = [], [], 0
  kept = 0
  while kept < num_pairs:
    chunk = 2 * (num_pairs - kept) + 16
    y, y2 = rng.choice(k, size=(2, chunk), p=mu)
    y_wins = rng.random(chunk) < pref[y, y2]
    distinct = np.flatnonzero(y != y2)[: num_pairs - kept]
    # Draws after the last pair kept are not consumed; those before it are.
    consumed = distinct[-1] + 1 if len(distinct) == num_pairs - kept else chunk
    dropped += int(consumed - np.sum(y[:consumed] != y2[:consumed]))
    winners.append(np.where(y_wins, y, y2)[distinct])
    losers.append(np.where(y_wins, y2, y)[distinct])
    kept += len(distinct)
  return (
      np.concatenate(winners).astype(np.int32),
      np.concatenate(losers).astype(np.int32),
      dropped,
  )


class BanditPreferences(tfds.core.GeneratorBasedBuilder):
  """(winner, loser) action pairs over K actions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "chosen": tfds.features.Scalar(np.int32),
            "rejected": tfds.features.Scalar(np.int32),
        }),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    bc = self.builder_config
    k = bc.num_actions
    splits, dropped = {}, {}
    if bc.pairs is not None:
      pairs = np.asarray(bc.pairs, np.int32).reshape(-1, 2)
      distinct = pairs[:, 0] != pairs[:, 1]
      splits["train"] = (pairs[distinct, 0], pairs[distinct, 1])
      dropped["train"] = int(np.sum(~distinct))
      if not distinct.any():
        raise ValueError("input.pairs holds no pair with winner != loser")
    else:
      pref = np.asarray(bc.preference_matrix, np.float64)
      mu = np.full(k, 1.0 / k) if bc.behaviour_policy is None else np.asarray(bc.behaviour_policy)
      for split, n in bc.num_pairs:
        split_key = zlib.crc32(split.encode())
        rng = np.random.default_rng(np.random.SeedSequence([bc.data_seed, split_key]))
        winners, losers, dropped[split] = sample_pairs(pref, mu / mu.sum(), n, rng)
        splits[split] = (winners, losers)
    summary = {
        "config": bc.name,
        "splits": {split: len(w) for split, (w, _) in splits.items()},
        "identical_dropped": dropped,
        # wins[i][j]: how often action i was preferred to action j.
        "wins": {
            split: np.bincount(w * k + l, minlength=k * k).reshape(k, k).tolist()
            for split, (w, l) in splits.items()
        },
    }
    summaries.write_json(os.path.join(self.data_dir, summaries.PREPARE_SUMMARY), summary)
    logging.info(
        "%s: pairs per split %s, dropped as winner == loser %s",
        self.name, summary["splits"], dropped,
    )
    return {
        split: self._generate_examples(winners=w, losers=l) for split, (w, l) in splits.items()
    }

  def _generate_examples(self, *, winners: np.ndarray, losers: np.ndarray):
    for i, (w, l) in enumerate(zip(winners.tolist(), losers.tolist())):
      yield i, {"chosen": w, "rejected": l}
