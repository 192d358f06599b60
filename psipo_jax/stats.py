"""Seed statistics shared by the bandit tables and `launch/collect.py`.

NumPy and SciPy only (no JAX), so that collecting a sweep stays light.
"""

from __future__ import annotations

import numpy as np
import scipy.stats


def mean_and_ci(
  values, *, level: float = 0.95, single: float = float("nan")
) -> tuple[np.ndarray, np.ndarray]:
  """Mean over axis 0 and the half-width of its Student-t confidence interval.

  Args:
    values: ``[n, ...]`` one row per seed.
    level: the interval's coverage.
    single: the half-width reported for n = 1: NaN (unknown spread) by
      default; 0 for a run that is deterministic by construction.

  Returns:
    ``(mean [...], half_width [...])``.
  """
  values = np.asarray(values, np.float64)
  n = values.shape[0]
  mean = values.mean(axis=0)
  if n < 2:
    return mean, np.full_like(mean, single)
  sem = values.std(axis=0, ddof=1) / np.sqrt(n)
  return mean, scipy.stats.t.ppf(0.5 + level / 2, df=n - 1) * sem
