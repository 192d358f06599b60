"""Tests of the optimiser and schedule built from the `optimizer.*` config."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from psipo_jax import optimizers


def _config(**overrides):
  config = ml_collections.ConfigDict({"name": "adam", "learning_rate": 0.1})
  config.update(overrides)
  return config


def test_constant_schedule_without_clipping_is_plain_optax():
  optimizer, schedule = optimizers.make_optimizer(
    _config(b1=0.8), total_steps=10
  )
  reference = optax.adam(0.1, b1=0.8)
  params, grads = jnp.array([1.0, -2.0]), jnp.array([0.3, -0.7])
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  expected, _ = reference.update(grads, reference.init(params), params)
  np.testing.assert_array_equal(updates, expected)
  assert schedule(7) == pytest.approx(0.1)


def test_gradient_clipping_bounds_the_update():
  optimizer, _ = optimizers.make_optimizer(
    _config(name="sgd", learning_rate=1.0, grad_clip_norm=1.0), total_steps=10
  )
  params = jnp.zeros(2)
  updates, _ = optimizer.update(
    jnp.array([6.0, 8.0]), optimizer.init(params), params
  )
  np.testing.assert_allclose(updates, [-0.6, -0.8], rtol=1e-6)


def test_warmup_then_cosine_decay():
  _, schedule = optimizers.make_optimizer(
    _config(schedule="cosine", warmup_steps=10), total_steps=110
  )
  assert schedule(0) == 0.0
  assert schedule(5) == pytest.approx(0.05)
  assert schedule(10) == pytest.approx(0.1)
  assert schedule(60) == pytest.approx(0.05)
  assert schedule(110) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
  "overrides, key",
  [
    (dict(name="adamax"), "optimizer.name"),
    (dict(momentum=0.9), "optimizer.momentum"),
    (dict(learning_rate=0.0), "optimizer.learning_rate"),
    (dict(schedule="step"), "optimizer.schedule"),
    (dict(warmup_steps=10), "optimizer.warmup_steps"),
  ],
)
def test_bad_optimizer_config_names_the_key(overrides, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    optimizers.make_optimizer(_config(**overrides), total_steps=10)
