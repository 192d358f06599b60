"""Tests for psipo_jax.metrics."""

import jax.numpy as jnp
import numpy as np

from psipo_jax import metrics


def _inputs():
  rng = np.random.default_rng(0)
  return tuple(-np.abs(rng.normal(size=10)) for _ in range(4))


def test_metrics_match_numpy_definitions():
  pc, pr, rc, rr = _inputs()
  tau = 0.3
  got = metrics.preference_metrics(pc, pr, rc, rr, tau=tau)
  rc_, rr_ = tau * (pc - rc), tau * (pr - rr)
  want = {
    "rewards/chosen": rc_.mean(),
    "rewards/rejected": rr_.mean(),
    "rewards/margins": (rc_ - rr_).mean(),
    "rewards/accuracies": (rc_ > rr_).mean(),
    "logps/chosen": pc.mean(),
    "logps/rejected": pr.mean(),
    "h": ((pc - rc) - (pr - rr)).mean(),
  }
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)


def test_ties_are_not_accurate():
  z = jnp.zeros(4)
  assert (
    metrics.preference_metrics(z, z, z, z, tau=1.0)["rewards/accuracies"] == 0.0
  )


def test_weighted_metrics_equal_repeated_examples():
  pc, pr, rc, rr = _inputs()
  weight = np.array([2, 0, 1, 1, 3, 1, 0, 1, 1, 2], np.float32)
  got = metrics.preference_metrics(pc, pr, rc, rr, tau=0.5, weight=weight)
  reps = weight.astype(int)
  want = metrics.preference_metrics(
    *(np.repeat(a, reps) for a in (pc, pr, rc, rr)), tau=0.5
  )
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)


def test_missing_reference_counts_as_zero_log_probs():
  pc, pr, _, _ = _inputs()
  zeros = np.zeros_like(pc)
  got = metrics.preference_metrics(pc, pr, None, None, tau=0.5)
  want = metrics.preference_metrics(pc, pr, zeros, zeros, tau=0.5)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], err_msg=k)
