"""Diagnostics of a preference batch, from the four per-sequence log-probs.

The implicit reward of a response is τ·(log π(y) − log π_ref(y)) (Rafailov et
al., arXiv:2305.18290 §5); the names follow TRL's so that logs compare
directly. All inputs are ``[B]``; every metric is a batch mean (weighted when
``weight`` is given), computed in float32 or wider.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def per_example_metrics(
  policy_chosen_logps: Any,
  policy_rejected_logps: Any,
  ref_chosen_logps: Optional[Any],
  ref_rejected_logps: Optional[Any],
  *,
  tau: Any,
) -> dict[str, Array]:
  """Per-pair metrics, each ``[B]``; see :func:`preference_metrics`.

  A missing reference (``None``, reference-free losses) counts as log-probs of
  zero, so the rewards become τ·log π.
  """
  dtype = jnp.promote_types(jnp.result_type(policy_chosen_logps), jnp.float32)
  policy_chosen = jnp.asarray(policy_chosen_logps, dtype)  # [B]
  policy_rejected = jnp.asarray(policy_rejected_logps, dtype)  # [B]
  ref_chosen = (
    jnp.zeros_like(policy_chosen)
    if ref_chosen_logps is None
    else jnp.asarray(ref_chosen_logps, dtype)
  )
  ref_rejected = (
    jnp.zeros_like(policy_rejected)
    if ref_rejected_logps is None
    else jnp.asarray(ref_rejected_logps, dtype)
  )
  d_chosen = policy_chosen - ref_chosen  # [B]
  d_rejected = policy_rejected - ref_rejected  # [B]
  tau = jnp.asarray(tau, dtype)
  chosen_rewards = tau * d_chosen
  rejected_rewards = tau * d_rejected
  return {
    "rewards/chosen": chosen_rewards,
    "rewards/rejected": rejected_rewards,
    "rewards/margins": chosen_rewards - rejected_rewards,
    # Ties count as wrong: the policy has not separated the pair.
    "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(dtype),
    "logps/chosen": policy_chosen,
    "logps/rejected": policy_rejected,
    "h": d_chosen - d_rejected,
  }


def preference_metrics(
  policy_chosen_logps: Any,
  policy_rejected_logps: Any,
  ref_chosen_logps: Optional[Any],
  ref_rejected_logps: Optional[Any],
  *,
  tau: Any,
  weight: Optional[Any] = None,
) -> dict[str, Array]:
  """Batch-mean preference metrics.

  Keys: ``rewards/chosen`` (τ·d_c), ``rewards/rejected`` (τ·d_r),
  ``rewards/margins`` (τ·h), ``rewards/accuracies`` (fraction with
  τ·d_c > τ·d_r), ``logps/chosen``, ``logps/rejected`` (policy log-probs) and
  ``h`` (the mean log-ratio h = d_c − d_r of Azar et al.).

  Args:
    policy_chosen_logps: ``[B]`` log π(y_w).
    policy_rejected_logps: ``[B]`` log π(y_l).
    ref_chosen_logps: ``[B]`` log π_ref(y_w), or None.
    ref_rejected_logps: ``[B]`` log π_ref(y_l), or None.
    tau: the loss's τ (scalar, may be traced).
    weight: optional ``[B]`` non-negative pair weights.

  Returns:
    A dict of scalars.
  """
  per_example = per_example_metrics(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    tau=tau,
  )
  if weight is None:
    return {k: jnp.mean(v) for k, v in per_example.items()}
  weight = jnp.asarray(weight, per_example["h"].dtype)  # [B]
  total = jnp.sum(weight)
  return {k: jnp.sum(weight * v) / total for k, v in per_example.items()}
