"""Tests of TrainState.create: policy, reference and optimiser state."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from psipo_jax.models import TabularPolicy
from psipo_jax.train_state import TrainState


def _model():
  return TabularPolicy(jnp.log(jnp.array([0.5, 0.3, 0.2])))


def test_default_reference_is_a_separate_copy_of_the_initial_policy():
  optimizer = optax.adam(0.1)
  graphdef, state = TrainState.create(
    _model(), optimizer, rng=jax.random.PRNGKey(3)
  )
  chex.assert_trees_all_equal(state.ref_params, state.params)
  # Separate buffers: donating the state must not alias policy and reference.
  assert (
    state.ref_params["logits"].unsafe_buffer_pointer()
    != state.params["logits"].unsafe_buffer_pointer()
  )
  chex.assert_trees_all_equal(state.opt_state, optimizer.init(state.params))
  assert int(state.step) == 0 and int(state.skipped_updates) == 0
  np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(3))
  rebuilt = nnx.merge(graphdef, state.params)
  assert isinstance(rebuilt, TabularPolicy)
  np.testing.assert_array_equal(rebuilt.logits[...], _model().logits[...])


def test_explicit_reference_and_no_reference():
  ref = {"logits": jnp.zeros(3)}
  _, state = TrainState.create(
    _model(), optax.sgd(0.1), rng=jax.random.PRNGKey(0), ref_params=ref
  )
  np.testing.assert_array_equal(state.ref_params["logits"], np.zeros(3))
  assert not np.array_equal(state.params["logits"], np.zeros(3))
  _, state = TrainState.create(
    _model(), optax.sgd(0.1), rng=jax.random.PRNGKey(0), ref_params=None
  )
  assert state.ref_params is None


def test_reference_of_another_shape_is_rejected():
  with pytest.raises(ValueError, match="ref_params"):
    TrainState.create(
      _model(),
      optax.sgd(0.1),
      rng=jax.random.PRNGKey(0),
      ref_params={"logits": jnp.zeros(4)},
    )


def test_non_param_state_is_rejected():
  class WithStats(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros(2))
      self.count = nnx.BatchStat(jnp.zeros(()))

  with pytest.raises(ValueError, match="nnx.Param"):
    TrainState.create(WithStats(), optax.sgd(0.1), rng=jax.random.PRNGKey(0))
