"""Tests for psipo_jax.stats."""

import math

import numpy as np

from psipo_jax import stats


def test_student_t_half_width():
  mean, half = stats.mean_and_ci([1.0, 2.0, 3.0])
  # t_{0.975, 2} = 4.302653; standard error 1/√3.
  assert mean == 2.0
  np.testing.assert_allclose(half, 4.302653 / math.sqrt(3), rtol=1e-6)


def test_single_value_spread_is_unknown_unless_declared_deterministic():
  assert np.isnan(stats.mean_and_ci([4.0])[1])
  assert stats.mean_and_ci([4.0], single=0.0)[1] == 0.0
