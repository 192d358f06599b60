"""The one update core (psipo_jax.update): keep a finite update, drop the rest."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from psipo_jax import update as update_lib

PARAMS = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
GRADS = {"w": jnp.array([0.1, 0.2]), "b": jnp.array(-0.3)}


def _overflowing_state() -> optax.GradientTransformation:
  """Plain SGD whose state accumulates 3e38·g: inf once Σg ≥ 2, while the
  parameters, the loss and the gradient stay finite."""

  def init(params):
    return {"acc": jax.tree.map(jnp.zeros_like, params)}

  def update(grads, state, params=None):
    del params
    acc = jax.tree.map(lambda a, g: a + 3e38 * g, state["acc"], grads)
    return jax.tree.map(lambda g: -0.1 * g, grads), {"acc": acc}

  return optax.GradientTransformation(init, update)


def test_a_finite_update_is_the_optimizers_update():
  optimizer = optax.adam(0.1)
  state = optimizer.init(PARAMS)
  result = update_lib.apply_update(
    optimizer, GRADS, PARAMS, state, jnp.float32(1.0)
  )
  updates, want_state = optimizer.update(GRADS, state, PARAMS)
  want = optax.apply_updates(PARAMS, updates)
  assert bool(result.finite) and bool(result.opt_state_finite)
  jax.tree.map(np.testing.assert_array_equal, result.params, want)
  jax.tree.map(np.testing.assert_array_equal, result.opt_state, want_state)
  np.testing.assert_allclose(result.grad_norm, optax.tree.norm(GRADS))
  np.testing.assert_allclose(result.param_norm, optax.tree.norm(want))


@pytest.mark.parametrize(
  "loss, grads",
  [
    (jnp.float32(jnp.nan), GRADS),
    (jnp.float32(1.0), {"w": jnp.array([jnp.inf, 0.0]), "b": jnp.array(0.0)}),
    (jnp.float32(1.0), {"w": jnp.array([jnp.nan, 0.0]), "b": jnp.array(0.0)}),
  ],
)
def test_a_non_finite_loss_or_gradient_drops_the_update(loss, grads):
  optimizer = optax.adam(0.1)
  state = optimizer.init(PARAMS)
  result = update_lib.apply_update(optimizer, grads, PARAMS, state, loss)
  assert not bool(result.finite)
  jax.tree.map(np.testing.assert_array_equal, result.params, PARAMS)
  jax.tree.map(np.testing.assert_array_equal, result.opt_state, state)


def test_an_overflowing_optimizer_state_drops_the_update():
  optimizer = _overflowing_state()
  state = optimizer.init(PARAMS)
  grads = {"w": jnp.array([2.0, 1.0]), "b": jnp.array(0.0)}
  result = update_lib.apply_update(
    optimizer, grads, PARAMS, state, jnp.float32(1.0)
  )
  # Everything the trainer used to check is finite...
  assert np.isfinite(result.grad_norm) and np.isfinite(result.param_norm)
  # ...but the state is not, so the update is dropped.
  assert not bool(result.opt_state_finite) and not bool(result.finite)
  jax.tree.map(np.testing.assert_array_equal, result.params, PARAMS)
  assert update_lib.all_finite(result.opt_state)


def test_under_vmap_each_run_decides_alone():
  optimizer = optax.sgd(0.1)
  params = jnp.zeros((3, 2))
  grads = jnp.array([[1.0, 1.0], [jnp.nan, 1.0], [2.0, 0.0]])
  losses = jnp.array([1.0, 1.0, jnp.inf])
  result = jax.jit(
    jax.vmap(lambda g, p, s, l: update_lib.apply_update(optimizer, g, p, s, l))
  )(grads, params, jax.vmap(optimizer.init)(params), losses)
  np.testing.assert_array_equal(result.finite, [True, False, False])
  np.testing.assert_allclose(result.params, [[-0.1, -0.1], [0, 0], [0, 0]])


def test_all_finite_ignores_integer_leaves():
  assert update_lib.all_finite({"count": jnp.array(3), "x": jnp.ones(2)})
  assert not update_lib.all_finite(
    {"count": jnp.array(3), "x": jnp.array([1.0, jnp.inf])}
  )
