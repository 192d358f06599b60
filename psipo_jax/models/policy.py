"""The output every policy returns: summed log-probs and token counts."""

from typing import NamedTuple

import jax


class PolicyOutput(NamedTuple):
  """Per-response scores of a policy.

  Attributes:
    logps: [N] float32, log π(y|x) summed over the response tokens.
    num_tokens: [N] float32, number of response tokens behind each sum
      (1 for a finite action); the divisor of `normalize="mean"`.
  """

  logps: jax.Array
  num_tokens: jax.Array
