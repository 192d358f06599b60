"""One optimiser update with one finiteness rule, for every training path.

The training system's step (`psipo_jax.train_step`) and the vmapped sweep
runner (`psipo_jax.bandit`) both end a step here:

    gradient → optax update → finiteness check → keep or drop

An update is kept only if the loss, the gradient norm, the updated
parameters' norm and every entry of the new optimiser state are finite;
otherwise the parameters and the optimiser state stay as they were, so no
state ever holds a NaN, and the caller counts the dropped step. The
optimiser state is checked too because it can overflow while the
parameters still look fine (Adam's second moment at inf makes every later
update 0, silently).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class UpdateResult(NamedTuple):
  """What one update produced.

  Attributes:
    params: the new parameters, or the old ones if the update was dropped.
    opt_state: the new optimiser state, or the old one if dropped.
    finite: [] bool, whether the update was kept.
    grad_norm: [] global norm of the gradient (before any clipping).
    param_norm: [] global norm of the proposed new parameters.
    opt_state_finite: [] bool, whether every entry of the proposed optimiser
      state was finite.
  """

  params: Any
  opt_state: optax.OptState
  finite: jax.Array
  grad_norm: jax.Array
  param_norm: jax.Array
  opt_state_finite: jax.Array


def all_finite(tree: Any) -> jax.Array:
  """[] bool: every floating-point entry of `tree` is finite (others are)."""
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def keep_if(keep: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `keep`, else `old`, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, old)


def apply_update(
  optimizer: optax.GradientTransformation,
  grads: Any,
  params: Any,
  opt_state: optax.OptState,
  loss: jax.Array,
) -> UpdateResult:
  """Applies `optimizer` to `grads` unless anything would become non-finite.

  Pure and elementwise in the parameters, so it runs under `jit`, `vmap`
  (one decision per run) and over sharded parameters alike.
  """
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  grad_norm = optax.tree.norm(grads)
  param_norm = optax.tree.norm(new_params)
  opt_state_finite = all_finite(new_opt_state)
  finite = (
    jnp.isfinite(loss)
    & jnp.isfinite(grad_norm)
    & jnp.isfinite(param_norm)
    & opt_state_finite
  )
  return UpdateResult(
    params=keep_if(finite, new_params, params),
    opt_state=keep_if(finite, new_opt_state, opt_state),
    finite=finite,
    grad_norm=grad_norm,
    param_norm=param_norm,
    opt_state_finite=opt_state_finite,
  )
