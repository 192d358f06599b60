"""Finite-action preference data: one dataset, one validator, one sampler.

The data of the paper's illustrative experiments (Azar et al.,
arXiv:2310.12036, §5.3): K actions, observed (winner, loser) pairs and/or a
known preference matrix p*(y_i ≻ y_j). Every path that trains on such data —
the vmapped sweep runner (`psipo_jax.bandit`), the training system's
in-memory `pairs` input and the `bandit_preferences` TFDS builder — checks
it with the functions here and samples pairs with :func:`sample_pairs`, so
the same config and seed give the same pairs on every path.

The self-pair rule, the same everywhere: a pair whose winner equals its
loser carries no preference, and is an error naming the pair
(`psi.validate_pairs`). Sampling from a preference matrix never produces one:
it draws (y, y') from μ ⊗ μ conditioned on y ≠ y' (nobody compares a response
with itself; the y = y' terms of Eq. 13 are zero anyway).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Optional

import numpy as np

from psipo_jax import psi


def check_pairs(pairs: Any, num_actions: int, *, key: str) -> np.ndarray:
  """`pairs` as `[N, 2]` int32 (winner, loser), or a ValueError naming `key`.

  Refuses an empty list, non-integer entries, an action outside
  [0, num_actions) and a self-pair; the error names the entry, e.g.
  "input.pairs[3] = (1, 1) compares an action with itself".
  """
  array = np.asarray(pairs)
  if (
    array.ndim != 2
    or array.shape[1] != 2
    or len(array) == 0
    or not np.issubdtype(array.dtype, np.integer)
  ):
    raise ValueError(
      f"{key} must be a non-empty list of (winner, loser) integer pairs;"
      f" got {_short(pairs)}."
    )
  try:
    psi.validate_pairs(array, num_actions)
  except ValueError as e:  # "pairs[3] = ..." -> "input.pairs[3] = ..."
    raise ValueError(f"{key}{str(e)[len('pairs') :]}") from None
  return array.astype(np.int32)


def check_preference(pref: Any, num_actions: int, *, key: str) -> np.ndarray:
  """A valid `[K, K]` preference matrix as float64, or a ValueError naming `key`."""
  array = np.asarray(pref, np.float64)
  if array.shape != (num_actions, num_actions):
    raise ValueError(
      f"{key} must be {num_actions}×{num_actions}; got shape {array.shape}."
    )
  try:
    psi.validate_preference(array)
  except (
    ValueError
  ) as e:  # "pref[i, j] ..." -> "input.preference_matrix[i, j] ..."
    message = str(e)
    if message.startswith("pref"):
      message = key + message[len("pref") :]
    raise ValueError(message.replace(" pref[", f" {key}[")) from None
  return array


def check_distribution(
  p: Any, num_actions: int, *, key: str, positive: bool = False
) -> np.ndarray:
  """`[K]` probabilities (all > 0 if `positive`) as float64, or a ValueError naming `key`."""
  array = np.asarray(p, np.float64)
  bad = array <= 0 if positive else array < 0
  if (
    array.shape != (num_actions,)
    or not np.all(np.isfinite(array))
    or np.any(bad)
    or not np.isclose(array.sum(), 1.0, atol=1e-6)
  ):
    kind = "positive" if positive else "non-negative"
    raise ValueError(
      f"{key} must be {num_actions} {kind} probabilities summing to 1;"
      f" got {_short(p)}."
    )
  return array


def _short(value: Any) -> str:
  text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
  return text if len(text) <= 120 else text[:117] + "..."


def split_seed(data_seed: int, split: str) -> np.random.SeedSequence:
  """The seed of split `split`'s sampled pairs: adding a split leaves the
  others' pairs alone."""
  return np.random.SeedSequence([int(data_seed), zlib.crc32(split.encode())])


def sample_pairs(
  preference: np.ndarray,
  mu: np.ndarray,
  *,
  num_pairs: int,
  data_seed: int,
  split: str = "train",
) -> np.ndarray:
  """Draws a fixed dataset of comparisons from a known preference matrix.

  Each pair compares two different actions, (y, y') drawn with probability
  ∝ μ(y)μ(y') for y ≠ y', and y wins with probability p*(y ≻ y'). The draws
  are a function of `(data_seed, split)` alone (:func:`split_seed`).

  Args:
    preference: `[K, K]` p*(y_i ≻ y_j).
    mu: `[K]` behaviour policy μ.
    num_pairs: N ≥ 1.
    data_seed: seed of the draws.
    split: the split being drawn ("train" for a single dataset).

  Returns:
    `[N, 2]` int32 (winner, loser) pairs.
  """
  k = len(mu)
  weight = np.outer(mu, mu)
  np.fill_diagonal(weight, 0.0)
  if weight.sum() <= 0:
    raise ValueError(f"mu = {list(mu)} puts no mass on two different actions.")
  rng = np.random.default_rng(split_seed(data_seed, split))
  flat = rng.choice(k * k, size=num_pairs, p=(weight / weight.sum()).ravel())
  first, second = np.divmod(flat, k)
  first_wins = rng.random(num_pairs) < np.asarray(preference)[first, second]
  winners = np.where(first_wins, first, second)
  losers = np.where(first_wins, second, first)
  return np.stack([winners, losers], axis=1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A finite action space with observed pairs and/or a known preference.

  Attributes:
    name: label used in tables, files and figures.
    num_actions: K.
    pi_ref: `[K]` reference policy (the init of θ is `log pi_ref`).
    pairs: `[N, 2]` int (winner, loser) pairs the sampled losses train on;
      `None` for a population-only problem.
    preference: `[K, K]` `p*(y_i ≻ y_j)` when known (needed by the
      population losses and the ΨPO closed forms), else `None`.
    mu: `[K]` behaviour policy μ of the population losses (default uniform).
  """

  name: str
  num_actions: int
  pi_ref: np.ndarray
  pairs: Optional[np.ndarray] = None
  preference: Optional[np.ndarray] = None
  mu: Optional[np.ndarray] = None

  def __post_init__(self):
    k = self.num_actions
    where = f"dataset {self.name!r}"
    if k < 2:
      raise ValueError(f"{where}: needs at least 2 actions; got {k}.")
    # Frozen: the validated arrays replace the given ones here only.
    set_ = lambda field, value: object.__setattr__(self, field, value)
    set_(
      "pi_ref",
      check_distribution(self.pi_ref, k, key=f"{where}: pi_ref", positive=True),
    )
    if self.pairs is None and self.preference is None:
      raise ValueError(f"{where}: give `pairs` or `preference` (or both).")
    if self.pairs is not None:
      set_("pairs", check_pairs(self.pairs, k, key=f"{where}: pairs"))
    if self.preference is not None:
      set_(
        "preference",
        check_preference(self.preference, k, key=f"{where}: preference"),
      )
    mu = np.full(k, 1.0 / k) if self.mu is None else self.mu
    set_("mu", check_distribution(mu, k, key=f"{where}: mu"))
