"""Tabular softmax policy over a finite action space (the bandit of §5.3).

π_θ(y) = softmax(θ)_y with one free logit per action, θ ∈ R^K. The paper's
illustrative experiments (Azar et al., arXiv:2310.12036, §5.3) initialise the
policy at the reference, θ = log π_ref, so that h_π = 0 at step 0.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from psipo_jax import config_checks
from psipo_jax.models.policy import PolicyOutput

# The `model.*` keys this policy reads.
CONFIG_KEYS = ("name", "num_actions", "ref_probs")


class TabularPolicy(nnx.Module):
  """Softmax policy with one logit per action.

  Call it with `inputs["action"]` ([N] int action indices) to get
  log π_θ(action) as a `PolicyOutput` with one token per response.
  `rngs` (None in evaluation) is part of the policy contract and unused here.
  """

  def __init__(self, init_logits: jax.Array):
    """Args: init_logits: [K] initial logits θ (e.g. log π_ref)."""
    init_logits = jnp.asarray(init_logits, jnp.float32)
    if init_logits.ndim != 1:
      raise ValueError(
        f"init_logits must be [K], got shape {init_logits.shape}"
      )
    self.logits = nnx.Param(init_logits)  # [K]

  @property
  def num_actions(self) -> int:
    return self.logits.shape[0]

  def __call__(
    self, inputs: dict[str, jax.Array], *, rngs: nnx.Rngs | None = None
  ) -> PolicyOutput:
    del rngs  # deterministic policy
    actions = inputs["action"]  # [N]
    log_probs = jax.nn.log_softmax(self.logits[...])  # [K]
    logps = log_probs[actions]  # [N]
    return PolicyOutput(logps=logps, num_tokens=jnp.ones_like(logps))


def initial_logits(config: ml_collections.ConfigDict) -> np.ndarray:
  """θ₀ = log π_ref from `model.ref_probs` (uniform over `model.num_actions` if None)."""
  config_checks.check_keys(config, CONFIG_KEYS, prefix="model.")
  config_checks.integer(config, "num_actions", minimum=2, prefix="model.")
  if config.get("ref_probs") is None:
    probs = np.full(config.num_actions, 1.0 / config.num_actions)
  else:
    probs = np.asarray(config.ref_probs, np.float64)
  if probs.shape != (config.num_actions,):
    raise ValueError(
      f"model.ref_probs has {probs.size} entries but model.num_actions="
      f"{config.num_actions}"
    )
  if np.any(probs <= 0) or not np.isclose(probs.sum(), 1.0):
    raise ValueError(
      f"model.ref_probs must be positive and sum to 1, got {probs.tolist()}"
    )
  return np.log(probs).astype(np.float32)


def tabular_from_config(
  config: ml_collections.ConfigDict, *, rngs: nnx.Rngs
) -> TabularPolicy:
  """Builds the policy from `model.num_actions` and `model.ref_probs`.

  The initialisation is deterministic, so `rngs` is unused.
  """
  del rngs
  return TabularPolicy(initial_logits(config))
