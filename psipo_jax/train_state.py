"""TrainState: the trained policy and its frozen reference side by side.

The model's graph definition (its Python structure) stays outside the state,
static; the state holds only arrays, so it can be jitted, donated, sharded and
checkpointed as one pytree. `params` and `ref_params` are plain nested dicts
of arrays (`nnx.State.to_pure_dict()`), so `nnx.merge(graphdef, params)`
rebuilds the policy and `nnx.merge(graphdef, ref_params)` the reference.
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

Params = Any  # nested dict of arrays, as produced by `nnx.State.to_pure_dict()`


class _SameAsPolicy:
  """Sentinel type of `SAME_AS_POLICY`."""

  def __repr__(self) -> str:
    return "SAME_AS_POLICY"


# Default reference: a copy of the policy's initial parameters.
SAME_AS_POLICY = _SameAsPolicy()


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, plus the frozen reference.

  Attributes:
    step: [] int32, number of optimiser steps taken (skipped ones included).
    params: the policy's parameters; the only differentiated leaves.
    ref_params: the reference policy's parameters, same structure as `params`;
      never updated. None for reference-free losses or when the batches carry
      precomputed reference log-probs.
    opt_state: the optax state of `params`.
    rng: [2] uint32 PRNG key, split once per step (dropout and other
      stochastic layers draw from the per-step half).
    skipped_updates: [] int32, steps whose update was dropped because the
      loss, gradient or updated parameters were not finite.
  """

  step: jax.Array
  params: Params
  ref_params: Params | None
  opt_state: optax.OptState
  rng: jax.Array
  skipped_updates: jax.Array

  @classmethod
  def create(
    cls,
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    *,
    rng: jax.Array,
    ref_params: Params | None | _SameAsPolicy = SAME_AS_POLICY,
  ) -> tuple[nnx.GraphDef, "TrainState"]:
    """Splits `model` into its static graph definition and a fresh state.

    Args:
      model: the policy at initialisation; every variable must be an
        `nnx.Param` (other state, e.g. batch statistics, is not supported).
      optimizer: optax transformation that updates `params`.
      rng: [2] uint32 PRNG key carried by the state.
      ref_params: the reference policy's parameters. By default a copy of the
        policy's initial parameters (separate buffers, so that donating the
        state never aliases them); a parameter tree of the same structure for
        a different reference checkpoint; None for no reference.

    Returns:
      (graphdef, state) where `nnx.merge(graphdef, state.params)` is `model`.
    """
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError(
        "TrainState supports models whose variables are all nnx.Param; got"
        f" other state: {rest}"
      )
    params = nnx.to_pure_dict(param_state)
    if isinstance(ref_params, _SameAsPolicy):
      ref_params = jax.tree.map(jnp.copy, params)
    elif ref_params is not None:
      _check_same_structure(params, ref_params)
    state = cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ref_params=ref_params,
      opt_state=optimizer.init(params),
      rng=jnp.asarray(rng, jnp.uint32),
      skipped_updates=jnp.zeros((), jnp.int32),
    )
    return graphdef, state


def _check_same_structure(params: Params, ref_params: Params) -> None:
  """Raises if the reference cannot stand in for the policy."""
  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  ref_shapes = jax.tree.map(lambda x: (x.shape, x.dtype), ref_params)
  if jax.tree.structure(params) != jax.tree.structure(ref_params) or (
    shapes != ref_shapes
  ):
    raise ValueError(
      "ref_params must have the policy's structure, shapes and dtypes;"
      f" policy: {shapes}, reference: {ref_shapes}"
    )
